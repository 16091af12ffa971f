"""Backbones trained at the same time (``diffusion.concurrency``, flows/machine.py) give the very checkpoints they
give trained one after the other; job slots split a machine's cores and GPUs."""

from __future__ import annotations

import os

import pytest
import torch


def test_machine_slots_split_cores_and_gpus():
    from flows.machine import auto_concurrency, machine_slots, slot_launch

    two = machine_slots(2, cpus=list(range(16)), gpus=[str(g) for g in range(8)])  # the lab's node
    assert [s.gpus for s in two] == [("0", "1", "2", "3"), ("4", "5", "6", "7")]
    assert [s.cpus for s in two] == [tuple(range(8)), tuple(range(8, 16))]
    launch = slot_launch({"launcher": "auto", "nproc_per_node": 8, "nnodes": 1, "torchrun_args": []}, two[1])
    assert (launch["launcher"], launch["nproc_per_node"], launch["cpus"]) == ("torchrun", 4, list(range(8, 16)))
    assert launch["env"] == {"OMP_NUM_THREADS": "8", "CUDA_VISIBLE_DEVICES": "4,5,6,7"}
    cpu = machine_slots(2, cpus=[0, 1], gpus=[])
    assert [s.cpus for s in cpu] == [(0,), (1,)] and cpu[0].env() == {"OMP_NUM_THREADS": "1"}
    with pytest.raises(ValueError, match="does not divide the 8 visible GPUs"):
        machine_slots(3, cpus=list(range(16)), gpus=[str(g) for g in range(8)])
    with pytest.raises(ValueError, match="may use 2 cores"):
        machine_slots(3, cpus=[0, 1], gpus=[])
    eight = [str(g) for g in range(8)]
    assert [auto_concurrency(j, cpus=[0, 1], gpus=eight) for j in (1, 2, 3, 9)] == [1, 2, 2, 8]
    assert [auto_concurrency(j, cpus=[0, 1], gpus=[]) for j in (1, 2, 3)] == [1, 2, 2]
    from flows.config import load_config

    with pytest.raises(ValueError, match="concurrency"):
        load_config("tiny", {"diffusion": {"concurrency": 2, "nnodes": 2}})


def _weights(run: str, step: int, which: str) -> dict[str, torch.Tensor]:
    from dcae15.diffusion.checkpoint import load_ema_state, read_run_config
    from dcae15.models import ModelConfig, build_model

    m = build_model(ModelConfig(**read_run_config(run)["model_config"]))
    load_ema_state(f"{run}/checkpoints/step-{step:07d}", m, which=which)
    return m.state_dict()


@pytest.mark.concurrency
@pytest.mark.slow
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="two job slots need two cores")
def test_concurrent_backbones_give_the_checkpoints_of_sequential_training(prefect_api, tmp_path, results_dir,
                                                                          tiny_config):
    """Two backbones trained at once (two torchrun jobs, one core each) write bit-identical checkpoints to the same
    two trained in turn. Long (~25 s quiet): four short trainings, the price of comparing concurrency against a
    sequential reference on the real job path."""
    from flows.pipeline import train_backbones
    from tests.diffusion.conftest import make_latent_store

    store = make_latent_store(str(tmp_path / "store"), n=64, c=8)
    out = {}
    for name, concurrency in (("together", 2), ("in_turn", 1)):
        cfg = tiny_config(tmp_path / name, diffusion={
            "backbones": ["DiT-tiny", "SiT-tiny"], "concurrency": concurrency, "poll_seconds": 0.5,
            "train": {"steps": 6, "checkpoint_every": 3, "global_batch_size": 8}})
        out[name] = train_backbones.with_options(result_storage=results_dir)(store=store, root=cfg["root"],
                                                                              config=cfg, score=False)
    assert "train (concurrent)" in out["together"]["stage_seconds"]  # two torchrun jobs, one core each
    assert {"train DiT-tiny", "train SiT-tiny"} <= out["in_turn"]["stage_seconds"].keys()  # in this process
    for a, b in zip(out["together"]["runs"], out["in_turn"]["runs"], strict=True):
        assert os.path.basename(a) == os.path.basename(b)  # the same run ids
        for step in (3, 6):
            for which in ("model", "ema"):
                wa, wb = _weights(a, step, which), _weights(b, step, which)
                assert wa.keys() == wb.keys()
                assert all(torch.equal(wa[k], wb[k]) for k in wa), (a, step, which)
