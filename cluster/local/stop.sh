#!/usr/bin/env bash
# Stop the local Ray head (and its jobs) that cluster/local/submit.sh started.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH="$PWD/${VENV:-.venv}/bin:$PATH"
ray stop
