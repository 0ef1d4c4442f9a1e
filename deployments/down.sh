#!/usr/bin/env bash
# Stop what deployments/up.sh started, by the process ids it recorded: every service's process group
# gets SIGTERM at once (workers pass it on to their flow runs), then up to STOP_TIMEOUT seconds to
# exit; whatever is still running then is killed, and says so. Data (Prefect database, S3 objects)
# stays where it is.
set -uo pipefail
cd "$(dirname "$0")/.."
RUN_DIR=${LORAFLOW_RUN_DIR:-.loraflow/run}
STOP_TIMEOUT=${STOP_TIMEOUT:-15}
NAMES=(worker-cpu worker-gpu prefect-server s3)
declare -A PIDS
started=$SECONDS

for name in "${NAMES[@]}"; do
  pidfile="$RUN_DIR/$name.pid"
  [ -f "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    PIDS[$name]=$pid
    # up.sh started each service as a session leader: signal its whole group (worker -> flow runs).
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
  else
    echo "down: $name was not running"
    rm -f "$pidfile"
  fi
done
[ ${#PIDS[@]} -eq 0 ] && { echo "down: nothing to stop"; exit 0; }
echo "down: stopping ${!PIDS[*]} (up to ${STOP_TIMEOUT}s)"

deadline=$((SECONDS + STOP_TIMEOUT))
while [ $SECONDS -lt $deadline ]; do
  alive=0
  for name in "${!PIDS[@]}"; do kill -0 "${PIDS[$name]}" 2>/dev/null && alive=1; done
  [ $alive -eq 0 ] && break
  sleep 0.2
done

rc=0
for name in "${NAMES[@]}"; do
  [ -n "${PIDS[$name]:-}" ] || continue
  pid=${PIDS[$name]}
  if kill -0 "$pid" 2>/dev/null; then
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null
    echo "down: $name (pid $pid) did not stop within ${STOP_TIMEOUT}s: killed"
    rc=1
  else
    echo "down: $name stopped (pid $pid)"
  fi
  rm -f "$RUN_DIR/$name.pid"
done
echo "down: done in $((SECONDS - started))s"
exit $rc
