#!/usr/bin/env bash
# The benchmark: release build of the host, the examples, then cairn-loadgen.
# Extra arguments go to cairn-loadgen (see --help), e.g. --seconds 5.
#   scripts/bench.sh soak [--soak-minutes 30]   # full-rate steps3 with
#     completed_retention = "1m"; prints rate, p99, RSS and data size every minute
#   scripts/bench.sh wrk    # steps3, counter-keys, counter-hot with wrk (32 connections, 20 s)
#     CAIRN_BENCH_CLUSTER=127.0.0.1:9092 scripts/bench.sh wrk   # the same host in
#     cluster mode (every commit a Kafka transaction; start Kafka first)
#   scripts/bench.sh timers [--timers N]   # a million sends due in a day: memory,
#     then the restart time after a SIGKILL
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
scripts/build-examples.sh >/dev/null
cargo build --quiet --release -p cairn -p cairn-tests --bin cairn --bin cairn-loadgen
if [ "${1:-}" = wrk ]; then
  # The three HTTP workloads with wrk (32 connections, 20 s each, back to
  # back) against a host on its defaults; its peak memory after each.
  command -v wrk >/dev/null || { apt-get install -y wrk >/dev/null || { echo "bench.sh: install wrk (apt-get install wrk)" >&2; exit 1; }; }
  dir=$(mktemp -d)
  port=${CAIRN_BENCH_PORT:-18080}
  printf 'data_dir = "%s/db"\ningress_addr = "127.0.0.1:%s"\nadmin_addr = "127.0.0.1:%s"\n' \
    "$dir" "$port" "$((port + 1))" > "$dir/cairn.toml"
  if [ -n "${CAIRN_BENCH_CLUSTER:-}" ]; then
    printf '[cluster]\nbootstrap = "%s"\napp = "bench-%s"\n' \
      "$CAIRN_BENCH_CLUSTER" "$(date +%s%N)" >> "$dir/cairn.toml"
  fi
  "$CARGO_TARGET_DIR/release/cairn" serve --config "$dir/cairn.toml" \
    --deploy "$CARGO_TARGET_DIR/examples-wasm/basics.wasm" > "$dir/log" 2>&1 &
  pid=$!
  trap 'kill -9 $pid 2>/dev/null; rm -rf "$dir"' EXIT
  for _ in $(seq 300); do
    if [ -n "${CAIRN_BENCH_CLUSTER:-}" ]; then
      curl -sf "http://127.0.0.1:$((port + 1))/cluster" | grep -q '"role":"owner"' && break
    else
      curl -sf "http://127.0.0.1:$((port + 1))/health" >/dev/null && break
    fi
    sleep 0.1
  done
  for workload in steps3 counter-keys counter-hot; do
    echo "== $workload"
    wrk -t2 -c32 -d20s --latency -s scripts/wrk/workload.lua "http://127.0.0.1:$port" -- "$workload" |
      grep -E "Requests/sec|^ +(50|99)%|Non-2xx|Socket errors"
    echo "host peak memory: $(awk '/VmHWM/ {printf "%.1f MiB", $2 / 1024}' "/proc/$pid/status")"
  done
  exit 0
fi
if [ "${1:-}" = timers ]; then
  shift
  exec "$CARGO_TARGET_DIR/release/cairn-loadgen" --timers 1000000 "$@"
fi
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
