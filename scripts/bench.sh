#!/usr/bin/env bash
# The benchmark: release build of the host, the examples, then cairn-loadgen.
# Extra arguments go to cairn-loadgen (see --help), e.g. --seconds 5.
#   scripts/bench.sh soak [--soak-minutes 30]   # full-rate steps3 with
#     completed_retention = "1m"; prints rate, p99, RSS and data size every minute
#   scripts/bench.sh wrk    # steps3, counter-keys, counter-hot with wrk (32 connections, 20 s)
#     CAIRN_BENCH_CLUSTER=127.0.0.1:9092 scripts/bench.sh wrk   # the same host in
#     cluster mode (every commit a Kafka transaction; start Kafka first)
#     CAIRN_BENCH_CLUSTER=127.0.0.1:9092 CAIRN_BENCH_HOSTS=2 CAIRN_BENCH_PARTITIONS=4 \
#       scripts/bench.sh wrk   # two hosts sharing four partitions, load through both
#   CAIRN_BENCH_CLUSTER=127.0.0.1:9092 scripts/bench.sh restore   # restore time
#     of a host on an empty disk against the changelog's size
#   scripts/bench.sh timers [--timers N]   # a million sends due in a day: memory,
#     then the restart time after a SIGKILL
#   scripts/bench.sh listing [--listing N]   # a million stored invocations, then
#     the latency of filtered GET /invocations pages
#   scripts/bench.sh kafka [--pipeline N] [--seconds S]   # N (500,000) records
#     pre-produced on 6 partitions into Counter/add: records/s, CPU, RSS; then,
#     on a fresh host, a steady 5,000 records/s for S (90) s: p50/p99 from
#     produce to handler (past 60 s, retention forgets as fast as it ingests)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
scripts/build-examples.sh >/dev/null
cargo build --quiet --release -p cairn -p cairn-tests --bin cairn --bin cairn-loadgen
if [ "${1:-}" = wrk ]; then
  # The three HTTP workloads with wrk (32 connections, 20 s each, back to
  # back) against a host on its defaults; its peak memory after each.
  # In cluster mode, CAIRN_BENCH_PARTITIONS partitions (default 1) over
  # CAIRN_BENCH_HOSTS hosts (default 1), the 32 connections split between
  # the hosts' ingresses.
  command -v wrk >/dev/null || { apt-get install -y wrk >/dev/null || { echo "bench.sh: install wrk (apt-get install wrk)" >&2; exit 1; }; }
  dir=$(mktemp -d)
  port=${CAIRN_BENCH_PORT:-18080}
  hosts=${CAIRN_BENCH_HOSTS:-1}
  partitions=${CAIRN_BENCH_PARTITIONS:-1}
  app="bench-$(date +%s%N)"
  pids=()
  trap 'kill -9 "${pids[@]}" 2>/dev/null; rm -rf "$dir"' EXIT
  for h in $(seq 0 $((hosts - 1))); do
    hp=$((port + 10 * h))
    printf 'data_dir = "%s/db%s"\ningress_addr = "127.0.0.1:%s"\nadmin_addr = "127.0.0.1:%s"\n' \
      "$dir" "$h" "$hp" "$((hp + 1))" > "$dir/cairn$h.toml"
    if [ -n "${CAIRN_BENCH_CLUSTER:-}" ]; then
      printf '[cluster]\nbootstrap = "%s"\napp = "%s"\npartitions = %s\n' \
        "$CAIRN_BENCH_CLUSTER" "$app" "$partitions" >> "$dir/cairn$h.toml"
    fi
    "$CARGO_TARGET_DIR/release/cairn" serve --config "$dir/cairn$h.toml" \
      --deploy "$CARGO_TARGET_DIR/examples-wasm/basics.wasm" > "$dir/log$h" 2>&1 &
    pids+=($!)
  done
  # Ready: every host healthy; in cluster mode, every partition served.
  for _ in $(seq 600); do
    served=0 healthy=0
    for h in $(seq 0 $((hosts - 1))); do
      admin="http://127.0.0.1:$((port + 10 * h + 1))"
      curl -sf "$admin/health" >/dev/null && healthy=$((healthy + 1))
      if [ -n "${CAIRN_BENCH_CLUSTER:-}" ]; then
        owners=$(curl -sf "$admin/cluster" 2>/dev/null | grep -o '"role":"owner"' | wc -l || true)
        served=$((served + owners))
      fi
    done
    if [ "$healthy" = "$hosts" ] && { [ -z "${CAIRN_BENCH_CLUSTER:-}" ] || [ "$served" = "$partitions" ]; }; then
      break
    fi
    sleep 0.1
  done
  for workload in steps3 counter-keys counter-hot; do
    echo "== $workload ($hosts host(s), $partitions partition(s))"
    wrks=()
    for h in $(seq 0 $((hosts - 1))); do
      wrk -t1 -c$((32 / hosts)) -d20s --latency -s scripts/wrk/workload.lua \
        "http://127.0.0.1:$((port + 10 * h))" -- "$workload" > "$dir/wrk$h" &
      wrks+=($!)
    done
    wait "${wrks[@]}"
    for h in $(seq 0 $((hosts - 1))); do
      echo "-- host $h"
      grep -E "Requests/sec|^ +(50|99)%|Non-2xx|Socket errors" "$dir/wrk$h"
      echo "host peak memory: $(awk '/VmHWM/ {printf "%.1f MiB", $2 / 1024}' "/proc/${pids[$h]}/status")"
    done
  done
  exit 0
