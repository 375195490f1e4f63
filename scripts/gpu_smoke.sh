#!/usr/bin/env bash
# GPU smoke run of the real trainer: bf16 + ZeRO-2, full data vs DISSect selection.
# Prints samples/s (median after warm-up) with and without selection, the data loader's
# share of a step, and peak GPU memory.
#
#   bash scripts/gpu_smoke.sh [model] [steps]      # repo root; default ViT-B-32, 60 steps
#
# PY: the Python to use (default the venv's, else python3: e.g. a GPU image with the wheels of
# scripts/offline_wheels.sh installed). GPU_SMOKE_DIR: data and runs (default /tmp/gpu_smoke).
set -uo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-ViT-B-32}
STEPS=${2:-60}
PY=${PY:-.venv/bin/python}
[[ -x "$PY" ]] || PY=python3
NGPU=$(nvidia-smi -L | grep -c GPU)
DIR=${GPU_SMOKE_DIR:-/tmp/gpu_smoke}
DATA=$DIR/data
WORKERS=$(( $(nproc) / NGPU - 2 > 1 ? $(nproc) / NGPU - 2 : 1 ))
# Small stored images (64 px, upscaled by the train transform): the data set is written in
# seconds and decoding keeps up with one GPU, so the timing is the trainer's, not the disk's.
[ -f "$DATA/train/info.json" ] || "$PY" -m dissect_ds.prepare synthetic --num-samples 8000 --noise-rate 0.3 \
    --seed 0 --val-samples 1000 --image-size 64 --shard-size 250 --output "$DATA" || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for strategy in none dissect_warmup; do
  rm -rf "$DIR/runs/$strategy"
  # One run failing (or diverging: exit 3) still lets the other run and the summary print.
  "$PY" -m deepspeed.launcher.runner --num_gpus "$NGPU" --module dissect_ds.train --config configs/debug.yaml \
    model.name="$MODEL" data.train="$DATA/train" data.val="$DATA/val" data.num_workers="$WORKERS" \
    run.output_dir="$DIR/runs" run.name=$strategy train.steps="$STEPS" train.batch_size=$((256 * NGPU)) \
    train.lr=5e-4 train.warmup_steps=10 deepspeed.config=ds_configs/zero2_bf16.json selection.strategy=$strategy \
    selection.rate=0.3 selection.warmup_steps=10 checkpoint.every_steps=0 log.progress=false log.every_steps=20 \
    || echo "gpu_smoke: the $strategy run failed (exit $?)"
done
"$PY" - "$DIR/runs" <<'PY'
import json, statistics, sys
from pathlib import Path
rows = {}
for run in sorted(Path(sys.argv[1]).iterdir()):
    m = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    if not m:
        continue
    steady = m[len(m) // 3:]
    data = statistics.median(r["time/data"] / r["time/step"] for r in steady)
    rows[run.name] = (statistics.median(r["samples/s"] for r in steady), max(r.get("memory/peak_gib", 0) for r in m), data)
for name, (sps, mem, data) in rows.items():
    print(f"{name:16s} samples/s {sps:9.1f}   data wait {100 * data:4.1f}% of a step   peak GPU memory {mem:6.2f} GiB")
if {"none", "dissect_warmup"} <= rows.keys():
    print(f"speed-up with selection (rate 0.3): {rows['dissect_warmup'][0] / rows['none'][0]:.2f}x")
PY
