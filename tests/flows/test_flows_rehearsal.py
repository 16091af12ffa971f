"""The ImageNet job and its rehearsal: imagenet.yaml covers every stage, rehearsal.yaml changes only sizes, and a
smaller variant of the rehearsal runs end to end (ImageNet-shaped tree, f32c128 structure, ADT, Inception path)."""

from __future__ import annotations

import io
import math
import sys

import pytest
import yaml

# The only fields the rehearsal may change: sizes (resolution, widths/depths as tiny presets of the same
# architectures, steps, batches, counts), worker counts and cadences. Anything else would rehearse another path.
SIZE_FIELDS = {
    "root", "resolution",
    "data.shard_bytes", "data.workers", "data.read_threads",
    "autoencoder.preset", "autoencoder.nproc_per_node", "autoencoder.train.num_workers",
    "autoencoder.phases.resolution", "autoencoder.phases.steps", "autoencoder.phases.batch_size",
    "autoencoder.phases.warmup_steps", "autoencoder.phases.checkpoint_every",
    "encode.device", "encode.batch_size", "encode.chunk_size", "encode.units_per_task", "encode.decode_threads",
    "encode.prefetch_batches", "encode.workers",
    "diffusion.backbones", "diffusion.nproc_per_node",
    "diffusion.train.global_batch_size", "diffusion.train.steps", "diffusion.train.warmup_steps",
    "diffusion.train.num_workers", "diffusion.train.checkpoint_every", "diffusion.train.keep_checkpoints",
    "diffusion.train.log_every",
    "sample.num_samples", "sample.steps", "sample.batch_size", "sample.chunk_size",
    "evaluate.options.reference_stats.max_samples", "evaluate.options.reference_stats.num_features",
    "evaluate.options.reference_stats.num_workers",
    "evaluate.options.reconstruction.num_images", "evaluate.options.reconstruction.batch_size",
    "evaluate.options.reconstruction.channels",  # how many of the c' list are scored (a count)
}
# what a size-only change may replace a name with: the tiny presets of the same architecture
SAME_ARCHITECTURE = {"autoencoder.preset": ("dc-ae-f32c128-1.5", "tiny-f32c128-1.5"),
                     "diffusion.backbones": (["USiT-H"], ["USiT-tiny"])}


def _leaves(node, prefix=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, f"{prefix}{k}.")
    elif isinstance(node, list) and node and all(isinstance(x, dict) for x in node):
        for item in node:
            yield from _leaves(item, prefix)
    else:
        yield prefix[:-1], node


def test_rehearsal_is_imagenet_with_only_sizes_reduced():
    from dcae15.ae.model import AE_PRESETS
    from dcae15.models.registry import PRESETS
    from flows.config import CONFIG_DIR, load_config

    raw = yaml.safe_load((CONFIG_DIR / "rehearsal.yaml").read_text())
    assert raw.pop("extends") == "imagenet"
    changed = {path for path, _ in _leaves(raw)}
    assert changed <= SIZE_FIELDS, f"rehearsal.yaml changes more than sizes: {sorted(changed - SIZE_FIELDS)}"
    base, reh = load_config("imagenet"), load_config("rehearsal")
    for path, (big, small) in SAME_ARCHITECTURE.items():
        section, field = path.split(".")
        assert getattr(getattr(base, section), field) == big and getattr(getattr(reh, section), field) == small
    a, b = AE_PRESETS["dc-ae-f32c128-1.5"], AE_PRESETS["tiny-f32c128-1.5"]
    assert (len(a.block_out_channels), a.latent_channels, a.channel_choices, a.encoder_block_types,
            a.decoder_norm_types, a.bottleneck_shortcut) == (len(b.block_out_channels), b.latent_channels,
                                                             b.channel_choices, b.encoder_block_types,
                                                             b.decoder_norm_types, b.bottleneck_shortcut)
    big, small = PRESETS["USiT-H"], PRESETS["USiT-tiny"]
    assert (type(big).__name__, big.objective) == (type(small).__name__, small.objective)
    # every non-size field of every stage is ImageNet's
    # resolved fields that follow a size field: each phase's preset and workers, the reconstruction's resolution
    derived = {"autoencoder.phases.preset", "autoencoder.phases.num_workers", "evaluate.options.reconstruction.resolution"}
    strip = lambda cfg: {p: v for p, v in _leaves(cfg.to_dict()) if p not in SIZE_FIELDS | derived}  # noqa: E731
    assert strip(base) == strip(reh)


