#!/usr/bin/env bash
# GPU smoke run of the real trainer: bf16 + ZeRO-2, full data vs DISSect selection.
# Prints samples/s (median after warm-up) with and without selection and peak GPU memory.
# Usage (repo root, venv installed): bash scripts/gpu_smoke.sh [model] [steps]
set -euo pipefail
MODEL=${1:-ViT-B-32}
STEPS=${2:-60}
NGPU=$(nvidia-smi -L | grep -c GPU)
PY=${PY:-.venv/bin/python}
OUT=${OUT:-/tmp/gpu_smoke}
DATA=$OUT/data
[ -f "$DATA/train/info.json" ] || $PY -m dissect_ds.prepare synthetic --num-samples 20000 --noise-rate 0.3 \
    --seed 0 --val-samples 1000 --image-size 224 --shard-size 1000 --output "$DATA"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for strategy in none dissect_warmup; do
  rm -rf "$OUT/runs/$strategy"
  .venv/bin/deepspeed --num_gpus "$NGPU" --module dissect_ds.train --config configs/debug.yaml \
    model.name="$MODEL" data.train="$DATA/train" data.val="$DATA/val" data.num_workers=6 \
    run.output_dir="$OUT/runs" run.name=$strategy train.steps="$STEPS" train.batch_size=$((256 * NGPU)) \
    train.warmup_steps=10 deepspeed.config=ds_configs/zero2_bf16.json selection.strategy=$strategy \
    selection.rate=0.3 selection.warmup_steps=10 checkpoint.every_steps=0 log.progress=false log.every_steps=20
done
$PY - "$OUT/runs" <<'PY'
import json, statistics, sys
from pathlib import Path
rows = {}
for run in sorted(Path(sys.argv[1]).iterdir()):
    m = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    steady = m[len(m) // 3:]
    rows[run.name] = (statistics.median(r["samples/s"] for r in steady), max(r.get("memory/peak_gib", 0) for r in m))
for name, (sps, mem) in rows.items():
    print(f"{name:16s} samples/s {sps:9.1f}   peak GPU memory {mem:6.2f} GiB")
if {"none", "dissect_warmup"} <= rows.keys():
    print(f"speed-up with selection (rate 0.3): {rows['dissect_warmup'][0] / rows['none'][0]:.2f}x")
PY
