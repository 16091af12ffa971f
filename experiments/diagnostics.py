"""Issue 32's diagnostic: how much of the latent a diffusion backbone's output head cannot express, per c.

The backbone's last layer is ``Linear(hidden H -> p²c)`` (``dcae15.models.dit.FinalLayer``, no skip): every output
token lies in ``bias + span(W)``, a subspace of dimension rank(W) <= H of the token space (dimension D = p²c). A
flow sampler moves ``x`` only along the model's output, so the part of a latent token outside span(W) keeps
whatever the starting noise put there. The diagnostic measures the share of the data's per-token variance in
those directions:

    share = 1 - tr(P Σ) / tr(Σ),   Σ = covariance of the patchified latent tokens (all positions pooled),
                                   P = orthogonal projector onto span(W)

(pooled over positions because the bias is shared by every position: a position-dependent mean counts as
variance). The share is scale-free, so the store's scaling factor does not matter. Its checkpoint-free lower
bound counts directions only: at least max(0, D - H) of the D output directions are constant (``head_bound``).

Run over a sweep root (every finished ``stages/dit-*.json`` run, its last checkpoint and its store):

    .venv/bin/python -m experiments.diagnostics --root /work/exp32 [--max-tokens 200000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

__all__ = ["backbone_hidden", "head_bound", "bound_table", "bound_markdown", "patchify", "outside_share",
           "run_diagnostic",
           "diagnose_root", "rows_markdown", "main"]


def backbone_hidden(sc) -> int:
    """The hidden width of a scale's diffusion backbone (``sc.dit_model``'s preset, then ``sc.dit_overrides``)."""
    from dcae15.models.registry import preset

    return int(sc.dit_overrides.get("hidden", preset(sc.dit_model).hidden))


def head_bound(hidden: int, patch: int, channels: int) -> float:
    """max(0, D - H) / D with D = p²c: the least share of output directions a ``Linear(H -> D)`` head leaves
    constant (whatever its weights)."""
    if hidden < 1 or patch < 1 or channels < 1:
        raise ValueError(f"head_bound needs positive hidden, patch, channels; got {hidden}, {patch}, {channels}")
    d = patch * patch * channels
    return max(0, d - hidden) / d


def bound_table(channels: tuple[int, ...], backbones: dict[str, tuple[int, int]]) -> list[dict]:
    """[{c, <name>: {token_dim, hidden, bound}}] for ``backbones`` = {name: (hidden, patch)}."""
    return [{"c": c, **{name: {"token_dim": p * p * c, "hidden": h, "bound": head_bound(h, p, c)}
                        for name, (h, p) in backbones.items()}} for c in channels]


def bound_markdown(channels: tuple[int, ...], backbones: dict[str, tuple[int, int]]) -> list[str]:
    """The bound table as markdown lines (for RESULTS)."""
    names = list(backbones)
    head = "| c | " + " | ".join(f"{n}: D = p²c | constant share >= (D−H)/D" for n in names) + " |"
    lines = [head, "|---|" + "---|---|" * len(names)]
    for row in bound_table(channels, backbones):
        cells = []
        for n in names:
            r = row[n]
            d = r["token_dim"]
            cells += [str(d), f"{max(0, d - r['hidden'])}/{d} = {r['bound']:.3f}"]
        lines.append(f"| {row['c']} | " + " | ".join(cells) + " |")
    return lines


def patchify(latents: np.ndarray, patch: int) -> np.ndarray:
    """Latents [N, C, H, W] -> tokens [N * (H/p) * (W/p), p*p*C] in the backbone's (p1 p2 C) order
    (the inverse of ``dcae15.models.layers.unpatchify``)."""
    n, c, h, w = latents.shape
    if h % patch or w % patch:
        raise ValueError(f"latent size {h}x{w} is not divisible by patch {patch}")
    x = latents.reshape(n, c, h // patch, patch, w // patch, patch)
    return x.transpose(0, 2, 4, 3, 5, 1).reshape(-1, patch * patch * c)


def outside_share(weight: np.ndarray, tokens: np.ndarray, rtol: float = 1e-6) -> dict:
    """Share of the tokens' variance outside the column space of ``weight`` [D, H] (a Linear's weight).

    Args:
        weight: the output layer's weight, rows = the D token dimensions.
        tokens: [N, D] data tokens.
        rtol: singular values below ``rtol`` x the largest count as zero (the rank).

    Returns:
        {"share": float, "rank": int, "token_dim": D, "hidden": H}.
    """
    w = np.asarray(weight, np.float64)
    x = np.asarray(tokens, np.float64)
    if w.ndim != 2 or x.ndim != 2 or x.shape[1] != w.shape[0]:
        raise ValueError(f"need weight [D, H] and tokens [N, D]; got {w.shape} and {x.shape}")
    u, s, _ = np.linalg.svd(w, full_matrices=False)
    rank = int((s > rtol * s.max()).sum()) if s.size and s.max() > 0 else 0
    basis = u[:, :rank]  # (D, r) orthonormal basis of span(W)
    x = x - x.mean(axis=0, keepdims=True)
    total = float((x * x).sum())
    if total == 0:
        raise ValueError("the tokens have no variance")
    inside = float(((x @ basis) ** 2).sum())
    return {"share": max(0.0, 1.0 - inside / total), "rank": rank, "token_dim": int(w.shape[0]),
            "hidden": int(w.shape[1])}


def _final_weight(run_url: str) -> tuple[np.ndarray, dict, int]:
    """(final layer weight [D, H] of the run's last checkpoint's EMA weights, model config, step)."""
    import torch

    from dcae15.diffusion.checkpoint import checkpoint_url, list_checkpoints, load_ema_state, read_run_config
    from dcae15.models.registry import ModelConfig, build_model

    cfg = read_run_config(run_url)
    steps = list_checkpoints(run_url)
    if not steps:
        raise FileNotFoundError(f"{run_url} has no checkpoint")
    model = build_model(ModelConfig(**cfg["model_config"]))
    load_ema_state(checkpoint_url(run_url, steps[-1]), model)
    with torch.no_grad():
        return model.final_layer.linear.weight.double().numpy(), cfg, steps[-1]


def run_diagnostic(run_url: str, *, max_tokens: int = 200_000) -> dict:
    """The diagnostic for one trained run: its last checkpoint's head against its own store's latents."""
    from storage.latent_store import LatentStore

    weight, cfg, step = _final_weight(run_url)
    mc = cfg["model_config"]
    store = LatentStore.open(cfg["store_url"])
    p = int(mc["patch_size"])
    per_image = (store.latent_shape[1] // p) * (store.latent_shape[2] // p)
    valid = np.flatnonzero(np.asarray(store.valid(), bool))
    n = min(len(valid), max(1, max_tokens // per_image))
    lat = np.asarray(store.read_range(0, int(valid[n - 1]) + 1), np.float64)
    keep = np.asarray(store.valid(), bool)[: len(lat)]
    res = outside_share(weight, patchify(lat[keep], p))
    return {**res, "run_url": run_url, "step": step, "channels": int(mc["in_channels"]), "patch": p,
            "bound": head_bound(int(mc["hidden"]), p, int(mc["in_channels"])), "num_images": int(keep.sum())}


def diagnose_root(root: Path, *, max_tokens: int = 200_000) -> list[dict]:
    """``run_diagnostic`` for every finished diffusion run (``stages/dit-*.json``) of a sweep root."""
    rows = []
    for marker in sorted((root / "stages").glob("dit-*.json")):
        run_url = json.loads(marker.read_text())["result"]["run_url"]
        rows.append({"run": marker.stem[len("dit-"):], **run_diagnostic(run_url, max_tokens=max_tokens)})
    return rows


def rows_markdown(rows: list[dict]) -> list[str]:
    """``diagnose_root``'s rows as a markdown table."""
    lines = ["| run | c | patch | D = p²c | H | rank(W) | share outside span(W) | bound (D−H)/D |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['channels']} | {r['patch']} | {r['token_dim']} | {r['hidden']} | {r['rank']} "
                     f"| {r['share']:.4f} | {r['bound']:.3f} |")
    return lines


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", required=True, type=Path, help="a sweep root (experiments.channels / channels_wide)")
    ap.add_argument("--max-tokens", type=int, default=200_000, help="latent tokens read per store (first images)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    if not (args.root / "stages").is_dir():
        raise SystemExit(f"experiments.diagnostics: {args.root} has no stages/ folder (not a sweep root)")
    rows = diagnose_root(args.root, max_tokens=args.max_tokens)
    print("\n".join(rows_markdown(rows) if rows else ["no finished diffusion run under " + str(args.root)]))
    print()
    print("\n".join(bound_markdown((8, 16, 32, 64), {"SiT-tiny p=2 (fmnist)": (96, 2),
                                                      "SiT-tiny p=1 (fmnist-wide)": (96, 1)})))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
