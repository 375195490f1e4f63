#!/bin/bash
# DISSect CLIP training on CC12M (12,423,374 pairs, 32 epochs, DISSect rate 0.5):
# the authors' recipe at 1,280 pairs per GPU.
#
#   sbatch slurm/train_cc12m.sh                          # 1 node x 8 GPUs
#   sbatch --nodes=4 slurm/train_cc12m.sh                # 32 GPUs: batch, steps, warm-up scale
#   DISSECT_TRAIN_DATA=/data/cc12m/train DISSECT_VAL_DATA=/data/cc12m/val sbatch slurm/train_cc12m.sh
#   sbatch --gpus-per-node=0 --ntasks-per-node=2 --cpus-per-task=4 slurm/train_cc12m.sh  # CPU partition
#
# Environment (defaults from configs/cc12m.yaml unless given): DISSECT_TRAIN_DATA,
# DISSECT_VAL_DATA, DISSECT_OUTPUT_DIR, DISSECT_CONFIG (another config file), DISSECT_EXTRA
# (space-separated key=value overrides, applied last), DISSECT_BATCH_PER_RANK (1280; 0 keeps
# the config's batch and steps), DISSECT_CPU=1 (stay off GPUs), DISSECT_PYTHON, DISSECT_ROOT.
# Preemption and time limits: USR1 arrives 10 min before the end, every rank checkpoints at
# the next step boundary, rank 0 requeues the job, and the requeued job resumes from it.
# Details: docs/cluster.md.
#SBATCH --job-name=dissect-cc12m
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=USR1@600
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

DISSECT_SET=cc12m
DISSECT_SET_SAMPLES=12423374
DISSECT_SET_EPOCHS=32
DISSECT_SET_WARMUP_SAMPLES=$((10000 * 10240))

# SLURM runs a copy of this file from its spool directory: find the repository through the
# path the job was submitted with (or DISSECT_ROOT, or the submit directory).
if [[ -z ${DISSECT_ROOT:-} ]]; then
    script=$(scontrol show job "${SLURM_JOB_ID:-none}" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p' | head -n 1)
    if [[ -n $script && -f $script && -f $(dirname "$script")/common.sh ]]; then
        DISSECT_ROOT=$(cd "$(dirname "$script")/.." && pwd)
    elif [[ -f ${SLURM_SUBMIT_DIR:-.}/slurm/common.sh ]]; then
        DISSECT_ROOT=${SLURM_SUBMIT_DIR:-.}
    else
        DISSECT_ROOT=$(cd "$(dirname "$0")/.." && pwd)
    fi
fi
# shellcheck source=slurm/common.sh
source "$DISSECT_ROOT/slurm/common.sh"
