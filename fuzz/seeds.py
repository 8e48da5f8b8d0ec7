"""Writes the fuzz targets' seeds, fuzz/corpus/<target>/seed-*: a few small valid inputs each,
so libFuzzer starts from accepted inputs instead of finding the formats' shapes alone.

Usage: python3 fuzz/seeds.py (the files are committed; rerun after changing this script)
"""

import json
import struct
from pathlib import Path

CORPUS = Path(__file__).resolve().parent / "corpus"
SIZES = {"U8": 1, "BOOL": 1, "F8_E4M3": 1, "I16": 2, "F16": 2, "BF16": 2, "U32": 4, "I32": 4, "F32": 4, "I64": 8, "F64": 8}


def header_json(tensors, metadata=None):
    """The header of zeroed tensors (name, dtype, shape) laid out in order, and its data length."""
    header, end = ({"__metadata__": metadata} if metadata else {}), 0
    for name, dtype, shape in tensors:
        size = SIZES[dtype]
        for d in shape:
            size *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [end, end + size]}
        end += size
    return json.dumps(header, separators=(",", ":")).encode(), end


def safetensors(tensors, metadata=None):
    text, data_len = header_json(tensors, metadata)
    return struct.pack("<Q", len(text)) + text + bytes(data_len)


def frame(fields):
    """An AttachRequest frame: (field number, str or bool) in protobuf's wire format."""
    body = b""
    for number, value in fields:
        if isinstance(value, bool):
            body += bytes([number << 3, int(value)])
        else:
            raw = value.encode()
            body += bytes([number << 3 | 2, len(raw)]) + raw
    return struct.pack("<I", len(body)) + body


def main():
    pipeline = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.30.0",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "safety_checker": [None, None],
    }
    text, data_len = header_json([("b", "BF16", [2, 3]), ("a", "F32", [4]), ("empty", "I64", [0])])
    seeds = {
        "header": {
            "file": b"\0" + safetensors([("w", "F32", [2, 2]), ("b", "F16", [3])], {"format": "pt"}),
            "file-fp8": b"\0" + safetensors([("q", "F8_E4M3", [4]), ("scale", "BF16", [1]), ("m", "BOOL", [2])]),
            "file-empty": b"\0" + safetensors([]),
            "json": b"\1" + struct.pack("<QQ", 4096, data_len) + text,
        },
        "index": {
            "two-shards": json.dumps({
                "metadata": {"total_size": 27},
                "weight_map": {
                    "a": "model-00001-of-00002.safetensors",
                    "b": "model-00001-of-00002.safetensors",
                    "c": "model-00002-of-00002.safetensors",
                    "d": "model-00002-of-00002.safetensors",
                },
            }).encode(),
            "one-shard": json.dumps({"weight_map": {"c": "model-00002-of-00002.safetensors"}}).encode(),
        },
        "model_index": {
            "pipeline": json.dumps(pipeline).encode(),
            "unet": json.dumps({"_class_name": "UNet", "unet": ["diffusers", "UNet2DConditionModel"]}).encode(),
        },
        "ids": {
            "org-name": b"demo/tiny-sd",
            "name": b"gpt2",
            "commit": b"0123456789abcdef0123456789abcdef01234567",
            "ref": b"refs/pr/1",
            "cuda": b"cuda:1",
            "dtype": b"bfloat16",
            "budget": b"8GiB",
            "percent": b"75%",
        },
        "attach": {
            "load": frame([(1, "demo/tiny-sd"), (2, "main"), (3, "cpu"), (4, True)]),
            "attach": frame([(1, "gpt2")]),
        },
    }
    for target, inputs in seeds.items():
        folder = CORPUS / target
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in inputs.items():
            (folder / f"seed-{name}").write_bytes(data)


if __name__ == "__main__":
    main()
