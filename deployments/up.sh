#!/usr/bin/env bash
# Start loraflow's local stack on loopback: an S3-compatible server (rclone serve s3), a Prefect
# server with its UI, one worker per work pool (cpu, gpu), and apply deployments/prefect.yaml with
# its schedules paused (they train the seed recipe; a local stack runs only what its user starts).
# Everything it starts is recorded in $LORAFLOW_RUN_DIR/*.pid; deployments/down.sh stops it. It ends
# with the UI's URL, the deployments and the command that starts a run.
#
# Knobs (environment): LORAFLOW_HOME (~/.cache/loraflow: the store, caches; the workers and
# $LORAFLOW_RUN_DIR/env use the same), LORAFLOW_RUN_DIR (.loraflow/run), PREFECT_PORT (4200),
# S3_PORT (9000), S3_ROOT ($LORAFLOW_HOME/s3: the same local store as `make demo` and `loraflow
# storage serve`), S3_BUCKET (loraflow), AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (default: the
# local store's generated pair), VENV (.venv, relative to the checkout or absolute).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=$(cd "${VENV:-.venv}" && pwd)
PY="$VENV/bin/python"
PREFECT="$VENV/bin/prefect"
RUN_DIR=$(mkdir -p "${LORAFLOW_RUN_DIR:-.loraflow/run}" && cd "${LORAFLOW_RUN_DIR:-.loraflow/run}" && pwd)
PREFECT_PORT=${PREFECT_PORT:-4200}
S3_PORT=${S3_PORT:-9000}
# Absolute, so the workers, `make serve` and a shell that sources the env file use this one store.
LORAFLOW_HOME=$("$PY" -c "from loraflow.paths import home; print(home().resolve())")
export LORAFLOW_HOME
S3_ROOT=${S3_ROOT:-$LORAFLOW_HOME/s3}
S3_BUCKET=${S3_BUCKET:-loraflow}

export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 TOKENIZERS_PARALLELISM=false
export PREFECT_LOGGING_EXTRA_LOGGERS=loraflow PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW=ignore
export PREFECT_HOME="$RUN_DIR/prefect-home"           # this stack's database, not ~/.prefect
export PREFECT_API_URL="http://127.0.0.1:$PREFECT_PORT/api"
# The local store's own key pair (generated once, LORAFLOW_HOME/s3-credentials.json, mode 0600).
read -r LOCAL_KEY LOCAL_SECRET < <("$PY" -c "from loraflow.storage.local import local_credentials; print(*local_credentials())")
export AWS_ACCESS_KEY_ID=${AWS_ACCESS_KEY_ID:-$LOCAL_KEY}
export AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY:-$LOCAL_SECRET}
export LORAFLOW_STORAGE__ENDPOINT_URL="http://127.0.0.1:$S3_PORT"
export LORAFLOW_STORAGE__REGION=us-east-1
export LORAFLOW_STORAGE__BUCKET="$S3_BUCKET"

running() { [ -f "$RUN_DIR/$1.pid" ] && kill -0 "$(cat "$RUN_DIR/$1.pid")" 2>/dev/null; }

# start NAME CMD...: in its own session (so down.sh can stop it with its children), logs to NAME.log.
# A non-interactive shell starts background commands with SIGINT ignored, and an ignored signal
# stays ignored across exec: `prefect worker start` would then shrug off the SIGINT that stops it
# cleanly (and turn a SIGTERM into a SIGKILL of itself). The exec wrapper restores the default.
start() {
  local name=$1; shift
  if running "$name"; then echo "up: $name already running (pid $(cat "$RUN_DIR/$name.pid"))"; return; fi
  setsid "$PY" -c 'import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execvp(sys.argv[1], sys.argv[1:])' \
    "$@" >"$RUN_DIR/$name.log" 2>&1 < /dev/null &
  echo $! >"$RUN_DIR/$name.pid"
  echo "up: $name started (pid $!, log $RUN_DIR/$name.log)"
}

wait_for() {  # wait_for WHAT SECONDS CMD...
  local what=$1 limit=$2; shift 2
  local deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then echo "up: $what did not come up within ${limit}s" >&2; return 1; fi
    sleep 1
  done
}

