"""Run several training calls in one torchrun launch (a launch costs ~15 s on 2 cores): argv[1] is a JSON list of
{"cfg": DiffusionTrainConfig fields, "store": url, "run": url, "max_steps": int | None}. With "check_hsdp": true
the script also checks that the 2-D mesh gives parameters (Replicate, Shard(0)) placements."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from dcae15.diffusion.train import DiffusionTrainConfig, train_diffusion


def _check_hsdp(shard: int) -> None:
    from torch.distributed.tensor import Replicate, Shard

    from dcae15.models import ModelConfig, build_model
    from dcae15.parallel import apply_parallelism, make_mesh

    model = build_model(ModelConfig(arch="dit", hidden=32, depth=2, heads=2, in_channels=4, input_size=(4, 4),
                                    num_classes=3))
    mesh = make_mesh(torch.device("cpu"), dist.get_world_size(), shard)
    apply_parallelism(model, mesh=mesh, device=torch.device("cpu"), mixed_precision="fp32")
    placements = {tuple(p.placements) for p in model.parameters()}
    if placements != {(Replicate(), Shard(0))} or mesh.shape != (dist.get_world_size() // shard, shard):
        raise SystemExit(f"not HSDP: mesh {mesh.shape}, placements {placements}")


def main() -> None:
    spec = json.loads(sys.argv[1])
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    try:
        for job in spec["jobs"]:
            cfg = DiffusionTrainConfig.from_dict(job["cfg"])
            train_diffusion(cfg, job["store"], job["run"], max_steps=job.get("max_steps"))
        if spec.get("check_hsdp"):
            _check_hsdp(int(spec["check_hsdp"]))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
