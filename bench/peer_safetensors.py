"""The Python peer of `just bench`: times safetensors.numpy.load_file on the given files.

Prints one JSON object: the safetensors version, the seconds of each timed run (after one
warm-up), and name -> [dtype, shape, sha256] of the tensors of the last run, so the harness can
check that this peer read the same tensors as every other loader.
"""

import argparse
import hashlib
import json
import time

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, so BF16 tensors can load)
import safetensors
from safetensors.numpy import load_file

DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32",
          "int16": "I16", "uint8": "U8", "uint32": "U32", "float64": "F64", "bool": "BOOL"}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("files", nargs="+")
    args = parser.parse_args()

    load_all = lambda: [load_file(f) for f in args.files]
    del_ = load_all()  # warm-up
    del del_
    seconds, loaded = [], None
    for _ in range(args.runs):
        loaded = None
        start = time.perf_counter()
        loaded = load_all()
        seconds.append(time.perf_counter() - start)
    tensors = {}
    for part in loaded:
        for name, array in part.items():
            tensors[name] = [DTYPES[str(array.dtype)], list(array.shape),
                             hashlib.sha256(array.tobytes()).hexdigest()]
    print(json.dumps({"version": safetensors.__version__, "seconds": seconds, "tensors": tensors}))


if __name__ == "__main__":
    main()
