"""The autoencoder recipe flow: one cached task per phase; a second run is all cache hits; a changed phase 3
recomputes only phase 3; the pointer names every phase's model and the chain fingerprint."""

from __future__ import annotations

import datetime as dt

import pytest

pytestmark = pytest.mark.slow


def _phases(refine_lr):
    return [dict(phase="full", steps=4, lr=1e-3),
            dict(phase="latent_adaptation", steps=2),
            dict(phase="refinement", steps=2, lr=refine_lr, disc_channels=8, disc_layers=2)]


def test_recipe_flow_caches_each_phase(prefect_api, tmp_path, results_dir, tiny_config, task_states_since):
    from flows.autoencoder import train_autoencoder
    from flows.prepare import prepare_images

    def cfg(refine_lr):
        # the tiny preset's autoencoder.train (perceptual none, ...) is shared by every phase; batch 4 overrides it
        ae = {"phases": [{**p, "batch_size": 4, "checkpoint_every": 2} for p in _phases(refine_lr)]}
        return tiny_config(tmp_path / "root", autoencoder=ae)

    def run(c):
        t0 = dt.datetime.now(dt.timezone.utc)
        out = train_autoencoder.with_options(result_storage=results_dir)(dataset=ds["url"], root=c["root"], config=c)
        states = task_states_since(t0, {"fit_autoencoder"})
        deadline = 0
        while len(states.get("fit_autoencoder", [])) < 3 and deadline < 10:  # states arrive asynchronously
            states, deadline = task_states_since(t0, {"fit_autoencoder"}), deadline + 1
        return out, sorted(states["fit_autoencoder"])

    c1 = cfg(5.4e-5)
    ds = prepare_images.with_options(result_storage=results_dir)(root=c1["root"], config=c1)
    first, states = run(c1)
    assert states == ["Completed"] * 3
    assert [p["phase"] for p in first["phases"]] == ["full", "latent_adaptation", "refinement"]
    assert first["url"] == first["phases"][-1]["url"] and first["url"].startswith(str(tmp_path / "root" / "runs" / "ae"))
    assert len({p["url"] for p in first["phases"]}) == 3

    again, states = run(c1)
    assert states == ["Cached"] * 3 and again == first

    changed, states = run(cfg(1e-4))
    assert states == ["Cached", "Cached", "Completed"]
    assert changed["phases"][:2] == first["phases"][:2] and changed["url"] != first["url"]
    assert changed["chain_fingerprint"] != first["chain_fingerprint"]


def test_recipe_phase_under_torchrun(prefect_api, tmp_path, results_dir, tiny_config):
    """nproc_per_node=2: the flow launches the phase with torchrun (DDP over 2 gloo ranks) and returns its model."""
    import json

    from flows.autoencoder import train_autoencoder
    from flows.prepare import prepare_images

    c = tiny_config(tmp_path / "root", autoencoder={"phases": [dict(phase="full", steps=2, batch_size=4)],
                                                     "nproc_per_node": 2})
    ds = prepare_images.with_options(result_storage=results_dir)(root=c["root"], config=c)
    out = train_autoencoder.with_options(result_storage=results_dir)(dataset=ds["url"], root=c["root"], config=c)
    done = json.loads((tmp_path / "root" / "runs" / "ae" / out["url"].rstrip("/").split("/")[-2] / "done.json").read_text())
    assert done["world_size"] == 2 and done["fingerprint"] == out["fingerprint"]
    assert (tmp_path / "root" / "runs" / "ae" / out["url"].rstrip("/").split("/")[-2] / "launch.yaml").exists()
