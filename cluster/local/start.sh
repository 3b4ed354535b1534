#!/usr/bin/env bash
# Start a Ray cluster on this machine: a head and N worker nodes, each a separate `ray start`,
# all on 127.0.0.1. Stop it with cluster/local/stop.sh (same FLORA_CLUSTER_DIR).
#   cluster/local/start.sh                    # a head only, using every CPU
#   cluster/local/start.sh --workers 2 --cpus 2 --resources '{"trainer": 1}'
#   RAY_ADDRESS=http://127.0.0.1:8265 cluster/local/submit.sh jobs/finetune.py ...
#
# Options (each also as an environment variable):
#   --workers N          worker nodes besides the head           FLORA_WORKERS (0)
#   --cpus C             CPUs each node offers                   FLORA_NUM_CPUS (all of them)
#   --resources JSON     custom resources each node offers       FLORA_NODE_RESOURCES ({})
#   --port P             the head's GCS port                     FLORA_RAY_PORT (6379)
#   --dashboard-port P   dashboard + job API (RAY_ADDRESS)       FLORA_DASHBOARD_PORT (8265)
#   --dir DIR            state: node temp dirs, pid files, logs  FLORA_CLUSTER_DIR (/tmp/flora-cluster)
#
# Every node runs `ray start --block` as the leader of its own session, so that stop.sh can end
# exactly this cluster's processes (its session and process group) without a machine-wide
# `ray stop`, which would also end every other Ray cluster on the machine. Each node has its own
# temp dir: the head's holds prom_metrics_service_discovery.json for Prometheus.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH="$PWD/${VENV:-.venv}/bin:$PATH"
if [[ -f ~/.ray/auth_token ]]; then export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"; fi

workers="${FLORA_WORKERS:-0}"
cpus="${FLORA_NUM_CPUS:-}"
resources="${FLORA_NODE_RESOURCES:-}"
gcs_port="${FLORA_RAY_PORT:-6379}"
dashboard_port="${FLORA_DASHBOARD_PORT:-8265}"
state="${FLORA_CLUSTER_DIR:-/tmp/flora-cluster}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --workers) workers="$2"; shift 2 ;;
    --cpus) cpus="$2"; shift 2 ;;
    --resources) resources="$2"; shift 2 ;;
    --port) gcs_port="$2"; shift 2 ;;
    --dashboard-port) dashboard_port="$2"; shift 2 ;;
    --dir) state="$2"; shift 2 ;;
    *) echo "unknown option $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
cpus="${cpus:-$(nproc)}"

mkdir -p "$state"
state="$(cd "$state" && pwd)"
# Ray puts Unix sockets under <temp dir>/session_<timestamp>_<pid>/sockets/; their paths must stay
# under the kernel's 107-byte limit, which a long temp dir overruns with a cryptic error.
if (( ${#state} > 40 )); then
  echo "--dir $state is ${#state} characters; Ray's socket paths need it at most 40 (e.g. /tmp/flora-cluster)" >&2
  exit 2
fi
if compgen -G "$state/*.pid" >/dev/null; then
  echo "$state already holds a cluster (its *.pid files); stop it first: FLORA_CLUSTER_DIR=$state cluster/local/stop.sh" >&2
  exit 1
fi

# On SIGTERM a node first drains (lets Serve move traffic off it) for up to this long; on one
# machine there is nowhere to move it, so stop.sh need not wait Ray's 30 s default.
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-3}"

# free_ports N: N distinct ports nothing listens on now (all held open while choosing).
free_ports() {
  python - "$1" <<'PY'
import socket, sys
held = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in held:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in held))
PY
}

# Every listener gets its own port so that several nodes (and other clusters) share the machine;
# workers bind random ports (--min-worker-port=0).
node_ports() {
  local p; read -ra p <<<"$(free_ports 6)"
  echo "--node-manager-port=${p[0]} --object-manager-port=${p[1]} --metrics-export-port=${p[2]} \
--dashboard-agent-listen-port=${p[3]} --dashboard-agent-grpc-port=${p[4]} --runtime-env-agent-port=${p[5]} \
--min-worker-port=0 --max-worker-port=0"
}

# start_node NAME ARGS...: `ray start --block` in a new session; waits until the node is up.
start_node() {
  local name="$1"; shift
  local log="$state/$name.log"
  # shellcheck disable=SC2046  # node_ports is a list of flags
  setsid ray start --block --node-ip-address=127.0.0.1 --temp-dir="$state/$name" \
    --num-cpus="$cpus" ${resources:+--resources="$resources"} --disable-usage-stats \
    $(node_ports) "$@" >"$log" 2>&1 </dev/null &
  local pid=$!
  echo "$pid" >"$state/$name.pid"
  for _ in $(seq 1 600); do
    if grep -qs "Ray runtime started" "$log"; then
      echo "$name: pid $pid, log $log"
      return 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "$name did not start; the end of $log:" >&2
      tail -n 30 "$log" >&2
      return 1
    fi
    sleep 0.5
  done
  echo "$name did not start within 300 s; see $log" >&2
  return 1
}

trap 'echo "start failed; stopping what started" >&2; FLORA_CLUSTER_DIR="$state" cluster/local/stop.sh' ERR
start_node head --head --port="$gcs_port" --ray-client-server-port="$(free_ports 1)" \
  --dashboard-host=127.0.0.1 --dashboard-port="$dashboard_port"
for i in $(seq 1 "$workers"); do
  start_node "worker-$i" --address="127.0.0.1:$gcs_port"
done
# "Ray runtime started" comes before the dashboard (the job API) listens; `ray job submit` and
# `serve deploy` right after would be refused. Any HTTP answer (401 with token auth) means it is up.
dashboard_up() {
  python - "$dashboard_port" <<'PY'
import sys, urllib.error, urllib.request
try:
    urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/api/version", timeout=2)
except urllib.error.HTTPError:
    pass
except OSError:
    sys.exit(1)
PY
}
for _ in $(seq 1 120); do dashboard_up && break; sleep 0.5; done
dashboard_up || { echo "the dashboard did not answer on port $dashboard_port within 60 s; see $state/head.log" >&2; false; }
trap - ERR

echo "$gcs_port" >"$state/gcs_port"
echo "http://127.0.0.1:$dashboard_port" >"$state/dashboard_url"
cat <<EOF
Ray cluster up: a head and $workers worker node(s), $cpus CPU(s) each, state in $state
  dashboard and job API:  export RAY_ADDRESS=http://127.0.0.1:$dashboard_port
  Prometheus targets:     $state/head/prom_metrics_service_discovery.json
  stop:                   FLORA_CLUSTER_DIR=$state cluster/local/stop.sh
EOF