fi
if [ "${1:-}" = restore ]; then
  # Restore time against the changelog's size: a cluster host fills its
  # store with counter-keys under wrk for CAIRN_BENCH_FILL seconds (default
  # 20) and is SIGKILLed; a host started on an empty disk reads the whole
  # changelog into its copy (as a standby, then takes over). Prints the
  # records, the bytes of the changelog on the broker's disk and the time
  # from the host's start to its copy at the head of the log.
  : "${CAIRN_BENCH_CLUSTER:?set CAIRN_BENCH_CLUSTER=127.0.0.1:9092 (start Kafka first)}"
  command -v wrk >/dev/null || { apt-get install -y wrk >/dev/null || { echo "bench.sh: install wrk (apt-get install wrk)" >&2; exit 1; }; }
  dir=$(mktemp -d)
  port=${CAIRN_BENCH_PORT:-18080}
  app="bench-$(date +%s%N)"
  pids=()
  trap 'kill -9 "${pids[@]}" 2>/dev/null; rm -rf "$dir"' EXIT
  start() { # $1: host number
    local hp=$((port + 10 * $1))
    printf 'data_dir = "%s/db%s"\ningress_addr = "127.0.0.1:%s"\nadmin_addr = "127.0.0.1:%s"\n[cluster]\nbootstrap = "%s"\napp = "%s"\n' \
      "$dir" "$1" "$hp" "$((hp + 1))" "$CAIRN_BENCH_CLUSTER" "$app" > "$dir/cairn$1.toml"
    "$CARGO_TARGET_DIR/release/cairn" serve --config "$dir/cairn$1.toml" \
      --deploy "$CARGO_TARGET_DIR/examples-wasm/basics.wasm" > "$dir/log$1" 2>&1 &
    pids+=($!)
    for _ in $(seq 600); do
      curl -sf "http://127.0.0.1:$((hp + 1))/cluster" 2>/dev/null | grep -q '"role":"owner"' && return
      sleep 0.1
    done
    echo "bench.sh: host $1 did not take the partition over" >&2; exit 1
  }
  at() { # the time of the first log line of host $1 matching $2, in seconds
    date -d "$(grep -m1 "$2" "$dir/log$1" | cut -d' ' -f1)" +%s.%N
  }
  start 0
  wrk -t2 -c32 -d"${CAIRN_BENCH_FILL:-20}s" -s scripts/wrk/workload.lua \
    "http://127.0.0.1:$port" -- counter-keys | grep "Requests/sec"
  kill -9 "${pids[0]}"
  logs="${CAIRN_KAFKA_HOME:-$HOME/.cache/cairn-kafka}/data-${CAIRN_BENCH_CLUSTER##*:}/logs"
  bytes=$(du -sb "$logs/cairn.$app.changelog-0" | cut -f1)
  start 1
  reached=$(grep -m1 "reached the head of the changelog" "$dir/log1")
  records=$(echo "$reached" | grep -o 'records=[0-9]*' | grep -o '[0-9]*')
  took=$(awk -v a="$(at 1 "cairn is ready")" -v b="$(at 1 "reached the head of the changelog")" \
    'BEGIN { printf "%.2f", b - a }')
  echo "changelog: $records records, $((bytes / 1024 / 1024)) MiB on the broker's disk"
  echo "an empty copy at the head of the log: $took s after the host's start" \
    "($(awk -v r="$records" -v t="$took" 'BEGIN { printf "%d", r / t }') records/s)"
  exit 0
fi
if [ "${1:-}" = listing ]; then
  shift
  exec "$CARGO_TARGET_DIR/release/cairn-loadgen" --listing 1000000 \
    --host-config 'completed_retention = "1d"' "$@"
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
if [ "${1:-}" = kafka ]; then
  shift
  "$CARGO_TARGET_DIR/release/cairn-loadgen" --pipeline 500000 --seconds 90 "$@"
  exit 0
fi
"$CARGO_TARGET_DIR/release/cairn-loadgen" "$@"
