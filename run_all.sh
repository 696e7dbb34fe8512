#!/usr/bin/env bash
# The main job: execute every notebook with papermill for one profile (default: quick).
#   ./run_all.sh [--profile smoke|quick|paper] [--only 00,03] [--dry-run] [--nproc N]
# Executed notebooks, tables and figures go to results/<profile>/; SUMMARY.md and manifest.json beside them.
# --dry-run: the profile capped to a minimum (every code path, no results) -> results/<profile>-dry-run/.
# --nproc N: N processes on this machine (torchrun --standalone; README: several GPUs or machines).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/ensure_env.sh
export MPLBACKEND=Agg
exec python -m lib.runner "$@"
