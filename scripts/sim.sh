#!/usr/bin/env bash
# The fault-injection simulation (tests/sim.rs): seeded random workloads under
# SIGKILLs, failing fsync, client retries, operator actions and a redeploy,
# checked against a model after each run. Starts the Kafka broker if none runs.
#
#   scripts/sim.sh                  # the fixed seeds CI runs
#   scripts/sim.sh --seed 42        # one seed (replay a failure)
#   scripts/sim.sh --minutes 60     # soak: fresh random seeds until the time is up
#   scripts/sim.sh --steps 400 ...  # longer workloads per seed (default 120)
#   scripts/sim.sh --cluster ...    # the same against three cluster hosts
#
# A failing seed prints the command that replays it.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
seeds="" minutes="" steps=120 test=the_guarantees_hold_under_random_schedules_of_faults
while [ $# -gt 0 ]; do
  case "$1" in
    --seed|--seeds) seeds="$2"; shift 2 ;;
    --minutes) minutes="$2"; shift 2 ;;
    --steps) steps="$2"; shift 2 ;;
    --cluster) test=the_guarantees_hold_in_a_three_host_cluster; shift ;;
    *) echo "usage: scripts/sim.sh [--cluster] [--seed N[,N...]] [--minutes M] [--steps S]" >&2; exit 2 ;;
  esac
done
scripts/build-examples.sh >/dev/null
cargo build --quiet -p cairn
# The workload produces to the real broker and subscribes to it.
if ! scripts/kafka.sh status >/dev/null 2>&1; then
  scripts/kafka.sh start
  trap 'scripts/kafka.sh stop' EXIT
fi
cargo test --quiet -p cairn-tests --test sim --no-run
if [ -z "$minutes" ]; then
  if [ -n "$seeds" ]; then export SIM_SEEDS="$seeds"; fi
  SIM_STEPS="$steps" cargo test --quiet -p cairn-tests --test sim -- --nocapture --exact "$test"
  exit 0
fi
end=$(( $(date +%s) + minutes * 60 ))
ran=0
while [ "$(date +%s)" -lt "$end" ]; do
  seed=$(( (RANDOM << 15 | RANDOM) + 1000 ))
  if ! SIM_SEEDS="$seed" SIM_STEPS="$steps" cargo test --quiet -p cairn-tests --test sim -- --nocapture --exact "$test" >"/tmp/cairn-sim-$seed.log" 2>&1; then
    grep -E "panicked|seed" -A3 "/tmp/cairn-sim-$seed.log" | head -40
    echo "sim: seed $seed FAILED after $ran passing seeds; replay: scripts/sim.sh $([ "$test" = the_guarantees_hold_in_a_three_host_cluster ] && echo "--cluster ")--seed $seed --steps $steps (log: /tmp/cairn-sim-$seed.log)"
    exit 1
  fi
  grep -E "^seed $seed: [0-9]" "/tmp/cairn-sim-$seed.log" || true
  rm -f "/tmp/cairn-sim-$seed.log"
  ran=$((ran + 1))
done
echo "sim: $ran seeds in $minutes minutes, every invariant held"
