"""The autoencoder recipe as a chain of phases: each phase a cached, resumable run initialised from the previous one.

A phase's run directory is ``<root>/runs/ae/<id>`` where ``id`` is a short hash of the *chain fingerprint*: the
fingerprint of the previous phase's chain fingerprint (or of the dataset for phase 1) and this phase's identity
(``AETrainConfig.identity()`` without ``init_from``, which the chain decides; never the operational fields nor
``steps``: see ``storage.rundir.identity``). So

- changing phase 3 gives phase 3 a new directory while phases 1-2 keep theirs (already finished: a no-op);
- a phase killed mid-way resumes from its own last checkpoint (same directory, same config);
- a phase given only other operational fields (logging, checkpoint cadence, workers) or more steps continues in
  the same directory (more steps: from its last checkpoint, even once finished);
- the last phase's chain fingerprint covers every phase of the chain and the dataset.

Usable without Prefect (:func:`train_recipe`); ``flows.autoencoder`` runs one cached task per phase.
"""

from __future__ import annotations

from typing import Any

from dcae15.ae.train import AETrainConfig

__all__ = ["PAPER_PHASES", "resolve_phases", "phase_configs", "chain_fingerprints", "phase_run_url", "train_recipe",
           "finetune_decoder"]

# The DC-AE / DC-AE 1.5 recipe (DC-AE §3.2 "decoupled high-resolution adaptation"): low-resolution
# full training, high-resolution latent adaptation, low-resolution local refinement with the PatchGAN.
# Learning rates, betas and weight decays are the papers'; resolutions are DC-AE's (256 / 512 / 256).
# The papers publish no step counts, batch sizes or loss weights: those below are this project's choice (about
# 24 ImageNet epochs for phase 1 at a global batch of 256) — override them in the config.
PAPER_PHASES: list[dict[str, Any]] = [
    dict(name="1-full", phase="full", resolution=256, steps=120_000, batch_size=256, w_lpips=1.0,
         warmup_steps=1000, ema_decay=0.9999, checkpoint_every=2000),
    dict(name="2-latent-adaptation", phase="latent_adaptation", resolution=512, steps=20_000, batch_size=64,
         w_lpips=1.0, ema_decay=0.9999, checkpoint_every=2000),
    dict(name="3-refinement", phase="refinement", resolution=256, steps=20_000, batch_size=256, w_lpips=1.0,
         w_gan=0.1, gan_start_step=0, ema_decay=0.9999, checkpoint_every=2000),
]


def resolve_phases(phases: list[dict[str, Any]] | str | None, train: dict[str, Any] | None, *,
                   real_data: bool) -> list[dict[str, Any]]:
    """The list of phase dicts a config asks for.

    Args:
        phases: an explicit list of phase dicts (``AETrainConfig`` fields), ``"paper"`` for :data:`PAPER_PHASES`,
            or None.
        train: ``autoencoder.train``: with ``phases`` None, the one phase of a single-phase config (the demo);
            with ``phases``, fields shared by every phase (a phase's own value wins).
        real_data: the images come from a real source (not the generated demo set): with neither ``phases`` nor
            ``train`` the default is the paper's three phases; else one default phase.

    Raises:
        ValueError: an empty list, or a phase that is not a mapping.
    """
    train = dict(train or {})
    if phases is None and not (real_data and not train):
        return [train]
    if phases is None or phases == "paper":
        phases = PAPER_PHASES
    if isinstance(phases, str) or not isinstance(phases, (list, tuple)) or not phases:
        raise ValueError(f"autoencoder.phases must be 'paper' or a non-empty list of phase configs, got {phases!r}")
    for i, p in enumerate(phases):
        if not isinstance(p, dict):
            raise ValueError(f"autoencoder.phases[{i}] must be a mapping of AETrainConfig fields, got {p!r}")
    return [{**train, **p} for p in phases]


def phase_configs(phases: list[dict[str, Any]], *, preset: str, seed: int,
                  defaults: dict[str, Any] | None = None, paths: list[str] | None = None) -> list[AETrainConfig]:
    """Validated configs of a chain; later phases get ``init_from`` from the chain (set by :func:`train_recipe`).

    Args:
        phases: phase dicts (see :func:`resolve_phases`); ``name`` defaults to ``"<i>-<phase>"``.
        preset: the architecture of phase 1 (unless phase 1 has ``init_from``, e.g. an official checkpoint).
        seed: the pipeline seed, used where a phase sets none.
        defaults: fields applied to every phase unless it sets them (e.g. ``progress``, ``device``).
        paths: the config path of each phase, named in errors (default ``autoencoder.phases[i]``).

    Raises:
        ValueError: a later phase sets ``init_from`` (the chain decides it), duplicate names, or a bad field.
    """
    cfgs = []
    for i, p in enumerate(phases):
        if i > 0 and p.get("init_from"):
            raise ValueError(f"autoencoder.phases[{i}].init_from is set, but a later phase always starts from the "
                             "previous phase's model; put init_from on the first phase only")
        d = {"preset": preset, "seed": seed, **(defaults or {}), **p}
        d.setdefault("name", f"{i + 1}-{d.get('phase', 'full')}")
        cfgs.append(AETrainConfig.from_dict(d, paths[i] if paths else f"autoencoder.phases[{i}]"))
    names = [c.name for c in cfgs]
    if len(set(names)) != len(names):
        raise ValueError(f"autoencoder.phases have duplicate names {names}; give each phase its own 'name'")
    return cfgs


