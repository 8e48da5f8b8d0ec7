#!/bin/sh
# Regenerates model_loader/_proto from ../../proto with the grpcio-tools version pinned in
# regen.py, installed into a throwaway virtual environment (so the caller's protobuf is untouched).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
version=$(sed -n 's/^GRPCIO_TOOLS_VERSION = "\(.*\)"$/\1/p' "$here/regen.py")
venv=$(mktemp -d)
trap 'rm -rf "$venv"' EXIT INT TERM
"${PYTHON:-python3}" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "grpcio-tools==$version"
"$venv/bin/python" "$here/regen.py" "$@"
