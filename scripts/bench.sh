#!/usr/bin/env bash
# The benchmark: release build of the host, the examples, then cairn-loadgen.
# Extra arguments go to cairn-loadgen (see --help), e.g. --seconds 5.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
scripts/build-examples.sh >/dev/null
cargo build --quiet --release -p cairn -p cairn-tests --bin cairn --bin cairn-loadgen
if ! scripts/kafka.sh status >/dev/null 2>&1; then
  scripts/kafka.sh start
  trap 'scripts/kafka.sh stop' EXIT
fi
"$CARGO_TARGET_DIR/release/cairn-loadgen" "$@"
