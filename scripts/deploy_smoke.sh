#!/usr/bin/env bash
# Operate dcae15 the way a user would with Prefect deployments, on this machine only:
# a real `prefect server start` on 127.0.0.1, a process work pool, `prefect deploy --all` from prefect.yaml, a triggered
# pipeline run (tiny config) and a triggered checkpoint evaluation, each executed by `prefect worker start --run-once`;
# then the artifacts are checked. Exit status 0 = all good. Takes ~2-3 minutes on 2 cores.
#
#   scripts/deploy_smoke.sh            # uses .venv/bin/{python,prefect}; WORK=<dir> keeps the files for a look
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
PY="$BIN/python"
PREFECT="$BIN/prefect"
WORK=${WORK:-$(mktemp -d -t dcae15-deploy-XXXXXX)}
mkdir -p "$WORK"
POOL=dcae15-process
ROOT="$WORK/root"
export PREFECT_HOME="$WORK/prefect-home" PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_SERVER_UI_ENABLED=false
export PREFECT_RESULTS_LOCAL_STORAGE_PATH="$WORK/prefect-results"
unset PREFECT_API_URL
say() { printf '\n== %s\n' "$*"; }

PORT=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
say "prefect server start on 127.0.0.1:$PORT (log: $WORK/server.log)"
"$PREFECT" server start --host 127.0.0.1 --port "$PORT" >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
trap 'kill $SERVER_PID 2>/dev/null || true; wait $SERVER_PID 2>/dev/null || true' EXIT
export PREFECT_API_URL="http://127.0.0.1:$PORT/api"
"$PY" - <<PYEOF
import time, urllib.request
for _ in range(120):
    try:
        urllib.request.urlopen("$PREFECT_API_URL/health", timeout=2).read(); break
    except Exception:
        time.sleep(1)
else:
    raise SystemExit("prefect server did not become healthy in 120 s; see $WORK/server.log")
PYEOF

say "work pool + deployments"
"$PREFECT" work-pool create "$POOL" --type process --overwrite
"$PREFECT" --no-prompt deploy --all
"$PREFECT" deployment ls
"$PREFECT" deployment schedule ls 'evaluate_new_checkpoints/evaluate-new-checkpoints' | tee "$WORK/schedules.txt"
grep -q '0 \* \* \* \*' "$WORK/schedules.txt" || { echo "the evaluation deployment has no cron schedule"; exit 1; }

# trigger a deployment, then run a worker until that flow run is finished (--run-once takes one run per start)
run_deployment() {
  local name=$1; shift
  local out id
  out=$("$PREFECT" deployment run "$name" "$@")
  echo "$out"
  id=$(printf '%s\n' "$out" | grep -oE '[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}' | head -n1)
  for _ in 1 2 3; do
    "$PREFECT" worker start --pool "$POOL" --run-once --type process >>"$WORK/worker.log" 2>&1 || true
    state=$("$PY" -c "
from prefect.client.orchestration import get_client
print(get_client(sync_client=True).read_flow_run('$id').state.type.value)")
    [ "$state" = COMPLETED ] && { echo "flow run $id: COMPLETED"; return 0; }
    [ "$state" = FAILED ] || [ "$state" = CRASHED ] && break
  done
  echo "flow run $id of $name ended in state $state; worker log: $WORK/worker.log"; tail -n 60 "$WORK/worker.log"; exit 1
}

say "run the pipeline deployment (tiny config, root $ROOT)"
run_deployment 'pipeline/pipeline' --param root="$ROOT" --param config=tiny
say "run the checkpoint-evaluation deployment"
run_deployment 'evaluate_new_checkpoints/evaluate-new-checkpoints' --param root="$ROOT" --param config=tiny

say "check the artifacts"
"$PY" - <<PYEOF
import glob
from dcae15.metrics.results import format_table, read_results
root = "$ROOT"
stores = glob.glob(f"{root}/latents/*/")
runs = glob.glob(f"{root}/runs/diffusion/*/checkpoints/step-*")
table = read_results(f"{root}/eval/results")
print(format_table(table))
print(f"stores: {len(stores)}, checkpoints: {len(runs)}, result rows: {len(table)}")
if not stores or not runs:
    raise SystemExit("missing latent store or checkpoints")
steps = sorted(set(int(s) for s in table["step"]))
if len(steps) < 2:
    raise SystemExit(f"evaluate_new_checkpoints scored no further checkpoint (steps with rows: {steps})")
print("deploy smoke: OK")
PYEOF