mkdir -p "$S3_ROOT/$S3_BUCKET" "$PREFECT_HOME"
RCLONE=$("$PY" -c "from loraflow.storage.local import find_rclone; print(find_rclone())")
# The key pair through the environment, not argv, which any local user can read (ps); rclone reads
# every flag from RCLONE_<FLAG>, and this one is CSV, hence the inner quotes.
export RCLONE_AUTH_KEY="\"$AWS_ACCESS_KEY_ID,$AWS_SECRET_ACCESS_KEY\""
start s3 "$RCLONE" serve s3 "$S3_ROOT" --addr "127.0.0.1:$S3_PORT" --config /dev/null --dir-cache-time 1s
unset RCLONE_AUTH_KEY
wait_for "S3 server on :$S3_PORT" 30 "$PY" -c "import socket; socket.create_connection(('127.0.0.1', $S3_PORT), 1)"

# The demo recipe's model and reviews in the store, so `retrain-demo` (the UI's Quick run) works.
"$PY" -m loraflow.demo --assets-only >"$RUN_DIR/demo-assets.log" 2>&1 \
  || { echo "up: putting the demo assets into the store failed, see $RUN_DIR/demo-assets.log" >&2; exit 1; }
echo "up: demo model and reviews are in s3://$S3_BUCKET (models/, datasets/)"

start prefect-server "$PREFECT" server start --host 127.0.0.1 --port "$PREFECT_PORT"
# The server answers /api/health after ~20 s on 2 cores; allow for a loaded machine.
wait_for "Prefect server on :$PREFECT_PORT" 180 "$PY" -c \
  "import urllib.request; urllib.request.urlopen('$PREFECT_API_URL/health', timeout=2)"

for pool in cpu gpu; do
  "$PREFECT" work-pool inspect "$pool" >/dev/null 2>&1 || "$PREFECT" work-pool create "$pool" --type process >/dev/null
done
# One training job at a time per GPU machine; raise it with more GPU workers.
"$PREFECT" work-pool set-concurrency-limit gpu 1 >/dev/null

# prefect.yaml's schedules are for real sites; here they are applied paused (local_stack.py says why).
"$PY" deployments/local_stack.py paused-copy deployments/prefect.yaml "$RUN_DIR/prefect.local.yaml"
# From the checkout: the deployments' pull step records this directory, where the entrypoints live.
"$PREFECT" --no-prompt deploy --all --prefect-file "$RUN_DIR/prefect.local.yaml" >"$RUN_DIR/deploy.log" 2>&1 \
  || { echo "up: prefect deploy failed, see $RUN_DIR/deploy.log" >&2; exit 1; }
"$PY" deployments/local_stack.py settle "$RUN_DIR/prefect.local.yaml"

start worker-cpu "$PREFECT" worker start --pool cpu --type process --name "local-cpu"
start worker-gpu "$PREFECT" worker start --pool gpu --type process --name "local-gpu"

# It holds the store's secret: created owner-only (mktemp makes 0600 files) and renamed into place,
# so no other user can read it at any moment, whatever mode an older env file had.
ENV_TMP=$(mktemp "$RUN_DIR/.env.XXXXXX")
{
  echo "# source this file to talk to the local stack (loraflow CLI, prefect CLI); written by deployments/up.sh"
  printf 'export PATH=%q:"$PATH"\n' "$VENV/bin"
  printf 'export LORAFLOW_HOME=%q\n' "$LORAFLOW_HOME"
  printf 'export PREFECT_API_URL=%q\n' "$PREFECT_API_URL"
  printf 'export PREFECT_HOME=%q\n' "$PREFECT_HOME"
  echo "export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 PREFECT_LOGGING_EXTRA_LOGGERS=loraflow PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW=ignore"
  printf 'export LORAFLOW_STORAGE__ENDPOINT_URL=%q\n' "$LORAFLOW_STORAGE__ENDPOINT_URL"
  echo "export LORAFLOW_STORAGE__REGION=us-east-1"
  printf 'export LORAFLOW_STORAGE__BUCKET=%q\n' "$S3_BUCKET"
  printf 'export AWS_ACCESS_KEY_ID=%q\n' "$AWS_ACCESS_KEY_ID"
  printf 'export AWS_SECRET_ACCESS_KEY=%q\n' "$AWS_SECRET_ACCESS_KEY"
} >"$ENV_TMP"
mv -f "$ENV_TMP" "$RUN_DIR/env"

echo "up: S3 endpoint  http://127.0.0.1:$S3_PORT (bucket $S3_BUCKET, files under $S3_ROOT)"
"$PY" deployments/local_stack.py summary --run-dir "$RUN_DIR" --root "$ROOT" --ui "http://127.0.0.1:$PREFECT_PORT"