def chain_fingerprints(cfgs: list[AETrainConfig], dataset_fingerprint: str) -> list[str]:
    """One fingerprint per phase, each covering the dataset and every phase up to and including it."""
    from storage.fingerprint import fingerprint

    out, prev = [], {"dataset": str(dataset_fingerprint)}
    for i, cfg in enumerate(cfgs):
        ident = cfg.identity()
        if i > 0:
            ident.pop("init_from", None)  # decided by the chain: the previous phase's model
        fp = fingerprint({"previous": prev, "phase": ident})
        out.append(fp)
        prev = {"chain": fp}
    return out


def phase_run_url(root: str, chain_fingerprint: str) -> str:
    """``<root>/runs/ae/<short id of the chain fingerprint>``."""
    from storage.fingerprint import short_id
    from storage.layout import Root

    return Root(root).ae_run(short_id(chain_fingerprint))


def train_recipe(cfgs: list[AETrainConfig], dataset_url: str, root: str, *, stop_at: tuple[int, int] | None = None,
                 storage_options: dict | None = None) -> dict[str, Any]:
    """Run the chain in this process: each phase trains (or resumes, or is skipped when finished) in turn.

    Args:
        cfgs: from :func:`phase_configs`.
        dataset_url: the packed dataset.
        root: the pipeline root; phase ``i`` lands in ``phase_run_url(root, chain_fingerprints(...)[i])``.
        stop_at: ``(phase index, step)``: leave after checkpointing that step of that phase (kill tests).

    Returns:
        The last phase's pointer plus ``chain_fingerprint`` and ``phases`` (each phase's pointer); with
        ``stop_at`` the unfinished phase's pointer (``finished: False``).
    """
    import dataclasses

    from dcae15.ae.train import train_autoencoder
    from storage.shards import open_dataset

    dataset = open_dataset(dataset_url, storage_options)
    fps = chain_fingerprints(cfgs, str(dataset.fingerprint))
    done: list[dict[str, Any]] = []
    for i, (cfg, fp) in enumerate(zip(cfgs, fps)):
        if i > 0:
            cfg = dataclasses.replace(cfg, init_from=done[-1]["model_url"])
        at = stop_at[1] if stop_at is not None and stop_at[0] == i else None
        out = train_autoencoder(cfg, dataset_url, phase_run_url(root, fp), stop_at=at,
                                storage_options=storage_options, dataset=dataset)
        out = {**out, "phase_name": cfg.name, "chain_fingerprint": fp}
        if not out["finished"]:
            return out
        done.append(out)
    return {**done[-1], "phases": done}


def finetune_decoder(ae_url: str, dataset_url: str, runs_url: str, *, channels: int, train: dict[str, Any] | None = None,
                     ae_fingerprint: str | None = None, dataset: Any = None,
                     storage_options: dict | None = None) -> dict[str, Any]:
    """The ``decoder_finetune`` phase on a saved AE at one fixed c' (the paper's Figure 3 setting), cached.

    The encoder stays frozen, so the latent is unchanged; only the decoder is re-fitted to the first ``channels``
    channels, to "fully reveal the information encoded in the (partial) latent space". The run lands in
    ``<runs_url>/c<channels>-<id>`` (``id`` from the AE fingerprint and the phase's identity), so a finished
    fine-tune is reused and a killed one resumes.

    Args:
        ae_url: the saved AE (``init_from``).
        channels: the fixed c'.
        train: further ``AETrainConfig`` fields (steps, batch_size, lr, resolution, perceptual, ...).
        ae_fingerprint: the AE's fingerprint if known (else the URL identifies it).

    Returns:
        The trainer's pointer (``model_url``, ``fingerprint``, ``steps``, ``loss``, ``seconds``, ...).
    """
    from dcae15.ae.train import train_autoencoder
    from storage.fingerprint import short_id
    from storage.urls import join

    cfg = AETrainConfig.from_dict({"progress": False, **(train or {}), "phase": "decoder_finetune",
                                   "init_from": ae_url, "finetune_channels": int(channels)})
    ident = {**cfg.identity(), "init_from": ae_fingerprint or ae_url}
    run_url = join(runs_url, f"c{int(channels)}-{short_id(ident)}")
    return train_autoencoder(cfg, dataset_url, run_url, storage_options=storage_options, dataset=dataset)
