"""Attach on a GPU, checked end to end on a machine with CUDA (not part of CI): a `cuda` build of
the server with `--attach-socket` loads a BF16 model onto cuda:0; a PyTorch process attaches
(clients/python) and every tensor's sha256 equals the file's; the driver's free memory does not
drop by the model on attach (no copy); a transformers model built on the meta device and filled
with load_state_dict(assign=True) from attached tensors gives the output of from_pretrained; after
detach and unload the free memory is back within 64 MiB; and the time from attach() to usable
tensors against warm reloads of the same files by safetensors.torch to cuda:0.

Usage: python3 scripts/gpu-attach-check.py SERVER_BINARY WORK_DIR [--gib 8]
Prints one JSON report; exits non-zero if a check fails.
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

import model_loader


def free_bytes():
    free, _ = torch.cuda.mem_get_info(0)
    return free


def used_by(pid):
    """MiB of GPU memory the driver attributes to process `pid` (nvidia-smi)."""
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout
    return sum(int(used) for p, used in (l.split(",") for l in out.strip().splitlines() if l) if int(p) == pid)


def sha_of_file_tensors(path):
    """Each tensor's sha256 straight from the file's bytes (dtype-agnostic)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        data = f.read()
    return {
        name: hashlib.sha256(data[info["data_offsets"][0]:info["data_offsets"][1]]).hexdigest()
        for name, info in header.items()
        if name != "__metadata__"
    }


