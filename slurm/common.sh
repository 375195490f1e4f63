# shellcheck shell=bash
# The body of slurm/train.sh (sourced, not submitted). The caller sets DISSECT_SET (config
# name: configs/$DISSECT_SET.yaml) and DISSECT_ROOT (the repository). See docs/cluster.md for
# the user-facing variables.
set -euo pipefail

cd "$DISSECT_ROOT"

# The recipe per data set: training pairs and epochs; LR warm-up 10k steps x 10,240 pairs.
case $DISSECT_SET in
    cc3m) DISSECT_SET_SAMPLES=2905954 DISSECT_SET_EPOCHS=40 ;;
    cc12m) DISSECT_SET_SAMPLES=12423374 DISSECT_SET_EPOCHS=32 ;;
    yfcc15m) DISSECT_SET_SAMPLES=14681591 DISSECT_SET_EPOCHS=32 ;;
    *)
        DISSECT_SET_SAMPLES=${DISSECT_NUM_SAMPLES:?dissect: unknown data set "$DISSECT_SET" (cc3m, cc12m, yfcc15m); set DISSECT_NUM_SAMPLES and DISSECT_EPOCHS for another}
        DISSECT_SET_EPOCHS=${DISSECT_EPOCHS:?dissect: set DISSECT_EPOCHS for data set "$DISSECT_SET"}
        ;;
esac
DISSECT_SET_WARMUP_SAMPLES=$((10000 * 10240))

config=${DISSECT_CONFIG:-configs/$DISSECT_SET.yaml}
if [[ -n ${DISSECT_PYTHON:-} ]]; then
    python=$DISSECT_PYTHON
elif [[ -x $DISSECT_ROOT/.venv/bin/python ]]; then
    python=$DISSECT_ROOT/.venv/bin/python
else
    python=python3
fi

# World size: SLURM_NTASKS is set whenever a task count was requested; otherwise nodes x
# tasks per node.
world=${SLURM_NTASKS:-$((${SLURM_JOB_NUM_NODES:-1} * ${SLURM_NTASKS_PER_NODE:-1}))}

# Rendezvous: the first node's address (NodeAddr, which is the host name on most clusters)
# and a port derived from the job id, so a requeued job finds the same one and two jobs
# sharing a node do not collide. dissect_ds.distributed.env_from_launcher maps each
# task's SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID to RANK / WORLD_SIZE / LOCAL_RANK.
first_node=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" 2>/dev/null | head -n 1 || true)
first_node=${first_node:-localhost}
node_addr=$(scontrol show node "$first_node" 2>/dev/null | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p' | head -n 1 || true)
export MASTER_ADDR=${MASTER_ADDR:-${node_addr:-$first_node}}
export MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
# One intra-op thread pool per rank sized to its CPUs, not to the whole node.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

if [[ ${DISSECT_CPU:-0} == 1 ]]; then
    # GPUs may be visible without being allocated (no cgroup); keep DeepSpeed off them.
    export DS_ACCELERATOR=cpu CUDA_VISIBLE_DEVICES=""
fi

# The recipe's global batch is 1,280 pairs per GPU (8 x 1280 = 10,240). With another world
# size the batch follows it, and the step count and warm-up follow the batch so that the
# schedule stays the same in epochs and samples. DISSECT_BATCH_PER_RANK=0 keeps the
# config's own batch and steps; anything in DISSECT_EXTRA wins over all of this.
per_rank=${DISSECT_BATCH_PER_RANK:-1280}
overrides=()
if [[ $per_rank -gt 0 ]]; then
    batch=$((per_rank * world))
    overrides+=("train.batch_size=$batch")
    if [[ -z ${DISSECT_CONFIG:-} || -n ${DISSECT_EPOCHS:-} ]]; then
        epochs=${DISSECT_EPOCHS:-$DISSECT_SET_EPOCHS}
        steps_per_epoch=$((${DISSECT_NUM_SAMPLES:-$DISSECT_SET_SAMPLES} / batch))
        steps_per_epoch=$((steps_per_epoch > 0 ? steps_per_epoch : 1))
        warmup=$((DISSECT_SET_WARMUP_SAMPLES / batch))
        overrides+=("train.steps=$((epochs * steps_per_epoch))" "train.warmup_steps=$warmup")
    fi
fi
[[ -n ${DISSECT_TRAIN_DATA:-} ]] && overrides+=("data.train=$DISSECT_TRAIN_DATA")
[[ -n ${DISSECT_VAL_DATA:-} ]] && overrides+=("data.val=$DISSECT_VAL_DATA")
[[ -n ${DISSECT_OUTPUT_DIR:-} ]] && overrides+=("run.output_dir=$DISSECT_OUTPUT_DIR")
# A requeued job (preemption, time limit) continues from its last checkpoint.
overrides+=("resume=latest")
read -r -a extra <<<"${DISSECT_EXTRA:-}"
overrides+=("${extra[@]}")

echo "dissect: job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST:-?}:" \
    "$world ranks, master $MASTER_ADDR:$MASTER_PORT, $(date -Is)"
echo "dissect: $python -m dissect_ds.train --config $config ${overrides[*]}"

# --kill-on-bad-exit: one failed rank ends the step instead of leaving the others hung in
# a collective. The rank processes receive --signal=USR1 (not this shell): they write a
# checkpoint at the next step boundary and rank 0 requeues the job.
status=0
srun --kill-on-bad-exit=1 "$python" -m dissect_ds.train --config "$config" "${overrides[@]}" || status=$?
echo "dissect: srun exited with status $status, $(date -Is)"
exit "$status"