def test_imagenet_config_covers_every_stage_as_the_paper_runs_it():
    from dcae15.ae.recipe import PAPER_PHASES
    from flows.config import load_config

    cfg = load_config("imagenet")
    for mine, paper in zip(cfg.autoencoder.phases, PAPER_PHASES, strict=True):
        assert all(getattr(mine, k) == v for k, v in paper.items()), (mine.name, paper)
    assert cfg.encode.flip and cfg.resolution == 256
    t = cfg.diffusion.train
    assert t.adt.enabled and t.adt.channels == list(range(16, 129, 4)) and t.global_batch_size == 1024
    s = cfg.sample
    assert s.num_samples == 50_000 and s.cfg_scale > 1 and s.guidance_interval == [0.0, 0.7]
    assert cfg.evaluate.extractor == "inception" and cfg.evaluate.checkpoints == "all"
    assert set(cfg.evaluate.options.generation["metrics"]) == {"fid", "is", "precision", "recall"}
    assert cfg.evaluate.options.reference_stats == {} and cfg.evaluate.reference == "train"  # the whole train split (official protocol)


def test_imagenet_shaped_tree_packs_with_its_odd_files(tmp_path):
    from storage.packing import pack_image_folder
    from storage.shards import open_dataset
    from storage.synthetic import ODD_FILES, make_imagenet_tree

    made = make_imagenet_tree(str(tmp_path / "train"), num_classes=1000, per_class=1, size=32)
    assert len(made["files"]) == 1000 + len(ODD_FILES)
    assert sorted(p.name for p in (tmp_path / "train").iterdir())[:2] == ["n01440000", "n01441000"]
    pack_image_folder(str(tmp_path / "train"), str(tmp_path / "packed"), name="imagenet", progress=False)
    ds = open_dataset(str(tmp_path / "packed"))
    assert len(ds.class_names) == 1000 and ds.num_samples == 1005
    assert int(ds.valid.sum()) == 1003  # truncated + empty recorded invalid; CMYK, grey, PNG-as-JPEG converted


@pytest.mark.slow
def test_rehearsal_smaller_variant_runs_every_stage(tmp_path, prefect_api, capsys):
    """``dcae15 rehearse`` with fewer steps and samples: every stage at ImageNet's shape, Inception scores for
    every kept checkpoint, bounded figures, and a printed time + peak RSS per stage. Long (~125 s quiet, the
    suite's longest): the only run of imagenet.yaml's own code paths with only sizes reduced (1000 classes, the f32 AE's
    stages with 128 latent channels, all three AE phases, the dc-gen protocol with Inception); it runs once per test run (not again in .ci/run)."""
    from PIL import Image

    from dcae15.metrics.results import read_results
    from flows.cli import main
    from storage.layout import Root

    root = tmp_path / "rehearsal"
    sets = ["sample.num_samples=16", "sample.batch_size=16", "sample.chunk_size=8", "diffusion.train.steps=4",
            "diffusion.train.checkpoint_every=2", "evaluate.options.reference_stats.max_samples=16",
            "evaluate.options.reference_stats.num_features=16", "evaluate.options.reconstruction.num_images=8",
            "evaluate.options.reconstruction.batch_size=8"]
    assert main(["rehearse", "--root", str(root), *[f"--set={s}" for s in sets]]) == 0
    out = capsys.readouterr().out
    print(out.split("=== stages")[-1], file=sys.__stderr__)  # the per-stage table in the CI log
    for stage in ("prepare_images", "train_autoencoder", "encode_latents", "train_diffusion", "sample_run",
                  "evaluate_samples", "draw_run_figures"):
        assert stage in out.split("=== stages")[1], stage
    rows = read_results(Root(str(root)).results()).rows()
    # imagenet.yaml's protocol is the DC-AE 1.5 paper's (dc-gen): Inception fed as DC-Gen feeds it
    assert {r["feature_extractor"] for r in rows} == {"inception-v3-compat/pytorch-fid-input"}
    assert {r["protocol"] for r in rows} == {"dc-gen"} and all(r["pr_reference"].startswith("adm:") for r in rows)
    got = {(r["step"], r["metric"]) for r in rows if math.isfinite(r["value"])}
    assert {(s, m) for s in (2, 4) for m in ("fid", "is", "precision", "recall")} <= got  # every kept checkpoint
    assert "checkpoint events: 2" in out and "0 new result rows" in out  # the event-triggered evaluation's path
    grid = [f for f in Root(str(root)).figures() if f.endswith("_samples.png")]
    assert grid and Image.open(io.BytesIO(open(grid[0], "rb").read())).size[1] < 8 * 66 * 2 + 60  # 8 rows of 64 px at scale 2
