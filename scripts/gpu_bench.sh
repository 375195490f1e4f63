#!/usr/bin/env bash
# The accuracy benchmark's comparison (make bench's default matrix: none / random /
# small_loss / current_score / dissect_warmup at 0% and 40% noise, 5 paired seeds) at a
# larger scale on one GPU: a bigger model and images, more pairs. Sized (by estimate) to
# finish in about 8 minutes on one H200.
#
#   bash scripts/gpu_bench.sh            # GPU scale; page + plots under $GPU_BENCH_DIR (default runs/gpu_bench)
#   TINY=1 bash scripts/gpu_bench.sh     # a tiny CPU setting that checks the script end to end
#
# PY: the Python to use (default the venv's, else python3: e.g. a GPU image with the wheels of
# scripts/offline_wheels.sh installed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[[ -x "$PY" ]] || PY=python3
DIR=${GPU_BENCH_DIR:-runs/gpu_bench}
if [[ "${TINY:-0}" == 1 ]]; then
  MATRIX="--quick --no-world2-check"  # as at GPU scale: one device, no 2-rank repeat
  SCALE='{"train": 128, "epochs": 2, "batch": 32, "val": 48, "onepass_train": 128, "eval_points": 1}'
else
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  # 12 runs side by side on the one GPU (each decodes its own images on one of 16 CPU cores);
  # no 2-rank check.
  MATRIX="--parallel 12 --no-world2-check"
  SCALE='{"model": "dissect-bench-vit-gpu", "image_size": 32, "train": 8192, "epochs": 24, "batch": 512,
          "lr": 0.002, "warmup_epochs": 6, "val": 3840, "eval_points": 8, "onepass_train": 65536, "shard": 1024}'
fi
# shellcheck disable=SC2086
"$PY" -m benchmarks.accuracy $MATRIX --scale "$SCALE" --out "$DIR" --work "$DIR/work"
