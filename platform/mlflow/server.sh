#!/usr/bin/env bash
# The MLflow tracking server and model registry beside the Ray cluster.
#   platform/mlflow/server.sh start      # in the background; UI and API on http://127.0.0.1:5000
#   platform/mlflow/server.sh status     # answers /health?
#   platform/mlflow/server.sh stop
#   platform/mlflow/server.sh run        # in the foreground (a container's command)
#   platform/mlflow/server.sh command    # print the `mlflow server` command line and exit
# then: MLFLOW_TRACKING_URI=http://127.0.0.1:5000 cluster/local/submit.sh jobs/finetune.py ...
#
# Settings, as options after the command or environment variables:
#   --host H                  FLORA_MLFLOW_HOST           127.0.0.1 (loopback only)
#   --port P                  FLORA_MLFLOW_PORT           5000
#   --backend-store-uri URI   FLORA_MLFLOW_BACKEND_URI    sqlite:///<storage>/mlflow.db, the store
#                             `make finetune` writes; or postgresql://user:password@host:5432/db
#   --artifacts-destination U FLORA_MLFLOW_ARTIFACTS      <storage>/mlartifacts; or s3://bucket/prefix
#                             (an S3-compatible store: also set MLFLOW_S3_ENDPOINT_URL and the
#                             AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY of that store)
#   --allowed-hosts LIST      FLORA_MLFLOW_ALLOWED_HOSTS  MLflow's default: localhost and private IPs;
#                             name the host clients use when it is neither (e.g. a Kubernetes
#                             service: flora-mlflow,flora-mlflow:5000)
#   --workers N               FLORA_MLFLOW_WORKERS        2
#   --state-dir DIR           FLORA_MLFLOW_DIR            <storage>/mlflow-server: server.pid, server.log
# where <storage> is $FLORA_STORAGE if it is a local path, else ./runs (as cluster/local/submit.sh).
#
# The server runs as the leader of its own session, so that stop ends it and every worker it
# forked, and nothing else.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH="$PWD/${VENV:-.venv}/bin:$PATH"
# MLflow's job runner (GenAI evaluation jobs) forks eight more processes; tracking and the
# registry do not use it.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"

usage() { sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; }
action="${1:-}"
[[ -n "$action" ]] && shift
storage="${FLORA_STORAGE:-$PWD/runs}"
[[ "$storage" == *://* ]] && storage="$PWD/runs"
host="${FLORA_MLFLOW_HOST:-127.0.0.1}"
port="${FLORA_MLFLOW_PORT:-5000}"
backend="${FLORA_MLFLOW_BACKEND_URI:-sqlite:///$storage/mlflow.db}"
artifacts="${FLORA_MLFLOW_ARTIFACTS:-$storage/mlartifacts}"
allowed_hosts="${FLORA_MLFLOW_ALLOWED_HOSTS:-}"
workers="${FLORA_MLFLOW_WORKERS:-2}"
state="${FLORA_MLFLOW_DIR:-$storage/mlflow-server}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --host) host="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --backend-store-uri) backend="$2"; shift 2 ;;
    --artifacts-destination) artifacts="$2"; shift 2 ;;
    --allowed-hosts) allowed_hosts="$2"; shift 2 ;;
    --workers) workers="$2"; shift 2 ;;
    --state-dir) state="$2"; shift 2 ;;
    *) echo "unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
done
pidfile="$state/server.pid"
logfile="$state/server.log"
# What clients on this machine dial: a wildcard bind still answers on loopback.
case "$host" in 0.0.0.0 | "::" | "[::]") url="http://127.0.0.1:$port" ;; *) url="http://$host:$port" ;; esac

server_command() {
  cmd=(mlflow server --host "$host" --port "$port" --workers "$workers"
       --backend-store-uri "$backend" --artifacts-destination "$artifacts")
  [[ -n "$allowed_hosts" ]] && cmd+=(--allowed-hosts "$allowed_hosts")
  return 0
}

# Fail before starting, with the fix, rather than with a stack trace in the log.
check_stores() {
  case "$backend" in
    postgresql*) python -c "import psycopg2" 2>/dev/null \
      || { echo "--backend-store-uri $backend needs psycopg2: pip install psycopg2-binary (or '.[cloud]')" >&2; exit 2; } ;;
    sqlite:///*) mkdir -p "$(dirname "${backend#sqlite:///}")" ;;
  esac
  case "$artifacts" in
    s3://*) python -c "import boto3" 2>/dev/null \
      || { echo "--artifacts-destination $artifacts needs boto3: pip install boto3 (or '.[cloud]')" >&2; exit 2; } ;;
    *://*) ;;
    *) mkdir -p "$artifacts" ;;
  esac
}

healthy() { python - "$url/health" <<'PY'
import sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=2) as r:
        sys.exit(0 if r.status == 200 else 1)
except OSError:
    sys.exit(1)
PY
}

session_pids() { ps -eo pid=,sid= | awk -v sid="$1" '$2 == sid { print $1 }'; }
running_pid() {
  [[ -f "$pidfile" ]] || return 1
  local pid; pid="$(cat "$pidfile")"
  [[ -n "$(session_pids "$pid")" ]] && echo "$pid"
}

case "$action" in
  command)
    server_command
    printf '%q ' "${cmd[@]}"; echo
    ;;
  run)
    check_stores
    server_command
    exec "${cmd[@]}"
    ;;
  start)
    if pid="$(running_pid)"; then echo "already running (pid $pid) at $url"; exit 0; fi
    if healthy; then echo "another server already answers at $url; pick another --port" >&2; exit 1; fi
    check_stores
    mkdir -p "$state"
    server_command
    setsid "${cmd[@]}" >"$logfile" 2>&1 </dev/null &
    pid=$!
    echo "$pid" >"$pidfile"
    for _ in $(seq 1 240); do
      if healthy; then
        echo "MLflow at $url (pid $pid; backend $backend; artifacts $artifacts; log $logfile)"
        exit 0
      fi
      if [[ -z "$(session_pids "$pid")" ]]; then
        echo "the MLflow server exited; the end of $logfile:" >&2
        tail -n 30 "$logfile" >&2
        rm -f "$pidfile"
        exit 1
      fi
      sleep 0.5
    done
    echo "the MLflow server did not answer $url/health within 120 s; see $logfile" >&2
    exit 1
    ;;
  stop)
    if ! pid="$(running_pid)"; then echo "no MLflow server running from $state"; rm -f "$pidfile"; exit 0; fi
    kill -TERM -- "-$pid" 2>/dev/null || true
    for _ in $(seq 1 20); do
      [[ -z "$(session_pids "$pid")" ]] && break
      sleep 0.5
    done
    left="$(session_pids "$pid")"
    # shellcheck disable=SC2086  # a list of pids
    if [[ -n "$left" ]]; then kill -KILL $left 2>/dev/null || true; fi
    rm -f "$pidfile"
    echo "MLflow server stopped (pid $pid)"
    ;;
  status)
    if pid="$(running_pid)" && healthy; then echo "running (pid $pid) at $url"; exit 0; fi
    echo "not running at $url"
    exit 1
    ;;
  *)
    usage
    exit 2
    ;;
esac
