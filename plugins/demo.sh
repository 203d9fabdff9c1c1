#!/usr/bin/env bash
# The main job on one machine with no broker: builds the example agents and
# the orch binary, installs agents as plugins (Rust and JavaScript), starts a
# host (`orch host start`), submits tasks to it by capability (one of them,
# text.report, has the planner agent call text.wordcount for each section),
# shows the host's status and task list, then stops the host with SIGTERM.
# With --serve the host keeps running in the foreground until Ctrl-C.
# Data goes to $ORCH_HOME; by default a fresh target/demo-home, so the demo
# does not touch ~/.orch.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
# Builds the workspace too (target/release/orch), as the test command needs it.
bash plugins/build.sh
if [ -z "${ORCH_HOME:-}" ]; then
    export ORCH_HOME=$root/target/demo-home
    rm -rf "$ORCH_HOME"
fi
orch=target/release/orch
p=target/plugins

step() { printf '\n$ %s\n' "$*"; "$@" || printf '(exit code %s)\n' "$?"; }

step $orch plugin install $p/wordcount.wasm --yes
step $orch plugin install $p/wordcount-js.wasm --yes
step $orch plugin install $p/planner.wasm --yes
step $orch plugin install $p/counter.wasm --yes

# The host prints its address on its first line and publishes it in
# $ORCH_HOME/host.json, where the CLI finds it.
printf '\n$ %s host start --listen 127.0.0.1:0 &\n' "$orch"
coproc HOST { exec $orch host start --listen 127.0.0.1:0; }
host_pid=$HOST_PID
trap 'kill -TERM $host_pid 2>/dev/null || true' EXIT
read -r banner <&"${HOST[0]}"
echo "$banner"

doc=$root/target/demo-doc.md
printf '# Sandbox\nEvery task runs in a fresh instance.\n# Limits\nFuel, memory and time are capped per task.\n# Teams\nAgents call other agents by capability.\n' > "$doc"

step $orch status
step $orch task submit --capability text.wordcount --input README.md --wait
echo
step $orch task submit --capability text.report --input "$doc" --wait
echo
step $orch task submit --capability counter --wait
echo
id=$($orch task submit --capability text.wordcount --input ARCHITECTURE.md --priority 5)
printf '\n$ %s task submit --capability text.wordcount --input ARCHITECTURE.md --priority 5\n%s\n' "$orch" "$id"
step $orch task get "$id" --wait
step $orch task submit --capability image.resize --input README.md
step $orch task list

if [ "${1:-}" = --serve ]; then
    trap - EXIT
    printf '\nThe host keeps serving (Ctrl-C stops it); try `ORCH_HOME=%s %s status`.\n' "$ORCH_HOME" "$orch"
    wait "$host_pid"
    exit 0
fi

printf '\n$ kill -TERM %s\n' "$host_pid"
kill -TERM "$host_pid"
wait "$host_pid" || true
trap - EXIT

# Limits, on single runs of test fixtures.
step $orch run $p/spin.wasm --fuel 10000000
step $orch run $p/hog.wasm --memory 32MiB
