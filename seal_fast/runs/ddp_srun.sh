#!/usr/bin/env bash
# One big run over several nodes: torchrun under srun, its rendezvous from the Slurm environment.
#
#   sbatch --nodes 2 --gpus-per-node 8 seal_fast/runs/ddp_srun.sh --data DIR --out runs/big --amp --channels-last
#
# srun starts one torchrun per node; each starts NPROC_PER_NODE trainers (default: the job's GPUs on the node,
# SLURM_GPUS_ON_NODE, else 1); they meet at the first node of the job (c10d rendezvous, port MASTER_PORT, default
# 29500, the job id as the rendezvous id). The trainer resumes with --resume auto, so a requeued job (#SBATCH
# --requeue, scontrol requeue, preemption) goes on from its last checkpoint. Details: docs/cluster.md.
#SBATCH --job-name=seal-ddp
#SBATCH --ntasks-per-node=1
#SBATCH --requeue
#SBATCH --open-mode=append
set -euo pipefail
: "${SLURM_JOB_ID:?run me with sbatch (or inside an salloc)}"
NPROC="${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}"
HEAD="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
PORT="${MASTER_PORT:-29500}"
PY="${PYTHON:-python}"
echo "seal-ddp: job $SLURM_JOB_ID, ${SLURM_JOB_NUM_NODES} node(s) x $NPROC process(es), rendezvous $HEAD:$PORT" \
     "(restart ${SLURM_RESTART_COUNT:-0})"
exec srun --kill-on-bad-exit=1 --ntasks-per-node=1 "$PY" -m torch.distributed.run \
    --nnodes "$SLURM_JOB_NUM_NODES" --nproc_per_node "$NPROC" \
    --rdzv_id "$SLURM_JOB_ID" --rdzv_backend c10d --rdzv_endpoint "$HEAD:$PORT" \
    -m seal_fast.train --resume auto "$@"
