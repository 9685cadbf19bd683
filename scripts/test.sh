#!/usr/bin/env bash
# Run every test: unit tests, and the end-to-end tests against the real
# `cairn` binary with the example modules compiled to WebAssembly and a real
# Apache Kafka broker (started here if none runs, and stopped afterwards).
# Installs what it needs (the wasm32-wasip2 target, Kafka's jars, Chromium
# and its WebDriver for the console test) on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
scripts/build-examples.sh
cargo build -p cairn
if ! command -v chromedriver >/dev/null; then
  echo "test.sh: installing chromium and chromium-driver (the console test drives them)" >&2
  apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 ||
    { apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; } ||
    { echo "test.sh: install chromium and chromium-driver (Debian packages)" >&2; exit 1; }
fi
if ! scripts/kafka.sh status >/dev/null 2>&1; then
  scripts/kafka.sh start
  trap 'scripts/kafka.sh stop' EXIT
fi
cargo test --workspace --all-targets
