#!/usr/bin/env bash
# Operate dcae15 the way a lab would with Prefect deployments, on this machine only:
# a real `prefect server start` on 127.0.0.1, a process work pool, `prefect deploy --all` from prefect.yaml (with the
# evaluate-checkpoint event trigger and the hourly sweep), one long-running worker, a triggered pipeline run (tiny
# config). Then, with nothing else started by hand: every checkpoint the training commits emits
# dcae15.checkpoint.saved, the trigger starts an evaluate-checkpoint run per event, and each writes its result row.
# The hourly sweep, run once by hand, must then add no row (one checkpoint scored twice = one row). Artifacts,
# flow-run names and the table are checked through the Prefect client (scripts/deploy_checks.py).
# Last, a worker is SIGKILLed mid-training: the heartbeat automation (deploy/automations.yaml) must mark the run
# Crashed, and its rerun must resume from the checkpoint (SKIP_ZOMBIE=1 skips this part, ~3 min).
# Exit status 0 = all good. Takes ~6-8 minutes on 2 shared cores.
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
# server and worker each in their own process group, so that cleanup also ends the flow-run processes they started
setsid "$PREFECT" server start --host 127.0.0.1 --port "$PORT" >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
WORKER_PID=
cleanup() {
  local pid
  for pid in $WORKER_PID $SERVER_PID; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  for _ in $(seq 20); do
    kill -0 $WORKER_PID $SERVER_PID 2>/dev/null || break
    sleep 0.5
  done
  for pid in $WORKER_PID $SERVER_PID; do kill -KILL -- "-$pid" 2>/dev/null || true; done
}
trap cleanup EXIT
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

CHECK="$PY scripts/deploy_checks.py"
COLUMNS=250 "$PREFECT" automation ls | tee "$WORK/automations.txt"
grep -q 'evaluate-checkpoint-on-save' "$WORK/automations.txt" || { echo "the checkpoint trigger was not created"; exit 1; }

say "one process worker (one flow run at a time; log: $WORK/worker.log)"
setsid "$PREFECT" worker start --pool "$POOL" --type process --limit 1 >"$WORK/worker.log" 2>&1 &
WORKER_PID=$!
fail() { echo "$*"; echo "--- worker log tail"; tail -n 80 "$WORK/worker.log"; exit 1; }

# trigger a deployment and wait (through the API) until the worker has finished it
run_deployment() {
  local name=$1; shift
  local out id
  out=$("$PREFECT" deployment run "$name" "$@")
  echo "$out"
  id=$(printf '%s\n' "$out" | grep -oE '[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}' | head -n1)
  $CHECK wait-run "$id" --timeout 1200 || fail "deployment $name did not complete"
}

say "run the pipeline deployment (tiny config, root $ROOT)"
run_deployment 'run_pipeline/pipeline' --param root="$ROOT" --param config=tiny

say "the checkpoint events start the evaluate-checkpoint deployment by themselves"
$CHECK wait-triggered "$ROOT" --timeout 900 || fail "event-triggered evaluation did not happen"
ROWS=$($CHECK rows "$ROOT")

say "the hourly sweep, run once now: every checkpoint is scored already, so no new row"
run_deployment 'evaluate_new_checkpoints/evaluate-new-checkpoints' --param root="$ROOT" --param config=tiny

say "check rows, artifacts and flow-run names through the API"
$CHECK check "$ROOT" --rows "$ROWS" || fail "checks failed"

if [ "${SKIP_ZOMBIE:-0}" != 1 ]; then
  say "a worker killed mid-training: heartbeats stop, the zombie automation marks the run Crashed, a rerun resumes"
  "$PY" deploy/apply.py --gpu-host no-gpu-slot-in-this-smoke   # the automations of deploy/automations.yaml
  "$PY" - <<PYEOF
import yaml
from flows.config import load_config
cfg = load_config("tiny", {"root": "$ROOT", "diffusion": {"train": {"steps": 400, "checkpoint_every": 20}}}).to_dict()
open("$WORK/long.yaml", "w").write(yaml.safe_dump(cfg))
PYEOF
  STORE=$(ls -d "$ROOT"/latents/*/ | head -n1)
  train_args=(--param store="${STORE%/}" --param backbone=DiT-tiny --param root="$ROOT" --param config="$WORK/long.yaml")
  out=$("$PREFECT" deployment run 'train_diffusion/train-diffusion' "${train_args[@]}")
  id=$(printf '%s\n' "$out" | grep -oE '[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}' | head -n1)
  $CHECK kill-worker "$id" "$WORKER_PID" --timeout 240 | tee "$WORK/kill.txt" || fail "the killed run did not end Crashed"
  STEP=$(grep -oE 'checkpoint step [0-9]+' "$WORK/kill.txt" | grep -oE '[0-9]+$')
  setsid "$PREFECT" worker start --pool "$POOL" --type process --limit 1 >>"$WORK/worker.log" 2>&1 &
  WORKER_PID=$!
  out=$("$PREFECT" deployment run 'train_diffusion/train-diffusion' "${train_args[@]}")
  id=$(printf '%s\n' "$out" | grep -oE '[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}' | head -n1)
  $CHECK wait-run "$id" --timeout 900 || fail "the rerun of the killed training did not complete"
  $CHECK resumed "$id" "$STEP" || fail "the rerun did not resume from the checkpoint"
fi
echo "deploy smoke: OK"
