#!/usr/bin/env bash
# Deploy a flora Serve application with `serve deploy` and wait until it answers; it keeps serving
# until cluster/local/stop.sh (or `serve shutdown`).
#   cluster/local/serve.sh [serve_apps/flora.yaml]
# Uses the cluster whose dashboard is $RAY_ADDRESS (http://host:8265, as for `ray job submit`);
# without one, starts a local head with cluster/local/start.sh.
# FLORA_SERVE_PORT changes the HTTP port of the config (default: the config's, 8000).
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH="$PWD/${VENV:-.venv}/bin:$PATH"
if [[ -f ~/.ray/auth_token ]]; then export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"; fi
config="${1:-serve_apps/flora.yaml}"
[[ -f "$config" ]] || { echo "no Serve config at $config" >&2; exit 2; }

if [[ -z "${RAY_ADDRESS:-}" ]]; then
  if ! ray status --address "127.0.0.1:${FLORA_RAY_PORT:-6379}" >/dev/null 2>&1; then
    echo "starting a local Ray head on 127.0.0.1"
    cluster/local/start.sh >/dev/null
  fi
  export RAY_ADDRESS="http://127.0.0.1:${FLORA_DASHBOARD_PORT:-8265}"
fi
# The serve CLI reads $RAY_DASHBOARD_ADDRESS, not $RAY_ADDRESS, and falls back to localhost:8265,
# which may be another cluster on this machine: name the address every time.
dashboard="${RAY_DASHBOARD_ADDRESS:-$RAY_ADDRESS}"

if [[ -n "${FLORA_SERVE_PORT:-}" ]]; then
  patched="$(mktemp --suffix=.yaml)"
  trap 'rm -f "$patched"' EXIT
  python - "$config" "$patched" "$FLORA_SERVE_PORT" <<'PY'
import sys, yaml
config = yaml.safe_load(open(sys.argv[1]))
config.setdefault("http_options", {})["port"] = int(sys.argv[3])
yaml.safe_dump(config, open(sys.argv[2], "w"), sort_keys=False)
PY
  config="$patched"
fi
url=$(python -c 'import sys, yaml
h = yaml.safe_load(open(sys.argv[1])).get("http_options") or {}
print("http://%s:%s" % (h.get("host", "127.0.0.1"), h.get("port", 8000)))' "$config")

# A head that has just started may not serve its dashboard (the deploy API) yet.
for _ in $(seq 1 120); do
  python -c 'import sys, urllib.error, urllib.request
try:
    urllib.request.urlopen(sys.argv[1] + "/api/version", timeout=2)
except urllib.error.HTTPError:
    pass  # an answer (401 with token auth): the dashboard is up' "$dashboard" 2>/dev/null && break
  sleep 1
done
serve deploy --address "$dashboard" "$config"
# The first deployment of the embedded default may build the base model (a few minutes).
echo "waiting for the application (serve status every 10 s)"
for i in $(seq 1 900); do
  status=$(serve status --address "$dashboard" 2>/dev/null | python -c 'import sys, yaml
apps = (yaml.safe_load(sys.stdin) or {}).get("applications") or {}
print(" ".join("%s=%s" % (name, a.get("status")) for name, a in apps.items()))' || true)
  case "$status" in
    *DEPLOY_FAILED*|*UNHEALTHY*) serve status --address "$dashboard"; exit 1 ;;
    *=*) [[ "$status" =~ ^([^ ]+=RUNNING ?)+$ ]] && break ;;
  esac
  (( i % 10 == 0 )) && echo "  $status"
  sleep 1
done
[[ "$status" =~ ^([^ ]+=RUNNING ?)+$ ]] || { serve status --address "$dashboard"; echo "not running after 15 minutes" >&2; exit 1; }
echo "serving on ${url/0.0.0.0/127.0.0.1}/v1 ($status)"
