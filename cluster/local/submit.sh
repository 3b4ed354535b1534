#!/usr/bin/env bash
# Submit a job script to Ray with `ray job submit`, streaming its log until it ends.
#   cluster/local/submit.sh jobs/finetune.py [--config jobs/configs/default.yaml] [key=value ...]
# Uses the cluster at $RAY_ADDRESS; without one, starts a local head on 127.0.0.1 (stop it with
# cluster/local/stop.sh). Runs and the MLflow store go to $FLORA_STORAGE (default ./runs).
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH="$PWD/${VENV:-.venv}/bin:$PATH"
# Ray writes ~/.ray/auth_token when token auth is on; its CLI then needs the mode named.
if [[ -f ~/.ray/auth_token ]]; then export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"; fi

if [[ -z "${RAY_ADDRESS:-}" ]]; then
  if ! ray status --address 127.0.0.1:6379 >/dev/null 2>&1; then
    echo "starting a local Ray head on 127.0.0.1"
    ray start --head --node-ip-address=127.0.0.1 --port=6379 --dashboard-host=127.0.0.1 \
      --dashboard-port=8265 --num-cpus="${FLORA_NUM_CPUS:-$(nproc)}" --disable-usage-stats >/dev/null
  fi
  export RAY_ADDRESS=http://127.0.0.1:8265
fi

export FLORA_STORAGE="${FLORA_STORAGE:-$PWD/runs}"
export MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-sqlite:///$FLORA_STORAGE/mlflow.db}"
[[ "$FLORA_STORAGE" == *://* ]] || mkdir -p "$FLORA_STORAGE"
runtime_env=$(printf '{"env_vars": {"FLORA_STORAGE": "%s", "MLFLOW_TRACKING_URI": "%s"}, "py_modules": ["platform/flora_platform"]}' \
  "$FLORA_STORAGE" "$MLFLOW_TRACKING_URI")
exec ray job submit --working-dir . --runtime-env-json "$runtime_env" -- python "$@"
