#!/usr/bin/env bash
# The benchmark: release build of the host, the examples, then cairn-loadgen.
# Extra arguments go to cairn-loadgen (see --help), e.g. --seconds 5.
#   scripts/bench.sh soak [--soak-minutes 30]   # full-rate steps3 with
#     completed_retention = "1m"; prints rate, p99, RSS and data size every minute
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
scripts/build-examples.sh >/dev/null
cargo build --quiet --release -p cairn -p cairn-tests --bin cairn --bin cairn-loadgen
if [ "${1:-}" = soak ]; then
  shift
  exec "$CARGO_TARGET_DIR/release/cairn-loadgen" --soak-minutes 30 --scenarios steps3 \
    --host-config 'completed_retention = "1m"' "$@"
fi
if ! scripts/kafka.sh status >/dev/null 2>&1; then
  scripts/kafka.sh start
  trap 'scripts/kafka.sh stop' EXIT
fi
"$CARGO_TARGET_DIR/release/cairn-loadgen" "$@"
