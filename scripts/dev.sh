#!/usr/bin/env bash
# Start a host with the example handlers deployed (basics, coordination and
# the nine patterns of docs/patterns.md): embedded redb in ./cairn-data,
# ingress on 127.0.0.1:8080, admin API on 127.0.0.1:9070.
# Extra arguments go to `cairn serve` (see `cairn serve --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
# The first build compiles wasmtime and the handlers: about 15 minutes on
# 2 cores; say so, and let cargo show its progress.
echo "dev.sh: building the example handlers, then the host (the first build takes a while; later ones seconds)" >&2
CAIRN_BUILD_PROGRESS=1 scripts/build-examples.sh >/dev/null
echo "dev.sh: building the host" >&2
cargo build -p cairn
modules=()
for m in basics coordination burst reminders inventory dispatcher enrichment payments signup orders; do
  modules+=(--deploy "$CARGO_TARGET_DIR/examples-wasm/$m.wasm")
done
exec "$CARGO_TARGET_DIR/debug/cairn" serve --data-dir ./cairn-data "${modules[@]}" \
  --http-allow '127.0.0.1:*' "$@"
