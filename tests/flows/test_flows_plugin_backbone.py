"""Import-path backbones in the flows (issue 33): the config accepts them beside presets (objective required), and
the training task's cache key follows the plug-in's source file."""

from __future__ import annotations

import pytest

from flows.config import load_config

PLUGIN = "examples.lightning_dit:lightning_dit_tiny"


def test_config_takes_a_plugin_beside_a_preset_and_requires_the_objective():
    cfg = load_config({"diffusion": {"backbones": ["SiT-tiny", PLUGIN], "train": {"objective": "flow"}}})
    assert cfg.diffusion.backbones == ["SiT-tiny", PLUGIN]
    with pytest.raises(ValueError, match=r"diffusion\.train\.objective is required .*lightning_dit_tiny"):
        load_config({"diffusion": {"backbones": ["SiT-tiny", PLUGIN]}})
    with pytest.raises(ValueError, match="unknown presets.*package.module:factory"):
        load_config({"diffusion": {"backbones": ["lightning_dit.py"]}})


def test_a_plugin_that_cannot_be_found_is_a_config_error_before_prefect_starts(tmp_path, capsys):
    """Found when the config loads, not after the stages before training (the AE, the encode, the other
    backbones): one line naming the entry and what to do, no traceback, no Prefect server started."""
    from flows.cli import main

    missing = "no_such_lab.nets:make"
    with pytest.raises(ValueError, match=r"no_such_lab\.nets:make.*cannot be found.*PYTHONPATH"):
        load_config({"diffusion": {"backbones": ["SiT-tiny", missing], "train": {"objective": "flow"}}})
    with pytest.raises(SystemExit, match=r"dcae15 pipeline: config error: .*no_such_lab\.nets:make.*PYTHONPATH"):
        main(["pipeline", "--config", "tiny", "--root", str(tmp_path / "root"), "--backbones", "SiT-tiny", missing,
              "--set", "diffusion.train.objective=flow"])
    with pytest.raises(SystemExit, match=r"dcae15 train-diffusion: config error: .*no_such_lab\.nets:make"):
        main(["train-diffusion", "--config", "tiny", "--root", str(tmp_path / "root"), "--store", "x",
              "--backbone", missing, "--set", "diffusion.train.objective=flow"])
    assert not (tmp_path / "root").exists()  # nothing ran


def test_training_cache_key_follows_the_plugin_source(tmp_path, monkeypatch):
    from flows.caching import BackboneSource

    monkeypatch.syspath_prepend(str(tmp_path))
    src = tmp_path / "cache_key_net.py"
    src.write_text("def make(**kw):\n    raise NotImplementedError\n")
    key = BackboneSource().compute_key
    assert key(None, {"backbone": "DiT-tiny"}, {}) == ""
    before = key(None, {"backbone": "cache_key_net:make"}, {})
    src.write_text(src.read_text() + "# edited\n")
    assert key(None, {"backbone": "cache_key_net:make"}, {}) != before != ""


def test_rerun_record_key_follows_the_plugin_source(tmp_path, monkeypatch):
    """The CLI's Prefect-free rerun shortcut is keyed by the plug-in's source too (presets keep their keys)."""
    from flows import rerun

    monkeypatch.syspath_prepend(str(tmp_path))
    src = tmp_path / "rerun_key_net.py"
    src.write_text("def make(**kw):\n    raise NotImplementedError\n")
    config = {"diffusion": {"backbones": ["SiT-tiny", "rerun_key_net:make"]}}
    before = rerun.record_key("pipeline", config, {"backbones": None})
    assert rerun.record_key("pipeline", config, {"backbones": None}) == before
    src.write_text(src.read_text() + "# edited\n")
    assert rerun.record_key("pipeline", config, {"backbones": None}) != before
    presets = {"diffusion": {"backbones": ["SiT-tiny"]}}
    assert rerun._plugin_sources(presets, {}) == {}


def test_a_plugin_with_a_patched_config_is_refused_when_the_config_loads():
    """The demo config patchifies (patch_size 2); an import-path backbone takes whole latents: refused at load, not
    after the AE and the encode have run."""
    from flows.config import load_config

    with pytest.raises(ValueError, match="diffusion.train.patch_size=2 .*set diffusion.train.patch_size=1"):
        load_config("demo", {"diffusion": {"backbones": ["SiT-tiny", "examples.lightning_dit:lightning_dit_tiny"],
                                           "train": {"objective": "flow"}}})
    cfg = load_config("demo", {"diffusion": {"backbones": ["examples.lightning_dit:lightning_dit_tiny"],
                                             "train": {"objective": "flow", "patch_size": 1}}})
    assert cfg.diffusion.train.patch_size == 1
