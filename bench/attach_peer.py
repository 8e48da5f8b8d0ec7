"""Times attach() to usable tensors (numpy views over the server's memory) through the Python
client (clients/python), `--runs` times after an untimed one whose tensors it hashes.

Usage: attach_peer.py --runs N [--torch] [--device DEVICE] SOCKET MODEL_ID
With --torch, usable tensors are torch tensors (CUDA ones for a model on a GPU, synchronized).
--device names the replica to attach, for a model replicated on several GPUs.
Prints one JSON object: {"seconds": [...], "tensors": {name: [dtype, shape, sha256]},
"devices": {name: device}} (each tensor's torch device with --torch, else empty).
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
    parser.add_argument("--torch", action="store_true")
    parser.add_argument("--device")
    parser.add_argument("socket")
    parser.add_argument("model_id")
    args = parser.parse_args()

    def usable(model):
        if not args.torch:
            return model.tensors
        import torch

        tensors = model.torch()
        torch.cuda.synchronize()
        return tensors

    def digest(a):
        if args.torch:
            a = a.contiguous().view(-1).view(__import__("torch").uint8).cpu().numpy()
        return hashlib.sha256(memoryview(a.view(np.uint8))).hexdigest()

    with model_loader.attach(args.model_id, socket=args.socket, device=args.device) as model:
        specs = model.tensor_specs
        first = usable(model)
        tensors = {name: [specs[name].dtype, list(specs[name].shape), digest(a)] for name, a in first.items()}
        devices = {name: str(a.device) for name, a in first.items()} if args.torch else {}
        del first
    seconds = []
    for _ in range(args.runs):
        start = time.perf_counter()
        model = model_loader.attach(args.model_id, socket=args.socket, device=args.device)
        arrays = usable(model)
        seconds.append(time.perf_counter() - start)
        assert len(arrays) == len(tensors)
        del arrays
        model.close()
    print(json.dumps({"seconds": seconds, "tensors": tensors, "devices": devices}))


if __name__ == "__main__":
    main()
