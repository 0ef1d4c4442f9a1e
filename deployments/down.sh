#!/usr/bin/env bash
# Stop what deployments/up.sh started (workers first, then the Prefect server, then S3), by the
# process ids it recorded. Data (Prefect database, S3 objects) stays under the run dir.
set -uo pipefail
cd "$(dirname "$0")/.."
RUN_DIR=${LORAFLOW_RUN_DIR:-.loraflow/run}

stop() {
  local name=$1 pidfile="$RUN_DIR/$1.pid"
  [ -f "$pidfile" ] || return 0
  local pid; pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    # up.sh started each service as a session leader: signal its whole group (worker -> flow runs).
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    if kill -0 "$pid" 2>/dev/null; then kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null; fi
    echo "down: $name stopped (pid $pid)"
  fi
  rm -f "$pidfile"
}

for name in worker-cpu worker-gpu prefect-server s3; do stop "$name"; done
