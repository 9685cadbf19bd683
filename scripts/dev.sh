#!/usr/bin/env bash
# Start a host with the example handlers deployed: embedded redb in
# ./cairn-data, ingress on 127.0.0.1:8080, admin API on 127.0.0.1:9070.
# Extra arguments go to `cairn serve` (see `cairn serve --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
scripts/build-examples.sh >/dev/null
cargo build --quiet -p cairn
exec "$CARGO_TARGET_DIR/debug/cairn" serve --data-dir ./cairn-data \
  --deploy "$CARGO_TARGET_DIR/examples-wasm/basics.wasm" \
  --deploy "$CARGO_TARGET_DIR/examples-wasm/coordination.wasm" \
  --http-allow '127.0.0.1:*' "$@"
