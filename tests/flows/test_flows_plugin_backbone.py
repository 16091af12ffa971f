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
