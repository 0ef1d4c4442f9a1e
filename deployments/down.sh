#!/usr/bin/env bash
# Stop what deployments/up.sh (and `make serve`) started, by the process ids they recorded in
# $LORAFLOW_RUN_DIR, in dependency order: `make serve`'s service, the workers, the Prefect server,
# then S3 (each needs the ones after it while it shuts down). Data (Prefect database, S3 objects)
# stays where it is.
#
# Each process gets the signal it shuts down cleanly on: the workers SIGINT, which is what
# `prefect worker start` does on Ctrl-C (it turns a first SIGTERM into SIGINT too): stop polling,
# deregister, exit; an idle worker is gone in a few seconds. The server, rclone and uvicorn take
# SIGTERM. A worker with flow runs in flight waits for them; after STOP_TIMEOUT seconds (default 30)
# its process group (the flow-run processes) gets SIGTERM, and whatever is still alive STOP_TIMEOUT
# seconds after that is killed, and named. Exit 0 when everything stopped on its own, 1 when
# something had to be killed.
set -uo pipefail
cd "$(dirname "$0")/.."
RUN_DIR=${LORAFLOW_RUN_DIR:-.loraflow/run}
STOP_TIMEOUT=${STOP_TIMEOUT:-30}
started=$SECONDS
rc=0
any=0

# What each pid file's process must look like: a pid file left by a crash may name a pid that the
# system has since given to something else, which is not ours to signal.
declare -A LOOKS_LIKE=([serve]="loraflow serve" [worker-cpu]="worker start" [worker-gpu]="worker start"
                       [prefect-server]="server start" [s3]="serve s3")

# alive PID: running, and not a zombie (exited, waiting for its parent to reap it: stopped).
alive() { local st; st=$(ps -o stat= -p "$1" 2>/dev/null) && [ -n "$st" ] && [ "${st:0:1}" != Z ]; }
# family PID: PID, its descendants and the rest of its session (up.sh starts every service as a
# session leader); flow-run processes may start sessions of their own, so descendants count too.
family() {
  ps -e -o pid=,ppid=,sid= | awk -v root="$1" '
    { pid[NR] = $1; ppid[NR] = $2; sid[NR] = $3 }
    END {
      keep[root] = 1
      for (changed = 1; changed; ) {
        changed = 0
        for (i = 1; i <= NR; i++)
          if (!(pid[i] in keep) && (ppid[i] in keep || sid[i] == root)) { keep[pid[i]] = 1; changed = 1 }
      }
      for (p in keep) print p
    }'
}
# left PID...: which of these pids are still alive
left() { local p; for p in "$@"; do alive "$p" && echo "$p"; done; }

wait_gone() {  # wait_gone SECONDS PID...: 0 when none of the pids is alive before the deadline
  local deadline=$((SECONDS + $1)); shift
  while [ $SECONDS -lt $deadline ]; do
    [ -z "$(left "$@")" ] && return 0
    sleep 0.2
  done
  [ -z "$(left "$@")" ]
}

# stop SIGNAL NAME...: signal each running service, wait, escalate for what is left.
stop() {
  local sig=$1; shift
  local name pid pidfile names=() pids=() all=()
  declare -A fam=()
  for name in "$@"; do
    pidfile="$RUN_DIR/$name.pid"
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    if alive "$pid" && ps -o args= -p "$pid" | grep -q -- "${LOOKS_LIKE[$name]}"; then
      fam[$name]=$(family "$pid" | tr '\n' ' ')
      kill "-$sig" "$pid" 2>/dev/null
      names+=("$name"); pids+=("$pid"); any=1
      # shellcheck disable=SC2206
      all+=(${fam[$name]})
    else
      echo "down: $name was not running"
      rm -f "$pidfile"
    fi
  done
  [ ${#pids[@]} -eq 0 ] && return
  local t0=$SECONDS i rest forced=()
  if ! wait_gone "$STOP_TIMEOUT" "${all[@]}"; then
    for i in "${!names[@]}"; do
      # shellcheck disable=SC2086
      rest=$(left ${fam[${names[$i]}]} | tr '\n' ' ')
      [ -n "$rest" ] || continue
      echo "down: ${names[$i]} still running after ${STOP_TIMEOUT}s (flow runs in flight?): SIGTERM to pids $rest"
      forced[$i]=1
      # shellcheck disable=SC2086
      kill -TERM $rest 2>/dev/null
    done
    wait_gone "$STOP_TIMEOUT" "${all[@]}"
  fi
  for i in "${!names[@]}"; do
    # shellcheck disable=SC2086
    rest=$(left ${fam[${names[$i]}]} | tr '\n' ' ')
    if [ -n "$rest" ]; then
      # shellcheck disable=SC2086
      kill -KILL $rest 2>/dev/null
      echo "down: ${names[$i]} (pid ${pids[$i]}) did not stop: killed pids $rest"
      rc=1
    else
      echo "down: ${names[$i]} stopped (pid ${pids[$i]}, $([ -n "${forced[$i]:-}" ] && echo "SIGTERM after SIG${sig}" || echo "SIG${sig}"), $((SECONDS - t0))s)"
    fi
    rm -f "$RUN_DIR/${names[$i]}.pid"
  done
}

stop TERM serve
stop INT worker-cpu worker-gpu
stop TERM prefect-server
stop TERM s3
if [ $any -eq 0 ]; then
  echo "down: nothing to stop"
else
  echo "down: done in $((SECONDS - started))s"
fi
exit $rc
