#!/usr/bin/env bash
# Run every test: unit tests, and the end-to-end tests against the real
# `cairn` binary with the example modules compiled to WebAssembly.
# Installs what it needs (the wasm32-wasip2 target) on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
scripts/build-examples.sh
cargo build -p cairn
cargo test --workspace --all-targets
