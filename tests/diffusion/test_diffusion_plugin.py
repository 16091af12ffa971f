"""Backbones given by import path (issue 33): contract errors before training, the LightningDiT example through the
whole pipeline (train, FSDP2, exact resume, sample, export), run identity from the source file, the plain loop."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from dcae15.diffusion.checkpoint import load_ema_state, read_run_config
from dcae15.diffusion.train import DiffusionTrainConfig, run_id_for, store_info, train_diffusion
from dcae15.models import BackboneError, build_model, config_from_dict

EXAMPLE = "examples.lightning_dit:lightning_dit_tiny"

# Plug-in modules written to tmp_path by the tests (a fresh module name per test: no stale sys.modules entry).
_GOOD = '''
import torch
from torch import nn


class CondConv(nn.Module):
    """No blocks_to_shard: FSDP2 wraps it as one unit."""

    def __init__(self, in_channels, num_classes, width):
        super().__init__()
        self.inp = nn.Conv2d(in_channels, width, 3, padding=1)
        self.emb = nn.Embedding(num_classes + 1, width)
        self.out = nn.Conv2d(width, in_channels, 3, padding=1)

    def forward(self, x, t, y):
        h = self.inp(x) + self.emb(y)[:, :, None, None] + (t.float() / 1000)[:, None, None, None]
        return self.out(torch.nn.functional.silu(h))


def make(*, in_channels, input_size, num_classes, width=8):
    return CondConv(in_channels, num_classes, width)
'''

_BAD = '''
import torch
from torch import nn

not_callable = 3


class Shape(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.lin = nn.Linear(c, c)

    def forward(self, x, t, y):
        return self.lin(x.mean((2, 3)))  # (B, C): not shaped like x


class Dtype(Shape):
    def forward(self, x, t, y):
        return x.double() * self.lin.weight.sum()


class NoLabel(nn.Module):
    def __init__(self, c, k):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)
        self.emb = nn.Embedding(k + 1, c)  # has a label embedding but never uses it

    def forward(self, x, t, y):
        return self.conv(x)


class Pair(Shape):
    def forward(self, x, t, y):
        return x, x


def shape(*, in_channels, input_size, num_classes):
    return Shape(in_channels)


def dtype(*, in_channels, input_size, num_classes):
    return Dtype(in_channels)


def ignores_y(*, in_channels, input_size, num_classes):
    return NoLabel(in_channels, num_classes)


def pair(*, in_channels, input_size, num_classes):
    return Pair(in_channels)


def not_a_module(*, in_channels, input_size, num_classes):
    return "a string"


def strict(*, in_channels, input_size):  # no num_classes argument
    return Shape(in_channels)
'''


def _write_module(tmp_path: Path, monkeypatch, name: str, source: str) -> Path:
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(source))
    return path


def _cfg(model: str, **kw) -> DiffusionTrainConfig:
    base = dict(model=model, objective="flow", global_batch_size=8, steps=2, lr=1e-3, checkpoint_every=100,
                log_every=1, ema_decay=0.9, progress=False, shuffle_chunks=2)
    return DiffusionTrainConfig(**{**base, **kw})


@pytest.mark.parametrize("factory, expected", [
    ("no_such_module_xyz:make", "cannot be found"),
    ("{mod}:missing", "has no attribute 'missing'"),
    ("{mod}:not_callable", "expected a callable factory"),
    ("{mod}:strict", "the factory failed when called with"),
    ("{mod}:not_a_module", "expected a torch.nn.Module"),
    ("{mod}:shape", "expected the shape of x (2, 32, 4, 4)"),
    ("{mod}:dtype", "expected torch.float32 like x"),
    ("{mod}:pair", "forward returned a tuple, expected a tensor"),
    ("{mod}:ignores_y", "forward ignores y"),
])
def test_bad_plugins_fail_before_training_naming_the_entry(latent_store, tmp_path, monkeypatch, factory, expected):
    mod = f"bad_backbones_{abs(hash(factory)) % 10**8}"
    _write_module(tmp_path, monkeypatch, mod, _BAD)
    entry = factory.format(mod=mod)
    run = tmp_path / "run"
    with pytest.raises(BackboneError) as err:
        train_diffusion(_cfg(entry), latent_store, str(run))
    assert entry in str(err.value) and expected in str(err.value)
    assert not (run / "config.yaml").exists()  # nothing was started


def test_plugin_config_errors():
    with pytest.raises(ValueError, match="objective is required"):
        DiffusionTrainConfig(model=EXAMPLE)
    with pytest.raises(ValueError, match="package.module:factory"):
        DiffusionTrainConfig(model="examples/lightning_dit.py")
    with pytest.raises(ValueError, match="patch_size=2 is a preset field"):
        DiffusionTrainConfig(model=EXAMPLE, objective="flow", patch_size=2)
    with pytest.raises(ValueError, match="model_overrides"):
        from dcae15.models import model_config

        model_config(EXAMPLE, in_channels=4, input_size=(4, 4), num_classes=2, patch_size=2)


def _weights(run: str, step: int, which: str) -> dict[str, torch.Tensor]:
    m = build_model(config_from_dict(read_run_config(run)["model_config"]))
    load_ema_state(f"{run}/checkpoints/step-{step:07d}", m, which=which)
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


@pytest.mark.slow
def test_lightning_dit_example_trains_resumes_samples_and_exports_like_a_preset(decodable_store_factory, tmp_path):
    """The example plug-in through the tiny pipeline: ADT + EMA on one rank, an FSDP2 (per-block) first half
    resumed bit for bit by the plain path, sampling + grid + export rebuilt from the run directory alone."""
    from dcae15.diffusion.export import export_weights, load_exported
    from dcae15.diffusion.sample import sample_to_store
    from dcae15.diffusion.sample_outputs import write_grid
    from storage.sample_store import SampleStore

    store = decodable_store_factory(tmp_path, n=32)
    cfg = _cfg(EXAMPLE)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    full = train_diffusion(cfg, store, a)
    assert full["done"] and full["run_id"].startswith("lightning_dit_tiny-")
    train_diffusion(_cfg(EXAMPLE, fsdp_one_rank=True), store, b, max_steps=1)  # same run id: an operational field
    train_diffusion(cfg, store, b)
    for which in ("model", "ema"):
        wa, wb = _weights(a, 2, which), _weights(b, 2, which)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), which
    conf = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    mc = conf["model_config"]
    assert mc["arch"] == "plugin" and mc["factory"] == EXAMPLE and len(mc["source_fingerprint"]) == 16
    assert conf["train"]["model"] == EXAMPLE and conf["objective"] == "flow"
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(16 <= r["c_prime"] <= 32 for r in rows)  # ADT drew c'

    out = sample_to_store(a, str(tmp_path / "samples"), num_samples=4, steps=2, batch_size=4, chunk_size=4,
                          cfg_scale=1.5, device="cpu", progress=False)
    st = SampleStore.open(out)
    images, _ = st.read_all()  # complete (it refuses otherwise)
    assert images.shape == (4, 32, 32, 3) and st.attrs["backbone"] == EXAMPLE
    write_grid(out, str(tmp_path / "grid.png"))
    assert (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"
    meta = export_weights(a, str(tmp_path / "w.safetensors"))
    model, meta2 = load_exported(str(tmp_path / "w.safetensors"))
    assert meta["backbone"] == meta2["backbone"] == EXAMPLE
    assert type(model).__name__ == "LightningDiT"


def test_editing_the_plugin_source_starts_a_new_run_and_sampling_names_a_missing_module(latent_store, tmp_path,
                                                                                          monkeypatch):
    """A plug-in without blocks_to_shard trains under FSDP2 as one unit; its run id follows its source file; a run
    directory whose module cannot be imported fails sampling with the import path in the message."""
    from dcae15.diffusion.sample import load_run_model
    from storage.rundir import RunMismatchError

    path = _write_module(tmp_path, monkeypatch, "my_lab_net", _GOOD)
    cfg, run = _cfg("my_lab_net:make", steps=1, fsdp_one_rank=True), str(tmp_path / "run")
    sid = store_info(latent_store)["store_id"]
    before = run_id_for(cfg, sid)
    assert train_diffusion(cfg, latent_store, run)["run_id"] == before
    model, conf, step = load_run_model(run)
    assert step == 1 and type(model).__name__ == "CondConv"

    path.write_text(path.read_text() + "\n# a tweak\n")
    after = run_id_for(cfg, sid)
    assert after != before and after.startswith("make-")
    with pytest.raises(RunMismatchError):  # the old run directory is not resumed with the new code
        train_diffusion(cfg, latent_store, run)
    with pytest.warns(UserWarning, match="source file changed"):
        load_run_model(run)

    monkeypatch.delitem(sys.modules, "my_lab_net")
    path.unlink()
    with pytest.raises(BackboneError, match="'my_lab_net:make'.*PYTHONPATH"):
        load_run_model(run)


@pytest.mark.parametrize("workers", [0, 1])
def test_plain_loop_example_resumes_the_exact_sequence(make_store, tmp_path, workers):
    """examples/plain_loop.py: 4 steps at once == 2 steps, then 2 more from its checkpoint (same batches, same
    weights), with the DataLoader reading in this process or in a worker (the batch's ``state`` is the cursor)."""
    from examples.plain_loop import train

    store = make_store(str(tmp_path / "store"), n=64, c=8, hw=4, unit=16)
    whole = train(store, 4, str(tmp_path / "whole.pt"), batch_size=8, num_workers=workers)
    first = train(store, 2, str(tmp_path / "split.pt"), batch_size=8, num_workers=workers)
    rest = train(store, 4, str(tmp_path / "split.pt"), batch_size=8, num_workers=workers)
    assert len(whole) == 4 and first + rest == whole
    wa = torch.load(tmp_path / "whole.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "split.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert len((Path(__file__).parents[2] / "examples" / "plain_loop.py").read_text().splitlines()) <= 60


@pytest.mark.slow
def test_lightning_dit_example_takes_the_gpu_branches_on_cpu(latent_store, tmp_path, monkeypatch):
    """Under DCAE15_GPU_BRANCHES=1 (bf16 FSDP2 policy whose root leaves the inputs fp32, per-block activation
    checkpointing and fullgraph compile) the plug-in trains: it casts x to its parameters' dtype itself."""
    from dcae15.accel import COMPILE_BACKEND_ENV, GPU_BRANCHES_ENV

    monkeypatch.setenv(GPU_BRANCHES_ENV, "1")
    monkeypatch.setenv(COMPILE_BACKEND_ENV, "aot_eager")  # the same graphs, no code generation
    out = train_diffusion(_cfg(EXAMPLE, steps=1, fsdp_one_rank=True), latent_store, str(tmp_path / "run"))
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert out["done"] and rows[-1]["step"] == 1 and torch.isfinite(torch.tensor(rows[-1]["loss"]))


@pytest.mark.slow
def test_lightning_dit_example_trains_on_two_ranks_and_resumes_on_one(latent_store, tmp_path):
    """torchrun with 2 gloo ranks (FSDP2, one shard per block per rank) to step 1, then one rank to step 2: the
    plug-in's DCP checkpoint reshards like a preset's; the child imports the plug-in from PYTHONPATH."""
    import os
    import subprocess

    repo = Path(__file__).resolve().parents[2]
    cfg, run = _cfg(EXAMPLE), str(tmp_path / "run")
    conf = tmp_path / "run.yaml"
    conf.write_text(yaml.safe_dump({"store_url": latent_store, "run_url": run, "train": cfg.to_dict()}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "dcae15.diffusion.train", "--config", str(conf), "--max-steps", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = train_diffusion(cfg, latent_store, run)
    assert out["step"] == 2 and out["done"] and out["run_id"] == run_id_for(cfg, store_info(latent_store)["store_id"])
    assert all(torch.isfinite(v).all() for v in _weights(run, 2, "ema").values())
