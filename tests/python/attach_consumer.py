"""A consumer process for the attach tests: attaches to a model through the Python client
(clients/python), checks what it maps, prints one JSON report line, then holds its leases until
its standard input closes.

Usage: attach_consumer.py SOCKET MODEL_ID EXPECTED_JSON [COUNT]

EXPECTED_JSON maps each tensor's name to the sha256 of its bytes in the files. COUNT clients attach
at once from threads of this process (default 1).
"""

import hashlib
import json
import mmap
import sys
from concurrent.futures import ThreadPoolExecutor

import model_loader
import numpy as np


def model_mappings():
    """(perms, path, fields) of every mapping of a model's memory (a memfd of the server's, or a
    safetensors file), from /proc/self/smaps."""
    found, current = [], None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            parts = line.split()
            if "-" in parts[0] and len(parts) >= 5 and not parts[0].endswith(":"):
                path = " ".join(parts[5:]) if len(parts) > 5 else ""
                current = None
                if path.startswith("/memfd:model-loader:") or path.endswith(".safetensors"):
                    current = {"perms": parts[1], "path": path, "fields": {}}
                    found.append(current)
            elif current is not None and parts[0].endswith(":") and len(parts) >= 2 and parts[1].isdigit():
                current["fields"][parts[0][:-1]] = int(parts[1]) * 1024
    return found


def main():
    socket, model_id, expected_path = sys.argv[1:4]
    count = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    expected = json.load(open(expected_path))
    with ThreadPoolExecutor(max_workers=count) as pool:
        leases = list(pool.map(lambda _: model_loader.attach(model_id, socket=socket), range(count)))
    first = leases[0]
    tensors = first.tensors
    # hashlib reads the read-only arrays' memory in place, as bytes (a view, not a copy: BF16's
    # ml_dtypes arrays export no buffer of their own).
    digests = {name: hashlib.sha256(memoryview(array.view(np.uint8))).hexdigest() for name, array in tensors.items()}
    try:
        next(iter(tensors.values()))[...] = 0
        write_refused = False
    except ValueError:
        write_refused = True
    buffer = first.buffers[0]
    try:
        mmap.mmap(buffer.fd, buffer.size_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        writable_mapping_refused = False
    except PermissionError:
        writable_mapping_refused = True
    report = {
        "clients": count,
        "attached_clients": first.status.attached_clients,
        "digests_match": digests == expected,
        "mismatched": sorted(n for n in expected if digests.get(n) != expected[n]),
        "write_refused": write_refused,
        "writable_mapping_refused": writable_mapping_refused,
        "mappings": model_mappings(),
        "buffer_bytes": buffer.size_bytes,
    }
    print(json.dumps(report), flush=True)
    sys.stdin.read()
    for lease in leases:
        lease.close()


if __name__ == "__main__":
    main()
