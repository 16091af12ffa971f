"""The sampling command researchers use: class lists, label modes, guidance interval from the CLI/config; a grid
and a PNG folder from the store; a run's EMA weights exported as one self-describing safetensors file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dcae15.metrics.labels import make_labels


def test_label_modes_with_classes():
    assert make_labels(6, 1000, "given", 0, [207, 360, 387]).tolist() == [207, 207, 360, 360, 387, 387]
    assert make_labels(5, 1000, "given", 0, [1, 2]).tolist() == [1, 1, 1, 2, 2]
    bal = make_labels(8, 1000, "balanced", 3, [5, 9])
    assert sorted(bal.tolist()) == [5] * 4 + [9] * 4
    assert set(make_labels(50, 1000, "uniform", 1, [7, 8, 9]).tolist()) == {7, 8, 9}
    assert np.array_equal(make_labels(9, 4, "uniform", 2), make_labels(9, 4, "uniform", 2, None))  # unchanged rule
    with pytest.raises(ValueError, match="needs classes"):
        make_labels(3, 10, "given", 0)
    with pytest.raises(ValueError, match=r"classes \[10\] are outside \[0, 10\)"):
        make_labels(3, 10, "uniform", 0, [1, 10])


def test_sample_flags_are_sample_section_fields():
    from flows.cli import build_parser, sample_overrides
    from flows.config import load_config

    args = build_parser().parse_args([
        "sample", "--run", "r", "--classes", "207,360,387", "--cfg", "4.0", "--guidance-interval", "0.1,0.7",
        "--labels", "given", "--seed", "3", "--grid", "g.png", "--png-dir", "pngs", "--num-samples", "12"])
    over = sample_overrides(args)
    assert over == {"classes": [207, 360, 387], "cfg_scale": 4.0, "guidance_interval": [0.1, 0.7], "labels": "given",
                    "seed": 3, "grid": "g.png", "png_dir": "pngs", "num_samples": 12}
    cfg = load_config("tiny", {"sample": over})
    spec = cfg.sample.spec()
    assert "grid" not in spec and "png_dir" not in spec  # outputs never change which images are drawn
    assert spec["classes"] == [207, 360, 387] and spec["guidance_interval"] == [0.1, 0.7]
    plain = load_config("tiny", {}).sample.spec()  # defaults left out: an unchanged config keeps its sample id
    assert not {"classes", "labels", "guidance_interval"} & set(plain)
    with pytest.raises(ValueError, match="sample.labels=given needs sample.classes"):
        load_config("tiny", {"sample": {"labels": "given"}})
    with pytest.raises(ValueError, match="guidance_interval"):
        load_config("tiny", {"sample": {"guidance_interval": [0.8, 0.2]}})
    with pytest.raises(SystemExit):
        build_parser().parse_args(["sample", "--run", "r", "--labels", "zipf"])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_run_factory):
    root = tmp_path_factory.mktemp("sample-cli")
    return root, tiny_run_factory(root)


def test_given_classes_grid_png_dir_and_export(tiny_run):
    from PIL import Image

    from dcae15.diffusion.export import export_weights, load_exported
    from dcae15.diffusion.sample import load_run_model, sample_to_store
    from dcae15.diffusion.sample_outputs import write_grid, write_png_dir
    from storage.sample_store import SampleStore

    root, run = tiny_run
    url = sample_to_store(run, str(root / "s"), num_samples=6, sampler="euler", steps=1, cfg_scale=4.0,
                          guidance_interval=(0.1, 0.7), labels="given", classes=[3, 1], batch_size=4, chunk_size=4,
                          progress=False)
    store = SampleStore.open(url)
    images, labels = store.read_all()
    assert labels.tolist() == [3, 3, 3, 1, 1, 1]
    assert store.attrs["classes"] == [3, 1] and store.attrs["guidance_interval"] == [0.1, 0.7]
    grid = write_grid(url, str(root / "grid.png"), class_names=["a", "b", "c", "d"], per_class=2)
    assert Image.open(grid).size[0] > 2 * images.shape[2]
    out = write_png_dir(url, str(root / "pngs"))
    assert out == {"url": str(root / "pngs"), "written": 6, "skipped": 0}
    assert np.array_equal(np.asarray(Image.open(root / "pngs" / "000004.png")), images[4])
    assert (root / "pngs" / "labels.txt").read_text().split() == ["3", "3", "3", "1", "1", "1"]
    assert write_png_dir(url, str(root / "pngs"))["skipped"] == 6  # a rerun writes nothing twice

    meta = export_weights(run, str(root / "ema.safetensors"))
    assert meta["weights"] == "ema" and meta["step"] == 2 and meta["backbone"] == "USiT-tiny"
    model, got = load_exported(str(root / "ema.safetensors"))
    ref, _, _ = load_run_model(run, ema=True)
    assert got == meta and (root / "ema.safetensors.json").exists()
    for (k, a), (_, b) in zip(sorted(model.state_dict().items()), sorted(ref.state_dict().items())):
        assert torch.equal(a, b), k
    with pytest.raises(ValueError, match=".safetensors"):
        export_weights(run, str(root / "ema.pt"))
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(root / "other.safetensors"))
    with pytest.raises(ValueError, match="not a dcae15 weights export"):
        load_exported(str(root / "other.safetensors"))


def test_sde_sampler_and_shift_reach_the_sample_store(tiny_run):
    """Issue 31: ``--sampler sde --shift S`` are sample-section fields, enter the sample spec only when not the
    default (an unshifted store keeps its id), and are recorded in the store it writes."""
    from dcae15.diffusion.sample import sample_to_store
    from flows.cli import build_parser, sample_overrides
    from flows.config import load_config
    from storage.sample_store import SampleStore

    over = sample_overrides(build_parser().parse_args(["sample", "--run", "r", "--sampler", "sde", "--shift", "3"]))
    assert over == {"sampler": "sde", "shift": 3.0}
    spec = load_config("tiny", {"sample": over}).sample.spec()
    assert spec["sampler"] == "sde" and spec["shift"] == 3.0
    assert "shift" not in load_config("tiny", {}).sample.spec()
    with pytest.raises(ValueError, match="sample.shift must be > 0"):
        load_config("tiny", {"sample": {"shift": 0}})
    root, run = tiny_run
    url = sample_to_store(run, str(root / "sde"), num_samples=3, sampler="sde", steps=3, shift=3.0, batch_size=4,
                          chunk_size=4, progress=False)
    store = SampleStore.open(url)
    assert (store.attrs["sampler"], store.attrs["shift"]) == ("sde", 3.0)
    images, _ = store.read_all()
    assert images.shape[0] == 3 and images.std() > 0


def test_grid_at_1000_classes_gets_class_conditional_rows_with_names(tmp_path, tiny_run_factory, monkeypatch):
    """Issue 31 item 6: 24 uniform samples over 1000 classes fill almost no grid row; the figure task then draws
    ``GRID_PER_CLASS`` class-conditional samples of every grid class (as DiT's sample.py), so no row is empty, and
    names the rows from a LOC_synset_mapping.txt-style file (the wnid where the file has no name)."""
    import storage.shards
    from dcae15.diffusion import plots
    from dcae15.diffusion.sample import sample_to_store
    from flows.evaluate import draw_run_figures
    from storage.sample_store import SampleStore

    root = tmp_path / "root"
    run = tiny_run_factory(tmp_path / "run1000", num_classes=1000, steps=2, log_every=1)
    # the scored store as ImageNet's default draws it: dopri5 with tolerances other than sample_to_store's defaults
    samples = sample_to_store(run, str(root / "samples" / "uniform"), num_samples=24, sampler="dopri5", steps=2,
                              cfg_scale=1.5, atol=1e-2, rtol=1e-2, batch_size=24, chunk_size=24, progress=False)
    wnids = [f"n{i:08d}" for i in range(1000)]
    mapping = tmp_path / "LOC_synset_mapping.txt"
    mapping.write_text("".join(f"{w} class {i}, synonym\n" for i, w in enumerate(wnids) if i != 333))
    monkeypatch.setattr(storage.shards, "open_dataset", lambda url: type("DS", (), {"class_names": wnids})())
    drawn = {}
    real = plots.sample_grid_png

    def spy(images, labels, names, **kw):
        drawn.update(labels=np.asarray(labels), names=list(names), **kw)
        return real(images, labels, names, **kw)

    monkeypatch.setattr(plots, "sample_grid_png", spy)
    import dcae15.diffusion.sample as sample_mod

    calls, real_sample = [], sample_mod.sample_to_store

    def sample_spy(run_url, out_url, **kw):
        calls.append(kw)
        return real_sample(run_url, out_url, **kw)

    monkeypatch.setattr(sample_mod, "sample_to_store", sample_spy)
    pngs = draw_run_figures.fn(str(root), run, samples, "unused", classes=[0, 88, 333, 999],
                               class_names=str(mapping), precision="fp32")
    assert len(pngs) == 2
    counts = np.bincount(drawn["labels"], minlength=1000)
    assert [counts[c] for c in (0, 88, 333, 999)] == [plots.GRID_PER_CLASS] * 4  # every row full, fixed count
    assert [drawn["names"][c] for c in (0, 88, 333, 999)] == ["class 0", "class 88", "n00000333", "class 999"]
    grid_store = [p for p in (root / "eval" / "grid-samples").iterdir() if p.name.startswith("uniform-grid-")]
    assert len(grid_store) == 1 and SampleStore.open(str(grid_store[0])).attrs["labels"] == "given"
    # the grid samples are drawn with the scored store's sampler settings: its dopri5 tolerances and precision
    scored, grid_attrs = SampleStore.open(samples).attrs, SampleStore.open(str(grid_store[0])).attrs
    for k in ("sampler", "steps", "cfg_scale", "guidance_interval", "seed", "ema", "checkpoint_step", "atol", "rtol"):
        assert grid_attrs[k] == scored[k], k
    assert (grid_attrs["atol"], grid_attrs["rtol"]) == (1e-2, 1e-2)
    assert len(calls) == 1 and calls[0]["precision"] == "fp32"
    assert (calls[0]["atol"], calls[0]["rtol"], calls[0]["sampler"]) == (1e-2, 1e-2, "dopri5")
    # a store that already holds enough of every grid class is drawn from as it is
    assert plots.rows_filled(np.repeat([0, 1], 10), [0, 1], 10) and not plots.rows_filled(np.array([0]), [0, 1], 1)
