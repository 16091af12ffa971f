"""The recipe as a chain of phases: each phase its own resumable run; a kill mid-chain resumes that phase; changing a
late phase leaves the earlier ones untouched; the final chain fingerprint covers every phase."""

from __future__ import annotations

import json

import pytest

from dcae15.ae.recipe import PAPER_PHASES, chain_fingerprints, phase_configs, phase_run_url, resolve_phases, train_recipe


def _cfgs(stand_in_vgg, refine_lr=5.4e-5):
    common = dict(batch_size=4, resolution=32, checkpoint_every=1, log_every=1, progress=False,
                  perceptual="lpips-vgg", lpips_weights=stand_in_vgg, w_lpips=0.5, hflip=False)
    phases = [dict(phase="full", steps=3, lr=1e-3),
              dict(phase="latent_adaptation", steps=3),
              dict(phase="refinement", steps=2, lr=refine_lr, disc_channels=8, disc_layers=2)]
    return phase_configs(phases, preset="tiny-f8c32", seed=0, defaults=common)


def _stamps(path):
    # Leases (storage.lease: hidden `.<name>.lease` beside an artifact) are the writers' coordination state, renewed
    # by every claim; only the artifacts themselves must stay untouched.
    return {p: p.stat().st_mtime_ns for p in path.rglob("*") if p.is_file() and not p.name.endswith(".lease")}


def test_chain_resumes_the_killed_phase_and_recomputes_only_a_changed_phase(shapes_dataset, stand_in_vgg, tmp_path):
    from storage.shards import open_dataset

    root = tmp_path / "root"
    cfgs = _cfgs(stand_in_vgg)
    fps = chain_fingerprints(cfgs, open_dataset(shapes_dataset).fingerprint)
    dirs = [tmp_path / "root" / "runs" / "ae" / phase_run_url("", fp).rsplit("/", 1)[-1] for fp in fps]

    # killed in phase 2 after its step 2: phase 1 finished, phase 2 has a checkpoint, phase 3 not started
    part = train_recipe(cfgs, shapes_dataset, str(root), stop_at=(1, 2))
    assert part["finished"] is False and part["step"] == 2 and part["phase_name"] == "2-latent_adaptation"
    assert (dirs[0] / "done.json").exists() and not (dirs[1] / "done.json").exists() and not dirs[2].exists()
    phase1 = _stamps(dirs[0])
    rows_before = (dirs[1] / "metrics.jsonl").read_text().splitlines()

    out = train_recipe(cfgs, shapes_dataset, str(root))
    assert _stamps(dirs[0]) == phase1  # finished phase 1 was not touched
    rows = (dirs[1] / "metrics.jsonl").read_text().splitlines()
    assert rows[:2] == rows_before[:2] and [json.loads(r)["step"] for r in rows] == [1, 2, 3]  # resumed, not redone
    assert out["finished"] and out["chain_fingerprint"] == fps[2] and out["model_url"] == str(dirs[2] / "model")
    assert [p["phase"] for p in out["phases"]] == ["full", "latent_adaptation", "refinement"]
    cfg2 = json.loads((dirs[1] / "done.json").read_text())
    assert cfg2["phase"] == "latent_adaptation"
    import yaml

    assert yaml.safe_load((dirs[1] / "config.yaml").read_text())["config"]["init_from"] == str(dirs[0] / "model")
    assert "lpips" in json.loads(rows[-1])  # LPIPS-VGG (stand-in file) was in the loss
    assert "gan_d" in json.loads((dirs[2] / "metrics.jsonl").read_text().splitlines()[-1])

    # phase 3 changed: phases 1-2 keep their fingerprints and files, phase 3 gets a new run, the chain a new id
    before = _stamps(root)
    cfgs3 = _cfgs(stand_in_vgg, refine_lr=1e-4)
    fps3 = chain_fingerprints(cfgs3, open_dataset(shapes_dataset).fingerprint)
    assert fps3[:2] == fps[:2] and fps3[2] != fps[2]
    out3 = train_recipe(cfgs3, shapes_dataset, str(root))
    after = _stamps(root)
    assert {p: t for p, t in after.items() if p in before} == before  # nothing existing was rewritten
    assert out3["chain_fingerprint"] == fps3[2] and out3["fingerprint"] != out["fingerprint"]


def test_changing_phase_1_changes_every_later_fingerprint(stand_in_vgg):
    a = _cfgs(stand_in_vgg)
    b = phase_configs([{**a[0].to_dict(), "lr": 2e-3}, a[1].to_dict(), a[2].to_dict()], preset="tiny-f8c32", seed=0)
    fa, fb = chain_fingerprints(a, "ds"), chain_fingerprints(b, "ds")
    assert all(x != y for x, y in zip(fa, fb))
    assert chain_fingerprints(a, "other-dataset")[0] != fa[0]
    # a renamed phase or other operational fields are not part of the identity
    c = phase_configs([{**p.to_dict(), "name": f"p{i}", "log_every": 7} for i, p in enumerate(a)], preset="x", seed=0)
    assert chain_fingerprints(c, "ds") == fa


def test_resolve_phases_defaults_and_bad_configs():
    assert resolve_phases(None, {"steps": 5}, real_data=True) == [{"steps": 5}]  # older single-phase configs
    assert resolve_phases(None, {}, real_data=False) == [{}]
    paper = resolve_phases(None, {}, real_data=True)
    assert [p["phase"] for p in paper] == ["full", "latent_adaptation", "refinement"] == [p["phase"] for p in PAPER_PHASES]
    assert [p["resolution"] for p in paper] == [256, 512, 256]
    cfgs = phase_configs(paper, preset="dc-ae-f32c128-1.5", seed=0, defaults={"lpips_weights": "x"})
    assert [c.lr for c in cfgs] == [6.4e-5, 1.6e-5, 5.4e-5] and cfgs[2].betas == (0.5, 0.9) and cfgs[2].w_gan > 0
    assert resolve_phases("paper", None, real_data=False) == paper
    shared = resolve_phases([{"steps": 2}, {"phase": "refinement"}], {"steps": 1, "lr": 0.1}, real_data=False)
    assert shared == [{"steps": 2, "lr": 0.1}, {"phase": "refinement", "steps": 1, "lr": 0.1}]  # the phase wins
    with pytest.raises(ValueError, match="non-empty list"):
        resolve_phases([], None, real_data=False)
    with pytest.raises(ValueError, match="init_from"):
        phase_configs([{}, {"init_from": "/x"}], preset="tiny-f8c32", seed=0)
    with pytest.raises(ValueError, match="duplicate names"):
        phase_configs([{"name": "a"}, {"name": "a"}], preset="tiny-f8c32", seed=0)
    with pytest.raises(ValueError, match="finetune_channels"):
        phase_configs([{"phase": "decoder_finetune"}], preset="tiny-f8c32", seed=0)
