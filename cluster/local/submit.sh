#!/usr/bin/env bash
# Submit a job script to Ray with `ray job submit`, streaming its log until it ends.
#   cluster/local/submit.sh jobs/finetune.py [--config jobs/configs/default.yaml] [key=value ...]
# Uses the cluster at $RAY_ADDRESS (its dashboard, http://host:8265); without one, starts a local
# head on 127.0.0.1 with cluster/local/start.sh (stop it with cluster/local/stop.sh).
# The job gets $FLORA_STORAGE (runs and checkpoints: a local path or s3://) and $MLFLOW_TRACKING_URI
# through its runtime env. On the local head they default to ./runs and a sqlite store in it;
# against a remote cluster only values set here are passed, else the cluster's own environment
# (its image or pod spec) applies: a path on this machine means nothing there.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH="$PWD/${VENV:-.venv}/bin:$PATH"
# Ray writes ~/.ray/auth_token when token auth is on; its CLI then needs the mode named.
if [[ -f ~/.ray/auth_token ]]; then export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"; fi

# Whether something answers on the port, first: `ray status` retries for most of a minute when nothing does.
listening() { python -c 'import socket, sys; s = socket.socket(); s.settimeout(1); sys.exit(s.connect_ex(("127.0.0.1", int(sys.argv[1]))))' "$1"; }

if [[ -z "${RAY_ADDRESS:-}" ]]; then
  port="${FLORA_RAY_PORT:-6379}"
  if ! { listening "$port" && ray status --address "127.0.0.1:$port" >/dev/null 2>&1; }; then
    echo "starting a local Ray head on 127.0.0.1"
    cluster/local/start.sh >/dev/null
  fi
  export RAY_ADDRESS="http://127.0.0.1:${FLORA_DASHBOARD_PORT:-8265}"
  export FLORA_STORAGE="${FLORA_STORAGE:-$PWD/runs}"
  export MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-sqlite:///$FLORA_STORAGE/mlflow.db}"
  [[ "$FLORA_STORAGE" == *://* ]] || mkdir -p "$FLORA_STORAGE"
fi

env_vars=$(python - <<'PY'
import json, os
print(json.dumps({k: os.environ[k] for k in ("FLORA_STORAGE", "MLFLOW_TRACKING_URI") if os.environ.get(k)}))
PY
)
runtime_env=$(printf '{"env_vars": %s, "py_modules": ["platform/flora_platform"]}' "$env_vars")
exec ray job submit --working-dir . --runtime-env-json "$runtime_env" -- python "$@"
