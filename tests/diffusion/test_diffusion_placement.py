"""The one placement rule (``dcae15.parallel.place``, guarded by ``check_placement``) in the diffusion entry points.

On a CPU the weights sit where the batch is whether or not anything moved them, so a missing move is invisible
to every other CPU test (the one-rank trainer once left its model on the host; a GPU's first forward would have
died). Here the target device differs from where models are built: ``meta`` (shapes, no data), and the guard
itself is checked to run inside the trainer on its set-up and its first batch.
"""

from __future__ import annotations

import pytest
import torch

from dcae15.diffusion.train import DiffusionTrainConfig, build_training_model, make_optimizer, train_diffusion
from dcae15.ema import EMA
from dcae15.models import model_config
from dcae15.parallel import apply_parallelism, check_placement, misplaced

META = torch.device("meta")
TINY = {"hidden": 32, "depth": 2, "heads": 2}


def _cfg(**kw) -> DiffusionTrainConfig:
    return DiffusionTrainConfig(model="DiT-tiny", model_overrides=TINY, global_batch_size=4, progress=False, **kw)


def _mcfg(cfg: DiffusionTrainConfig):
    return model_config(cfg.model, in_channels=8, input_size=(4, 4), **cfg.model_overrides)


@pytest.mark.parametrize("arch", ["DiT-tiny", "USiT-tiny"])
def test_apply_parallelism_places_the_plain_one_rank_module(arch):
    from dcae15.models import build_model

    model = build_model(model_config(arch, in_channels=8, input_size=(4, 4), **TINY))  # built on the host
    apply_parallelism(model, mesh=None, device=META, shard=False)
    assert misplaced(META, model=model) == []


def test_trainer_set_up_puts_model_ema_and_optimizer_on_the_device():
    cfg = _cfg()
    model, sharded = build_training_model(cfg, _mcfg(cfg), META, 1)
    optimizer, ema = make_optimizer(model, cfg), EMA(model)
    assert not sharded and next(model.parameters()).device == META
    check_placement(META, model=model, ema=ema.shadow,
                    optimizer_params=[p for g in optimizer.param_groups for p in g["params"]])
    x = torch.randn(2, 8, 4, 4, device=META)
    out = model(x, torch.rand(2, device=META) * 999, torch.zeros(2, dtype=torch.long, device=META))
    assert out.shape == x.shape and out.device == META  # the first forward meets the batch on the device


def test_check_placement_names_what_was_left_behind():
    cfg = _cfg()
    from dcae15.models import build_model

    model = build_model(_mcfg(cfg))
    model.blocks.to(META)  # a partial move: the embedders and the final layer stay on the host
    bad = misplaced(META, model=model, batch=[torch.zeros(2)])
    assert bad and all("(cpu)" in b for b in bad)
    assert not any(".blocks." in b for b in bad) and "batch[0] (cpu)" in bad
    with pytest.raises(RuntimeError, match=r"tensor\(s\) are not on meta: model\..* dcae15\.parallel\.place"):
        check_placement(META, model=model)
    check_placement(torch.device("cpu"), model=build_model(_mcfg(cfg)))  # all on the host: nothing to say


def test_trainer_runs_the_guard_on_set_up_and_first_batch(latent_store, tmp_path, monkeypatch):
    import dcae15.parallel as parallel

    seen: list[tuple[str, tuple[str, ...]]] = []
    real = parallel.check_placement

    def spy(device, **things):
        seen.append((str(device), tuple(sorted(things))))
        real(device, **things)

    monkeypatch.setattr(parallel, "check_placement", spy)
    cfg = DiffusionTrainConfig(model="DiT-tiny", model_overrides=TINY, global_batch_size=8, steps=2, progress=False)
    train_diffusion(cfg, latent_store, str(tmp_path / "run"))
    assert seen == [("cpu", ("ema", "model")), ("cpu", ("batch", "optimizer"))]


def test_sampling_loads_the_model_onto_the_device(tiny_run_factory, tmp_path):
    from dcae15.diffusion.sample import load_run_model

    run = tiny_run_factory(tmp_path, model="DiT-tiny", global_batch_size=8, steps=1, model_overrides=TINY)
    model, _, step = load_run_model(run, device=META)
    assert step == 1 and misplaced(META, model=model) == []
