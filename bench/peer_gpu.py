"""The Python GPU peers of `model-loader-bench --gpu`: safetensors.torch.load_file(device="cuda")
or fastsafetensors, timed on the given files.

Prints one JSON object: the library's version, the setting used, the seconds of each timed run
(after warm-up runs; each run ends with torch.cuda.synchronize() and the tensors are freed
between runs), and name -> [dtype, shape, sha256] of the tensors of the last run, read back from
the GPU, so the harness can check that this peer read what every other loader read.

fastsafetensors: its bounce-buffer path (nogds=True: no GPUDirect Storage here) with buffered
reads, one loader reused across runs; the warm-up tries a few thread counts and buffer sizes and
the timed runs use the fastest: its best setting for a warm page cache.
"""

import argparse
import hashlib
import json
import os
import time

import torch

DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
          torch.int32: "I32", torch.int16: "I16", torch.uint8: "U8", torch.float64: "F64"}


class Torch:
    """safetensors.torch.load_file(device="cuda:0"), file by file."""

    def __init__(self, files, _setting):
        from safetensors.torch import load_file
        self.files, self.load_file = files, load_file

    def load(self):
        out = {}
        for f in self.files:
            out.update(self.load_file(f, device="cuda:0"))
        return out

    def release(self):
        pass

    def close(self):
        pass


class FastSafeTensors:
    """fastsafetensors' loader, made once per setting (its reader allocates its pinned bounce
    buffers when made, as our server allocates its pool at start-up) and reused for every run."""

    def __init__(self, files, setting):
        from fastsafetensors import SafeTensorsFileLoader, SingleGroup
        threads, buffer_kib = setting
        self.files = list(files)
        self.loader = SafeTensorsFileLoader(SingleGroup(), "cuda:0", nogds=True, max_threads=threads,
                                            bbuf_size_kb=buffer_kib)
        self.buffers = None

    def load(self):
        self.loader.add_filenames({0: self.files})
        self.buffers = self.loader.copy_files_to_device()
        return {name: self.buffers.get_tensor(name) for name in self.buffers.key_to_rank_lidx.keys()}

    def release(self):
        if self.buffers is not None:
            self.buffers.close()
            self.buffers = None
        self.loader.reset()

    def close(self):
        self.release()
        self.loader.close()


def timed(peer):
    torch.cuda.synchronize()
    start = time.perf_counter()
    tensors = peer.load()
    torch.cuda.synchronize()
    return time.perf_counter() - start, tensors


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--loader", choices=["torch", "fastsafetensors"], required=True)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("files", nargs="+")
    args = parser.parse_args()
    torch.zeros(1, device="cuda:0")  # the CUDA context, outside the clock

    if args.loader == "torch":
        import safetensors
        make, version, settings = Torch, safetensors.__version__, [None]
    else:
        # Buffered reads: by default it opens local files with O_DIRECT, which bypasses the page
        # cache (its best setting for a cold cache, not for a warm one).
        os.environ["FASTSAFETENSORS_ODIRECT"] = "0"
        import fastsafetensors
        make, version = FastSafeTensors, fastsafetensors.__version__
        settings = [(t, kib) for t in (8, 16, 32) for kib in (16 * 1024, 64 * 1024)]

    # Warm-up: every setting twice; the fastest second run picks the setting that is timed.
    best, best_seconds = None, float("inf")
    for setting in settings:
        peer = make(args.files, setting)
        for _ in range(2):
            seconds, tensors = timed(peer)
            del tensors
            peer.release()
            torch.cuda.empty_cache()
        peer.close()
        if seconds < best_seconds:
            best, best_seconds = setting, seconds

    peer = make(args.files, best)
    seconds = []
    for run in range(args.runs):
        took, tensors = timed(peer)
        seconds.append(took)
        if run + 1 < args.runs:
            del tensors
            peer.release()
            torch.cuda.empty_cache()
    checks = {}
    for name, t in tensors.items():
        raw = t.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes()
        checks[name] = [DTYPES[t.dtype], list(t.shape), hashlib.sha256(raw).hexdigest()]
    del tensors
    peer.close()
    setting = None if best is None else {"max_threads": best[0], "bbuf_size_kb": best[1], "nogds": True}
    print(json.dumps({"version": version, "setting": setting, "seconds": seconds, "tensors": checks}))


if __name__ == "__main__":
    main()
