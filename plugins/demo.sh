#!/usr/bin/env bash
# The main job on one machine with no broker: builds the example agents and
# the orch binary, installs agents as plugins (Rust and JavaScript), starts a
# host (`orch host start`), submits tasks to it by capability (one of them,
# text.report, has the planner agent call text.wordcount for each section),
# runs workflows (plugins/workflows/: an order that completes, one that is
# compensated, a document pipeline), shows the host's status and task list,
# then stops the host with SIGTERM.
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
# The workflow example's agents: a shop in JavaScript, a document splitter
# and aggregator in Python.
step $orch plugin install $p/shop-js.wasm --yes
step $orch plugin install $p/docs-py.wasm --yes

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

# Workflows (plugins/workflows/): an order that completes, and one whose
# card is declined, so its reservation is released again (compensated).
step $orch workflow register plugins/workflows/order.toml
step $orch workflow register plugins/workflows/pipeline.toml
printf '{"id":"A-1","sku":"lamp","count":2,"amount":40,"card":"visa","address":"1 Main St"}' > "$root/target/demo-order-ok.json"
printf '{"id":"A-2","sku":"lamp","count":3,"amount":60,"card":"declined","address":"1 Main St"}' > "$root/target/demo-order-declined.json"
ok=$($orch workflow run order --input "$root/target/demo-order-ok.json")
printf '\n$ %s workflow run order --input target/demo-order-ok.json\n%s\n' "$orch" "$ok"
declined=$($orch workflow run order --input "$root/target/demo-order-declined.json")
printf '\n$ %s workflow run order --input target/demo-order-declined.json\n%s\n' "$orch" "$declined"
step $orch workflow get "$ok" --wait
step $orch workflow get "$declined" --wait
# The stock of lamps: 100, less the 2 of the completed order only.
step $orch task submit --capability shop.stock --input <(printf lamp) --wait
echo
python3 -c 'import json,sys; print(json.dumps({"text": open(sys.argv[1]).read()}))' "$doc" > "$root/target/demo-pipeline.json"
step $orch workflow run pipeline --input "$root/target/demo-pipeline.json" --wait
step $orch workflow runs

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
