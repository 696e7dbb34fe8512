#!/usr/bin/env bash
# The test command: creates the environment if missing, then runs pytest (extra arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/ensure_env.sh
# Tests use tiny models: one thread each avoids OpenMP oversubscription (papermill kernels inherit this).
export MPLBACKEND=Agg ADV_DATA_DOWNLOAD="${ADV_DATA_DOWNLOAD:-0}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export ADV_CACHE_DIR="${ADV_CACHE_DIR:-$(mktemp -d)/cache}"
exec python -m pytest "$@"
