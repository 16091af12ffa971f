#!/bin/bash
# The ImageNet job on four 8-GPU nodes of a SLURM cluster (beside gpu-work-pool.yaml, the Kubernetes template).
#   sbatch deploy/sbatch-pipeline.sh s3://lab-bucket/dcae15 s3://lab-bucket/imagenet/train
# The batch script runs on the allocation's first node and starts the Prefect flow there (PREFECT_API_URL: the
# lab's server, so the run, its events and artifacts show in the UI). Stages that train or sample across nodes
# (diffusion.nnodes = 4, node_launcher: srun) call `srun --nodes=4 --ntasks-per-node=1 --kill-on-bad-exit=1
# python -m torch.distributed.run --nnodes=4 --nproc-per-node=8 --rdzv-backend=c10d --rdzv-endpoint=<this
# node>:29500 ...` from inside the flow: one torchrun agent per node, node ranks assigned by the c10d rendezvous,
# HSDP (shard within a node, replicate across nodes) by default. A node that dies ends the step on every node;
# the task's retry (diffusion.retries) resumes from the last committed checkpoint. The single-node stages
# (prepare, AE phases, encode, evaluation) run on the first node's 8 GPUs.
#SBATCH --job-name=dcae15-imagenet
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --time=7-00:00:00
#SBATCH --output=dcae15-%j.log
set -euo pipefail
ROOT=${1:?usage: sbatch deploy/sbatch-pipeline.sh ROOT_URL IMAGENET_TRAIN_URL}
SOURCE=${2:?usage: sbatch deploy/sbatch-pipeline.sh ROOT_URL IMAGENET_TRAIN_URL}
: "${PREFECT_API_URL:?export PREFECT_API_URL=http://prefect-host:4200/api before sbatch (it is passed through)}"
export DCAE15_WEIGHTS=${DCAE15_WEIGHTS:-/weights}   # vgg16-397923af.pth, weights-inception-2015-12-05-6726825d.pth
export OMP_NUM_THREADS=1
cd "${SLURM_SUBMIT_DIR:-.}"
exec .venv/bin/dcae15 pipeline --config imagenet --root "$ROOT" \
    --set data.source="$SOURCE" \
    --set diffusion.nnodes="$SLURM_JOB_NUM_NODES" --set diffusion.node_launcher=srun \
    --set diffusion.rdzv_endpoint="$(hostname):29500" --set diffusion.retries=3
