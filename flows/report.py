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
        table = read_results(results_url)
        out["table"] = format_table(table)
        out["headline"] = _headline(fs, base, table)
    figures = set()
    for top in ("eval", "runs"):
        for pattern in (f"{base}/{top}/*.png", f"{base}/{top}/**/*.png"):
            figures.update(_glob(fs, pattern, prefix))
    out["figures"] = sorted(figures)
    return {k: v for k, v in out.items() if v}


def _headline(fs: Any, base: str, table: Any) -> str:
    """The numbers that say whether it learned: the proxy classifier on real vs reconstructed held-out images,
    the proxy-FID floor (the AE's own reconstructions), and each run's class accuracy / proxy-FID per checkpoint."""
    import json

    lines = []
    for path in sorted(fs.glob(f"{base}/eval/ae/*/proxy_check.json")):
        with fs.open(path, "rb") as f:
            c = json.loads(f.read())
        lines.append(f"autoencoder {c['ae_fingerprint'][:12]}: proxy classifier on {c['num_images']} held-out images: "
                     f"real {c['proxy-class_accuracy_real']:.3f}, reconstructed {c['proxy-class_accuracy_recon']:.3f} "
                     f"({c['recon_over_real']:.2f}x); proxy-FID floor (reconstructions) {c['proxy-fid_recon']:.2f}, "
                     f"real images {c['proxy-fid_real']:.2f}")
    rows = [r for r in table.rows() if r.get("metric") in ("proxy-class_accuracy", "proxy-fid")]
    for run in sorted({r["run_id"] for r in rows}):
        per_step: dict[int, dict[str, float]] = {}
        for r in rows:
            if r["run_id"] == run:
                per_step.setdefault(int(r.get("step") or 0), {})[r["metric"]] = r["value"]
        cells = ", ".join(f"{step}: {v.get('proxy-class_accuracy', float('nan')):.2f} / {v.get('proxy-fid', float('nan')):.1f}"
                          for step, v in sorted(per_step.items()))
        lines.append(f"{run}: class accuracy / proxy-FID by step: {cells}")
    return "\n".join(lines)
