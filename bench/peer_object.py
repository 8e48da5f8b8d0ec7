"""The object-storage peers of `just bench --object`, against the S3 server the harness started.

    peer_object.py runai --concurrency N --chunk BYTES --runs R s3://bucket/key ...
    peer_object.py boto3 --runs R --work DIR s3://bucket/key ...

`runai`: the Run:ai Model Streamer's SafetensorsStreamer (runai-model-streamer with its S3
backend) streams every file; its tensors are read to the end. `boto3`: each object downloaded to a
file with boto3's transfer manager, then loaded with safetensors.numpy. The endpoint and the
credentials are the standard AWS variables the harness sets. Prints one JSON object: the versions,
the seconds of each timed run (after one warm-up), and name -> [dtype, shape, sha256] of the
tensors of the last run, so the harness checks that the peer read the files' tensors.
"""

import argparse
import hashlib
import json
import os
import time
from importlib import metadata

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)

DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32",
          "int16": "I16", "uint8": "U8", "uint32": "U32", "float64": "F64", "bool": "BOOL",
          "torch.float32": "F32", "torch.float16": "F16", "torch.bfloat16": "BF16", "torch.int64": "I64"}


def split(url):
    bucket, _, key = url.removeprefix("s3://").partition("/")
    return bucket, key


def runai(args):
    os.environ["RUNAI_STREAMER_CONCURRENCY"] = str(args.concurrency)
    os.environ["RUNAI_STREAMER_CHUNK_BYTESIZE"] = str(args.chunk)
    # Path-style requests to an IP endpoint.
    os.environ.setdefault("RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING", "0")
    from runai_model_streamer import SafetensorsStreamer

    def load():
        out = {}
        with SafetensorsStreamer() as streamer:
            streamer.stream_files(args.urls)
            for name, tensor in streamer.get_tensors():
                # The streamer hands out views into its buffer: keep a copy, as a loader would.
                out[name] = tensor.clone()
        return out

    def describe(tensor):
        import torch
        raw = tensor.contiguous().view(torch.uint8).numpy().tobytes()
        return [DTYPES[str(tensor.dtype)], list(tensor.shape), hashlib.sha256(raw).hexdigest()]

    return "runai-model-streamer " + metadata.version("runai-model-streamer"), load, describe


def boto3_download(args):
    import boto3
    from safetensors.numpy import load_file

    client = boto3.client("s3")
    os.makedirs(args.work, exist_ok=True)

    def load():
        out = {}
        for i, url in enumerate(args.urls):
            bucket, key = split(url)
            path = os.path.join(args.work, f"{i}.safetensors")
            client.download_file(bucket, key, path)
            out.update(load_file(path))
            os.remove(path)
        return out

    def describe(array):
        return [DTYPES[str(array.dtype)], list(array.shape), hashlib.sha256(array.tobytes()).hexdigest()]

    return "boto3 " + metadata.version("boto3") + " + safetensors " + metadata.version("safetensors"), load, describe


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("peer", choices=["runai", "boto3"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=16 << 20)
    parser.add_argument("--work", default="target/bench/boto3")
    parser.add_argument("urls", nargs="+")
    args = parser.parse_args()
    version, load, describe = (runai if args.peer == "runai" else boto3_download)(args)
    loaded = load()  # warm-up (and the imports' first use)
    seconds = []
    for _ in range(args.runs):
        loaded = None
        start = time.perf_counter()
        loaded = load()
        seconds.append(time.perf_counter() - start)
    tensors = {name: describe(t) for name, t in loaded.items()}
    print(json.dumps({"version": version, "seconds": seconds, "tensors": tensors}))


if __name__ == "__main__":
    main()
