#!/usr/bin/env bash
# GPU check (issue 16): on one GPU, within about 8 minutes,
#   1. the paper profile's dry run over every notebook, on CUDA, on tiny files written in each dataset's real
#      on-disk format (tests/fixtures/datasets.py) with random stand-ins for the published ImageNet weights;
#      its SUMMARY.md (peak memory per notebook, paper-scale estimate) is copied to results/gpu-check/;
#   2. lib.gpu_check: one timed paper-scale epoch of SFM's U-Net, IDFR's denoiser, EDSR and ARN on synthetic
#      tensors of the paper's shapes and batch sizes, and PGD-100 on 1,000 CIFAR-10-shaped images, as a table.
# Usage: scripts/gpu_check.sh [--tiny]   (--tiny: step 2 with narrow networks, e.g. to try the script on a CPU)
#   GPU_CHECK_DRY_RUN_S  seconds the dry run may take before it is stopped (default 360; its summary says where)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/ensure_env.sh
export MPLBACKEND=Agg
if ! python -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  echo "note: no CUDA device: everything runs on the CPU, and its times and memory say nothing about a GPU"
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python - "$work" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "tests")
from fixtures import datasets as fixture
root = Path(sys.argv[1])
fixture.write_datasets(root / "data")
fixture.write_imagenet_weights(root / "torch", root / "data")
fixture.kernel_startup(root / "ipython", root / "data")
PY
export ADV_DATA_ROOT="$work/data" ADV_RESULTS_DIR="$work/results" ADV_CACHE_DIR="$work/cache" \
       IPYTHONDIR="$work/ipython" TORCH_HOME="$work/torch" ADV_DATA_DOWNLOAD=0

echo "== 1. paper dry run (stopped after ${GPU_CHECK_DRY_RUN_S:-360} s) =="
start=$SECONDS
status=0
timeout --signal=TERM "${GPU_CHECK_DRY_RUN_S:-360}" python -m lib.runner --profile paper --dry-run || status=$?
echo "paper dry run: exit status $status after $((SECONDS - start)) s"
mkdir -p results/gpu-check
for f in SUMMARY.md manifest.json; do
  if [ -f "$work/results/paper-dry-run/$f" ]; then cp "$work/results/paper-dry-run/$f" "results/gpu-check/dry-run-$f"; fi
done
if [ -f results/gpu-check/dry-run-SUMMARY.md ]; then cat results/gpu-check/dry-run-SUMMARY.md; fi

echo "== 2. timed paper-scale epochs and PGD-100 =="
python -m lib.gpu_check "$@" | tee results/gpu-check/timings.md
exit "$status"
