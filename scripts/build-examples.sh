#!/usr/bin/env bash
# Build the example handler modules to WebAssembly components.
# Installs the wasm32-wasip2 target if missing. Output: $TARGET/examples-wasm/*.wasm
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET="${CARGO_TARGET_DIR:-$PWD/target}"
rustup target add wasm32-wasip2 >/dev/null 2>&1 || rustup target add wasm32-wasip2
out="$TARGET/examples-wasm"
mkdir -p "$out"
# Quiet unless CAIRN_BUILD_PROGRESS is set (scripts/dev.sh shows progress).
quiet=--quiet
if [ -n "${CAIRN_BUILD_PROGRESS:-}" ]; then quiet=; fi
build() { # package, output name, extra cargo args
  [ -z "$quiet" ] && echo "build-examples.sh: $2" >&2
  cargo build $quiet --target wasm32-wasip2 --profile wasm -p "$1" "${@:3}"
  cp "$TARGET/wasm32-wasip2/wasm/$1.wasm" "$out/$2.wasm"
}
build basics basics
build basics basics-v2 --features v2
build coordination coordination
build coordination coordination-v2 --features v2
build sim sim-v2 --features v2
# The pattern examples (docs/patterns.md), the simulation's handlers and the
# hostile guests of the security tests, in one cargo run.
patterns=(burst reminders inventory dispatcher enrichment payments signup orders sim hostile)
[ -z "$quiet" ] && echo "build-examples.sh: ${patterns[*]}" >&2
cargo build $quiet --target wasm32-wasip2 --profile wasm "${patterns[@]/#/-p}"
for p in "${patterns[@]}"; do cp "$TARGET/wasm32-wasip2/wasm/$p.wasm" "$out/$p.wasm"; done
ls -1 "$out"/*.wasm
