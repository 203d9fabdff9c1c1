#!/usr/bin/env bash
# The main job on one machine with no broker: builds the example agents and
# the orch binary, then runs tasks through `orch run` and shows what the host
# reports when an agent hits a limit. Data goes to $ORCH_HOME
# (default: target/demo-home, so the demo does not touch ~/.orch).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash plugins/build.sh
cargo build --quiet --release -p orch
export ORCH_HOME=${ORCH_HOME:-$root/target/demo-home}
orch=target/release/orch
p=target/plugins

step() { printf '\n$ %s\n' "$*"; "$@" || printf '(exit code %s)\n' "$?"; }

step $orch inspect $p/wordcount.wasm
step $orch run $p/wordcount.wasm --input README.md
echo
printf '\n$ echo "hello from orch" | %s run %s/echo.wasm --input -\n' "$orch" "$p"
echo "hello from orch" | $orch run $p/echo.wasm --input -
step $orch run $p/counter.wasm --output json
step $orch run $p/counter.wasm --output json
step $orch run $p/spin.wasm --fuel 10000000
step $orch run $p/spin.wasm --fuel 10000000000 --timeout 250ms
step $orch run $p/hog.wasm --memory 32MiB
printf '\n$ echo -n "out of coffee" | %s run %s/panic.wasm --input -\n' "$orch" "$p"
echo -n "out of coffee" | $orch run $p/panic.wasm --input - || printf '(exit code %s)\n' "$?"
