"""Times attach() to usable tensors (numpy views over the server's memory) through the Python
client (clients/python), `--runs` times after an untimed one whose tensors it hashes.

Usage: attach_peer.py --runs N SOCKET MODEL_ID
Prints one JSON object: {"seconds": [...], "tensors": {name: [dtype, shape, sha256]}}.
"""

import argparse
import hashlib
import json
import time

import numpy as np

import model_loader


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("socket")
    parser.add_argument("model_id")
    args = parser.parse_args()

    with model_loader.attach(args.model_id, socket=args.socket) as model:
        specs = model.tensor_specs
        tensors = {
            name: [specs[name].dtype, list(specs[name].shape), hashlib.sha256(memoryview(a.view(np.uint8))).hexdigest()]
            for name, a in model.tensors.items()
        }
    seconds = []
    for _ in range(args.runs):
        start = time.perf_counter()
        model = model_loader.attach(args.model_id, socket=args.socket)
        arrays = model.tensors
        seconds.append(time.perf_counter() - start)
        assert len(arrays) == len(tensors)
        model.close()
    print(json.dumps({"seconds": seconds, "tensors": tensors}))


if __name__ == "__main__":
    main()
