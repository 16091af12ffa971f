"""The demo's headline: one line per run and sampling setting, never two settings' numbers mixed."""

from __future__ import annotations

from dcae15.metrics.results import append_results, read_results
from flows.report import _headline
from storage.layout import Root


def _rows(run: str, cfg: float, acc: dict[int, float]) -> list[dict]:
    ctx = {"run_id": run, "backbone": "SiT-tiny", "sampler": "heun", "sampling_steps": 16, "cfg_scale": cfg,
           "num_samples": 256, "feature_extractor": "proxy-x"}
    return [{**ctx, "step": step, "proxy-class_accuracy": a, "proxy-fid": 10.0 + step / 100} for step, a in acc.items()]


def test_headline_keeps_sampling_settings_apart(tmp_path):
    at = Root(str(tmp_path))
    append_results(at.results(), _rows("SiT-tiny-abc", 2.5, {600: 0.44, 1200: 0.51}))
    append_results(at.results(), _rows("SiT-tiny-abc", 4.0, {600: 0.48, 1200: 0.49}))
    lines = _headline(at, read_results(at.results())).splitlines()
    assert lines == [
        "SiT-tiny-abc (heun 16 steps, CFG 2.5, 256 samples): class accuracy / proxy-FID by step: "
        "600: 0.44 / 16.0, 1200: 0.51 / 22.0",
        "SiT-tiny-abc (heun 16 steps, CFG 4.0, 256 samples): class accuracy / proxy-FID by step: "
        "600: 0.48 / 16.0, 1200: 0.49 / 22.0",
    ]
