"""Where a root's outputs are: datasets, autoencoders, latent stores, runs, samples, the results table, figures."""

from __future__ import annotations

from typing import Any

__all__ = ["outputs_summary"]


def outputs_summary(root: str) -> dict[str, Any]:
    """List what a pipeline left under ``root`` (URLs), with the results table formatted as text."""
    from storage.layout import Root
    from storage.urls import exists

    at = Root(root)
    out: dict[str, Any] = {
        "dataset": ", ".join(at.datasets()) or None,
        "autoencoder": ", ".join(at.ae_models()) or None,
        "store": ", ".join(at.latent_stores()) or None,
        "runs": at.diffusion_runs(),
        "samples": at.sample_stores(),
    }
    results_url = at.results()
    if exists(results_url):
        from dcae15.metrics.results import format_table, read_results

        out["results"] = results_url
        table = read_results(results_url)
        out["table"] = format_table(table)
        out["headline"] = _headline(at, table)
    out["figures"] = at.figures()
    return {k: v for k, v in out.items() if v}


def _headline(at: Any, table: Any) -> str:
    """The numbers that say whether it learned: the proxy classifier on real vs reconstructed held-out images,
    the proxy-FID floor (the AE's own reconstructions), and each run's class accuracy / proxy-FID per checkpoint."""
    import json

    from storage.urls import read_bytes

    lines = []
    for url in at.ae_evals("proxy_check.json"):
        c = json.loads(read_bytes(url))
        lines.append(f"autoencoder {c['ae_fingerprint'][:12]}: proxy classifier on {c['num_images']} held-out images: "
                     f"real {c['proxy-class_accuracy_real']:.3f}, reconstructed {c['proxy-class_accuracy_recon']:.3f} "
                     f"({c['recon_over_real']:.2f}x); proxy-FID floor (reconstructions) {c['proxy-fid_recon']:.2f}, "
                     f"real images {c['proxy-fid_real']:.2f}")
    rows = [r for r in table.rows() if r.get("metric") in ("proxy-class_accuracy", "proxy-fid")]
    # One line per (run, sampling setting): a rerun with another CFG or sampler adds rows for the same steps, and
    # its numbers must not overwrite (or mix with) the first setting's.
    setting = ("sampler", "sampling_steps", "cfg_scale", "num_samples")
    groups: dict[tuple, dict[int, dict[str, float]]] = {}
    for r in rows:
        key = (r["run_id"], *(r.get(k) for k in setting))
        groups.setdefault(key, {}).setdefault(int(r.get("step") or 0), {})[r["metric"]] = r["value"]
    for (run, sampler, steps, cfg, n), per_step in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
        cells = ", ".join(f"{step}: {v.get('proxy-class_accuracy', float('nan')):.2f} / {v.get('proxy-fid', float('nan')):.1f}"
                          for step, v in sorted(per_step.items()))
        how = f"{sampler} {steps} steps, CFG {cfg}, {n} samples"
        lines.append(f"{run} ({how}): class accuracy / proxy-FID by step: {cells}")
    return "\n".join(lines)
