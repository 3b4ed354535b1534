#!/usr/bin/env bash
# Stop the local Ray cluster that cluster/local/start.sh (or submit.sh) started, with its jobs
# and Serve apps; other Ray clusters on this machine are left alone.
#   cluster/local/stop.sh                                   # the cluster in /tmp/flora-cluster
#   FLORA_CLUSTER_DIR=/tmp/other cluster/local/stop.sh
#
# Each node is the session leader of its own session (start.sh runs it under setsid): SIGTERM to
# its process group lets Ray drain and shut the node down; whatever of the session is left after
# FLORA_STOP_GRACE_S (default 20) is killed. All nodes stop at once: the whole cluster goes.
set -uo pipefail
state="${FLORA_CLUSTER_DIR:-/tmp/flora-cluster}"
grace_s="${FLORA_STOP_GRACE_S:-20}"

# session_pids SID: the processes of session SID (a node's `ray start` and everything it spawned).
session_pids() { ps -eo pid=,sid= | awk -v sid="$1" '$2 == sid { print $1 }'; }

# A pid file of a node that died long ago may name another process now: only a session whose
# leader has that pid is ours.
live_sessions=()
shopt -s nullglob
pidfiles=("$state"/worker-*.pid "$state"/head.pi[d])  # [d]: a pattern, so nullglob drops it when absent
if (( ${#pidfiles[@]} == 0 )); then
  echo "no cluster to stop in $state"
  exit 0
fi
for pidfile in "${pidfiles[@]}"; do
  pid="$(cat "$pidfile")"
  if [[ -n "$(session_pids "$pid")" ]]; then
    kill -TERM -- "-$pid" 2>/dev/null
    live_sessions+=("$pid")
  fi
done
left=""
for _ in $(seq 1 $((grace_s * 2))); do
  left="$(for sid in "${live_sessions[@]}"; do session_pids "$sid"; done)"
  [[ -z "$left" ]] && break
  sleep 0.5
done
if [[ -n "$left" ]]; then
  echo "killing what did not stop within ${grace_s} s: $(echo $left)"
  # shellcheck disable=SC2086  # a list of pids
  kill -KILL $left 2>/dev/null
fi
rm -f "${pidfiles[@]}" "$state/gcs_port" "$state/dashboard_url"
echo "stopped the cluster in $state (${#live_sessions[@]} node(s) were running)"
