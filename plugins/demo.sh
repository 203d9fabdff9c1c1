#!/usr/bin/env bash
# The main job on one machine with no broker: builds the example agents and
# the orch binary, installs agents as plugins (Rust and JavaScript), runs
# tasks by plugin name, and shows what the host reports when an agent hits a
# limit. Data goes to $ORCH_HOME; by default a fresh target/demo-home, so the
# demo does not touch ~/.orch.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash plugins/build.sh
cargo build --quiet --release -p orch
if [ -z "${ORCH_HOME:-}" ]; then
    export ORCH_HOME=$root/target/demo-home
    rm -rf "$ORCH_HOME"
fi
orch=target/release/orch
p=target/plugins

step() { printf '\n$ %s\n' "$*"; "$@" || printf '(exit code %s)\n' "$?"; }

step $orch plugin install $p/wordcount.wasm --yes
step $orch plugin install $p/counter.wasm --yes
step $orch plugin install $p/wordcount-js.wasm --yes
step $orch plugin list
step $orch run wordcount --input README.md
echo
step $orch run wordcount-js --input README.md --output json
step $orch run counter
echo
step $orch run counter
echo
printf '\n$ echo "hello from orch" | %s run %s/echo.wasm --input -\n' "$orch" "$p"
echo "hello from orch" | $orch run $p/echo.wasm --input -
step $orch run $p/spin.wasm --fuel 10000000
step $orch run $p/spin.wasm --fuel 10000000000 --timeout 250ms
step $orch run $p/hog.wasm --memory 32MiB
printf '\n$ echo -n "out of coffee" | %s run %s/panic.wasm --input -\n' "$orch" "$p"
echo -n "out of coffee" | $orch run $p/panic.wasm --input - || printf '(exit code %s)\n' "$?"
