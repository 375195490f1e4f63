#!/bin/bash
# DISSect CLIP training on SLURM: the authors' recipe at 1,280 pairs per GPU. One script for
# every data set; train_cc3m.sh, train_cc12m.sh and train_yfcc15m.sh are links to it, and the
# name a job is submitted under picks the data set and its recipe (or pass it: train.sh cc12m).
#
#   sbatch slurm/train_cc12m.sh                          # 1 node x 8 GPUs
#   sbatch --nodes=4 slurm/train_cc12m.sh                # 32 GPUs: batch, steps, warm-up scale
#   DISSECT_TRAIN_DATA=/data/cc12m/train DISSECT_VAL_DATA=/data/cc12m/val sbatch slurm/train_cc12m.sh
#   sbatch --gpus-per-node=0 --ntasks-per-node=2 --cpus-per-task=4 slurm/train_cc12m.sh  # CPU partition
#
# Environment (defaults from configs/<set>.yaml unless given): DISSECT_TRAIN_DATA,
# DISSECT_VAL_DATA, DISSECT_OUTPUT_DIR, DISSECT_CONFIG (another config file), DISSECT_EXTRA
# (space-separated key=value overrides, applied last), DISSECT_BATCH_PER_RANK (1280; 0 keeps
# the config's batch and steps), DISSECT_CPU=1 (stay off GPUs), DISSECT_PYTHON, DISSECT_ROOT.
# Preemption and time limits: USR1 arrives 10 min before the end, every rank checkpoints at
# the next step boundary, rank 0 requeues the job, and the requeued job resumes from it.
# Details: docs/cluster.md.
#SBATCH --job-name=dissect
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=USR1@600
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

# SLURM runs a copy of this file from its spool directory: find the path the job was
# submitted with, hence the repository (else DISSECT_ROOT, or the submit directory).
script=$(scontrol show job "${SLURM_JOB_ID:-none}" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p' | head -n 1)
script=${script:-$0}
if [[ -z ${DISSECT_ROOT:-} ]]; then
    if [[ -f $(dirname "$script")/common.sh ]]; then
        DISSECT_ROOT=$(cd "$(dirname "$script")/.." && pwd)
    else
        DISSECT_ROOT=${SLURM_SUBMIT_DIR:-.}
    fi
fi
name=$(basename "$script" .sh)
DISSECT_SET=${1:-${DISSECT_SET:-${name#train_}}}
# shellcheck source=slurm/common.sh
source "$DISSECT_ROOT/slurm/common.sh"