def write_big_model(folder, gib):
    """`gib` GiB of BF16 in 2 shards of 16 tensors, plus an index."""
    folder.mkdir(parents=True, exist_ok=True)
    per_tensor = gib * (1 << 30) // 32 // 2  # elements of 2 bytes
    weight_map, expected = {}, {}
    generator = torch.Generator().manual_seed(0)
    for shard in range(2):
        name = f"model-0000{shard + 1}-of-00002.safetensors"
        tensors = {
            f"layers.{shard * 16 + i}.weight": torch.randn(per_tensor // 4096, 4096, generator=generator).to(torch.bfloat16)
            for i in range(16)
        }
        save_file(tensors, folder / name)
        weight_map.update({t: name for t in tensors})
        expected.update(sha_of_file_tensors(folder / name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text("{}")
    return expected


def write_small_transformer(folder):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=1000, tie_word_embeddings=False, torch_dtype="bfloat16")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    return config


def start_server(binary, models, socket):
    process = subprocess.Popen(
        [binary, "--model-root", str(models), "--offline", "--device", "cuda:0", "--listen", "127.0.0.1:50071",
         "--attach-socket", str(socket)],
        stderr=subprocess.PIPE, text=True)
    for line in process.stderr:
        if "serving modelloader.v1.ModelLoader" in line:
            # Keep reading its log, so the server never blocks on a full pipe.
            threading.Thread(target=lambda: [sys.stderr.write(l) for l in process.stderr], daemon=True).start()
            return process
    raise SystemExit("the server did not start")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("server")
    parser.add_argument("work")
    parser.add_argument("--gib", type=int, default=8)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    work = Path(args.work)
    models, socket = work / "models", work / "attach.sock"
    expected = write_big_model(models / "big", args.gib)
    config = write_small_transformer(models / "tiny-llama")
    (models / "f32small").mkdir(parents=True, exist_ok=True)
    f32 = {f"w{i}": torch.randn(512, 1024, generator=torch.Generator().manual_seed(i)) for i in range(4)}
    f32["ids"] = torch.arange(100, dtype=torch.int64)
    save_file(f32, models / "f32small" / "model.safetensors")
    files = sorted((models / "big").glob("*.safetensors"))
    report, failed = {"gib": args.gib}, []

    torch.cuda.init()
    torch.zeros(1, device="cuda:0")  # this process's context, before any figure
    server = start_server(args.server, models, socket)
    try:
        # This process's own CUDA work first (cuBLAS, the kernels of a forward pass), so what it
        # holds is the same before the load and after the unload.
        from transformers import LlamaForCausalLM

        reference = LlamaForCausalLM.from_pretrained(models / "tiny-llama", torch_dtype=torch.bfloat16).to("cuda:0")
        ids = torch.tensor([[1, 5, 42, 7, 999, 3]], device="cuda:0")
        with torch.no_grad():
            want = reference(ids).logits
        del reference
        torch.cuda.empty_cache()
        # With the server up: its own CUDA context is not the model's.
        before_load, server_before = free_bytes(), used_by(server.pid)
        start = time.perf_counter()
        model_loader.load("big", server="127.0.0.1:50071", device="cuda:0", progress=False)
        report["load_s"] = time.perf_counter() - start
        model_loader.load("tiny-llama", server="127.0.0.1:50071", device="cuda:0", progress=False)
        after_load = free_bytes()

        start = time.perf_counter()
        attached = model_loader.attach("big", socket=str(socket))
        tensors = attached.torch()
        report["first_attach_ms"] = (time.perf_counter() - start) * 1e3
        after_attach = free_bytes()
        report["free_drop_on_attach_bytes"] = after_load - after_attach
        if after_load - after_attach > 64 << 20:
            failed.append("free memory dropped on attach")
        report["buffers"] = [(b.kind, b.device, b.size_bytes) for b in attached.buffers]
        mismatched = [n for n, t in tensors.items()
                      if hashlib.sha256(t.view(torch.int16).cpu().numpy().tobytes()).hexdigest() != expected[n]]
        report["mismatched"] = mismatched
        if mismatched or len(tensors) != len(expected):
            failed.append("attached tensors differ from the files")
        del tensors
        attached.close()

        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            a = model_loader.attach("big", socket=str(socket))
            t = a.torch()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            del t
            a.close()
        reloads = []
        for _ in range(args.runs):
            start = time.perf_counter()
            loaded_tensors = {}
            for f in files:
                loaded_tensors.update(load_file(f, device="cuda:0"))
            torch.cuda.synchronize()
            reloads.append(time.perf_counter() - start)
            del loaded_tensors
            torch.cuda.empty_cache()
        report["attach_ms_median"] = float(np.median(times)) * 1e3
        report["safetensors_torch_reload_s_median"] = float(np.median(reloads))
        report["speedup"] = float(np.median(reloads)) / float(np.median(times))
        if report["speedup"] < 20:
            failed.append("attach is not 20x faster than the reload")

        with model_loader.attach("tiny-llama", socket=str(socket)) as small:
            with torch.device("meta"):
                meta = LlamaForCausalLM(config)
            state = small.torch()
            meta.load_state_dict(state, assign=True, strict=True)
            # Buffers no checkpoint holds (the rotary embedding's) were made on the meta device:
            # make those modules again on the GPU.
            for name, module in list(meta.named_modules()):
                if any(b.is_meta for b in module.buffers(recurse=False)):
                    parent, _, leaf = name.rpartition(".")
                    setattr(meta.get_submodule(parent), leaf, type(module)(config=config, device="cuda:0"))
            with torch.no_grad():
                got = meta(ids).logits
            report["same_logits"] = bool(torch.equal(got, want))
            report["attached_weight_ptr_in_import"] = state["model.embed_tokens.weight"].data_ptr() == \
                meta.model.embed_tokens.weight.data_ptr()
            del state, meta
        if not report["same_logits"]:
            failed.append("the attached model's logits differ from from_pretrained's")
        torch.cuda.empty_cache()

        # Converted on the GPU (F32 files loaded as BF16): the attached bytes are torch's rounding
        # of the files' values (both round to nearest even); integers untouched.
        model_loader.load("f32small", server="127.0.0.1:50071", device="cuda:0", dtype="bf16", progress=False)
        with model_loader.attach("f32small", socket=str(socket)) as converted:
            got = {n: t.cpu() for n, t in converted.torch().items()}
            report["converted_buffers"] = [(b.kind, b.size_bytes) for b in converted.buffers]
        want_converted = {n: (t.to(torch.bfloat16) if t.is_floating_point() else t) for n, t in f32.items()}
        report["converted_match"] = all(
            got[n].dtype == w.dtype and torch.equal(got[n].view(torch.uint8), w.view(torch.uint8))
            for n, w in want_converted.items())
        if not report["converted_match"]:
            failed.append("tensors converted on the GPU differ from the reference conversion")

        for model in ["big", "tiny-llama", "f32small"]:
            subprocess.run(["python3", "-c", "import grpc, model_loader; from model_loader import pb2; "
                            "from model_loader._proto import model_loader_pb2_grpc as g; "
                            "s = g.ModelLoaderStub(grpc.insecure_channel('127.0.0.1:50071')); "
                            f"s.UnloadModel(pb2.UnloadModelRequest(model_id='{model}'))"], check=True)
        time.sleep(0.5)
        after_unload = free_bytes()
        report["free_before_load"] = before_load
        report["free_after_unload"] = after_unload
        report["server_used_mib_before_load"] = server_before
        report["server_used_mib_after_unload"] = used_by(server.pid)
        if abs(before_load - after_unload) > 64 << 20:
            failed.append("free memory did not come back within 64 MiB")
    finally:
        server.terminate()
        server.wait(timeout=30)
    report["failed"] = failed
    print(json.dumps(report, indent=1))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
