"""One torchrun launch of the GPU branches on CPU (run with DCAE15_GPU_BRANCHES=1): argv[1] is JSON
{"store", "full", "split", "samples", "cfg"}. Checks the timesteps a 2-rank sharded model sees, trains ``cfg``
to the end in ``full`` and in two calls in ``split`` (bf16 policy, checkpointing, compile, async checkpoints),
then samples ``full`` into ``samples`` on both ranks (bf16 autocast)."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from dcae15.accel import forced_gpu_branches
from dcae15.diffusion.sample import sample_to_store
from dcae15.diffusion.train import DiffusionTrainConfig, train_diffusion
from dcae15.models import ModelConfig, build_model
from dcae15.parallel import apply_parallelism, forward_inputs_seen, make_mesh


def check_timesteps() -> None:
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="dit", hidden=32, depth=2, heads=2, in_channels=4, input_size=(4, 4),
                                    num_classes=3))
    apply_parallelism(model, mesh=make_mesh(cpu, dist.get_world_size()), device=cpu, mixed_precision="bf16")
    t = torch.tensor([997.0, 999.0, 501.0, 999.75])
    seen = forward_inputs_seen(model, torch.randn(4, 4, 4, 4), t, torch.zeros(4, dtype=torch.long))[1]
    if seen.dtype != torch.float32 or not torch.equal(seen, t):
        raise SystemExit(f"rank {dist.get_rank()}: the model saw t={seen.tolist()} ({seen.dtype}), not {t.tolist()}")


def main() -> None:
    spec = json.loads(sys.argv[1])
    if not forced_gpu_branches():
        raise SystemExit("run with DCAE15_GPU_BRANCHES=1")
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    try:
        check_timesteps()
        cfg = DiffusionTrainConfig.from_dict(spec["cfg"])
        train_diffusion(cfg, spec["store"], spec["full"])
        train_diffusion(cfg, spec["store"], spec["split"], max_steps=cfg.steps // 2)
        train_diffusion(cfg, spec["store"], spec["split"])
        sample_to_store(spec["full"], spec["samples"], num_samples=6, sampler="heun", steps=2, cfg_scale=2.0,
                        guidance_interval=(0.2, 0.9), batch_size=2, chunk_size=2, progress=False)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
