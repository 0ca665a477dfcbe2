#!/usr/bin/env bash
# Profile the coordinator and one agent pool with py-spy during a bounded load test.
#
#   scripts/profile_loadtest.sh OUT_DIR SECONDS -- <agentmesh loadtest options>
#
# Starts `agentmesh loadtest <options> --no-progress --out OUT_DIR` in the
# background, waits until its coordinator-1 and pool-1 processes exist and the warm-up
# is past, records each for SECONDS with py-spy (100 Hz, non-blocking, idle excluded,
# no line numbers), waits for the load test to finish, and prints the top functions.
# py-spy comes with the `perf` extra: pip install -e '.[perf]'.
set -euo pipefail
out=$1; secs=$2; shift 2; [[ ${1:-} == -- ]] && shift
py=${PYTHON:-.venv/bin/python}
spy=${PYSPY:-.venv/bin/py-spy}
mkdir -p "$out"
.venv/bin/agentmesh loadtest "$@" --no-progress --out "$out" >"$out/loadtest.txt" 2>&1 &
lt=$!
trap 'kill -TERM "$lt" 2>/dev/null || true' EXIT
find_child() {  # the load test's child whose command line ends with "$1"
  { ps --ppid "$lt" -o pid=,args= || true; } | awk -v id="$1" '$0 ~ ("--(node-id|pool-id) " id "( |$)") {print $1}'
}
for _ in $(seq 1 300); do
  coord=$(find_child coordinator-1); pool=$(find_child pool-1)
  [[ -n $coord && -n $pool ]] && grep -q "^steady\|agents:" "$out/loadtest.txt" 2>/dev/null && break
  sleep 0.2
done
sleep "${SETTLE_S:-6}"  # past cluster start, agent spawn and the warm-up task
"$spy" record --pid "$coord" --duration "$secs" --rate 100 ${PYSPY_MODE---nonblocking} --nolineno ${PYSPY_ARGS:-} \
  --format raw -o "$out/coordinator.txt" >"$out/pyspy-coordinator.log" 2>&1 &
s1=$!
"$spy" record --pid "$pool" --duration "$secs" --rate 100 ${PYSPY_MODE---nonblocking} --nolineno ${PYSPY_ARGS:-} \
  --format raw -o "$out/pool.txt" >"$out/pyspy-pool.log" 2>&1 &
s2=$!
wait "$s1" "$s2" || true
wait "$lt" || true
trap - EXIT
tail -n 60 "$out/loadtest.txt"
for p in coordinator pool; do "$py" scripts/pyspy_top.py "$out/$p.txt" --top 20; done
