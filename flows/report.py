"""Where a root's outputs are: datasets, autoencoders, latent stores, runs, samples, the results table, figures."""

from __future__ import annotations

from typing import Any

__all__ = ["outputs_summary"]


def _glob(fs: Any, pattern: str, proto_prefix: str) -> list[str]:
    return sorted(proto_prefix + p for p in fs.glob(pattern))


def outputs_summary(root: str) -> dict[str, Any]:
    """List what a pipeline left under ``root`` (URLs), with the results table formatted as text."""
    from storage.urls import is_local, url_to_fs

    fs, base = url_to_fs(root)
    prefix = "" if is_local(root) else root.split("://", 1)[0] + "://"
    out: dict[str, Any] = {
        "dataset": ", ".join(_glob(fs, f"{base}/data/*", prefix)) or None,
        "autoencoder": ", ".join(_glob(fs, f"{base}/runs/ae/*/model", prefix)) or None,
        "store": ", ".join(_glob(fs, f"{base}/latents/*", prefix)) or None,
        "runs": _glob(fs, f"{base}/runs/diffusion/*", prefix),
        "samples": _glob(fs, f"{base}/samples/*", prefix),
    }
    results_url = f"{prefix}{base}/eval/results"
    if fs.exists(f"{base}/eval/results"):
        from dcae15.metrics.results import format_table, read_results

        out["results"] = results_url
        out["table"] = format_table(read_results(results_url))
    figures = set()
    for top in ("eval", "runs"):
        for pattern in (f"{base}/{top}/*.png", f"{base}/{top}/**/*.png"):
            figures.update(_glob(fs, pattern, prefix))
    out["figures"] = sorted(figures)
    return {k: v for k, v in out.items() if v}
