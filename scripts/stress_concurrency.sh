#!/usr/bin/env bash
# The tests marked `concurrency` (two writers, processes or threads meeting at a lease, an event or a file) run
# ROUNDS times in a row on a loaded machine: one busy process per core at normal priority beside the suite's own
# test processes. A test that decided its outcome by a sleep or by when a log line appears fails here sooner or
# later; one that meets at a synchronisation point passes every round, only slower.
#
#   scripts/stress_concurrency.sh [ROUNDS=20] [LOG_DIR=stress-logs]
#
# Prints a line per round (passed / failed counts, wall seconds) and a last line `N of N rounds passed`; exits 1 if
# any round failed (its whole log stays in LOG_DIR). Extra pytest arguments go in $PYTEST_ARGS.
set -uo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-20}
logs=${2:-stress-logs}
mkdir -p "$logs"
py=.venv/bin/python
cores=$($py -c 'import os; print(len(os.sched_getaffinity(0)))')

burners=()
stop_burners() { [ ${#burners[@]} -gt 0 ] && kill "${burners[@]}" 2>/dev/null; wait 2>/dev/null; }
trap stop_burners EXIT
for _ in $(seq "$cores"); do
  $py -c 'while True: pass' &
  burners+=($!)
done
echo "load: $cores busy processes (one per core this process may use), pids ${burners[*]}"

passed_rounds=0
for r in $(seq "$rounds"); do
  t0=$(date +%s)
  OMP_NUM_THREADS=1 $py -m pytest -q -m concurrency -p no:cacheprovider ${PYTEST_ARGS:-} >"$logs/round-$r.log" 2>&1
  rc=$?
  summary=$(tail -n 1 "$logs/round-$r.log")
  echo "round $r/$rounds: rc=$rc, $(( $(date +%s) - t0 )) s, $(cut -d' ' -f1-3 /proc/loadavg) load: $summary"
  [ "$rc" = 0 ] && passed_rounds=$((passed_rounds + 1))
done
echo "$passed_rounds of $rounds rounds passed"
[ "$passed_rounds" = "$rounds" ]
