"""Stage 6: scores — generation metrics of a sample store (one row per (checkpoint, metric config) in the results
table), reconstruction metrics of the autoencoder, and the figures of the results."""

from __future__ import annotations

import dataclasses
from typing import Any

from prefect import flow, get_run_logger, task

from flows import names
from flows.artifacts import publish_metrics, publish_pointer, reference_progress, requests_shown
from flows.caching import STAGE_CACHE, run_cached
from flows.common import ConfigArg, stage_config
from flows.pointers import (describe_ae, describe_dataset, describe_recon, describe_row, describe_run, describe_samples,
                            results_url)

__all__ = ["extractor_for", "prepare_extractor", "load_reference_for", "reference_label", "protocol_of", "score_samples", "evaluate_samples", "reconstruction_scores", "evaluate_autoencoder",
           "checkpoints_to_score", "draw_run_figures", "plot_results"]


def extractor_for(ev: dict[str, Any], dataset_url: str) -> Any:
    """The feature network the config names: the demo's proxy classifier (trained and cached on first use) or
    the standard Inception network from local weights (``evaluate.options.inception_weights`` / $DCAE15_WEIGHTS),
    fed as DC-Gen feeds it under ``protocol: dc-gen`` (its FID and precision/recall features)."""
    if ev["extractor"] == "proxy":
        from dcae15.metrics.proxy import ProxyConfig, proxy_extractor

        return proxy_extractor(dataset_url, ProxyConfig(**ev["options"].get("proxy", {})))
    from dcae15.metrics.fidelity import inception_extractor

    pipeline = "pytorch-fid" if protocol_of(ev) == "dc-gen" else "torch-fidelity"
    return inception_extractor(ev["options"].get("inception_weights"), input=pipeline)


@task(name="prepare_extractor")
def prepare_extractor(dataset_url: str, ev: dict[str, Any]) -> bool:
    """Train the proxy classifier of ``ev`` into its cache ahead of the scoring that needs it, in a process of its
    own so that it can run beside the autoencoder's training (both seed torch's global RNG: two threads of one
    process would mix their draws). Returns whether it trained one (not for Inception, whose weights just load,
    nor for a classifier already cached)."""
    import json
    import sys

    from dcae15.metrics.proxy import ProxyConfig, proxy_is_cached
    from flows.launch import run_streaming

    options = ev["options"].get("proxy", {})
    if ev["extractor"] != "proxy" or proxy_is_cached(dataset_url, ProxyConfig(**options)):
        return False  # nothing to train (a rerun): the scoring loads it
    run_streaming([sys.executable, "-m", "dcae15.metrics", "proxy", dataset_url, "--config", json.dumps(options)],
                  log=lambda line: get_run_logger().info("[proxy] %s", line))
    return True


def reference_label(ev: dict[str, Any]) -> str:
    """The ``reference`` column of a result row: ``train-split`` (our statistics of the dataset's train split) or
    ``adm:<url>`` (an ADM reference batch, ``evaluate.reference``)."""
    ref = ev.get("reference") or "train"
    return "train-split" if ref == "train" else f"adm:{ref}"


def load_reference_for(ev: dict[str, Any], dataset_url: str, resolution: int, extractor: Any) -> Any:
    """The reference statistics the config names: an ADM reference batch, or the dataset's train split."""
    if (ev.get("reference") or "train") != "train":
        from dcae15.metrics.adm import adm_reference

        return adm_reference(ev["reference"], extractor)
    from dcae15.metrics.reference import get_reference

    return get_reference(dataset_url, resolution, extractor, **ev["options"].get("reference_stats", {}))


def protocol_of(ev: dict[str, Any]) -> str:
    """The evaluation protocol an ``evaluate`` section names (``EvalSection.resolve_protocol`` has resolved
    ``auto``; a section written before protocols existed scored with torch-fidelity's formulas, or the proxy's)."""
    name = ev.get("protocol") or "auto"
    if name == "auto":
        return "proxy" if ev.get("extractor") == "proxy" else "torch-fidelity"
    return name


def _row_key(samples: dict[str, Any], extractor_label: str, reference: str = "train-split",
             protocol: str = "torch-fidelity") -> dict[str, Any]:
    """The context columns that identify one scoring: (run, checkpoint, sample store, feature extractor, reference,
    protocol)."""
    return {"run_id": samples["run_id"], "step": samples["step"], "samples_url": samples["url"],
            "feature_extractor": extractor_label, "reference": reference, "protocol": protocol}


def _protocol_metrics(ev: dict[str, Any], protocol: str, num_samples: int) -> dict[str, Any]:
    """The generation options under ``protocol``: ``dc-gen`` compares precision/recall with
    ``evaluate.pr_reference`` and, without one, computes none (as DC-Gen does)."""
    from dcae15.metrics.fidelity import DEFAULT_METRICS
    from dcae15.metrics.protocols import get_protocol

    log = get_run_logger()
    options = dict(ev["options"].get("generation", {}))
    proto = get_protocol(protocol)
    if proto.num_samples and num_samples != proto.num_samples:
        log.warning("protocol %s scores %d samples; this sample store holds %d: not the table's number",
                    protocol, proto.num_samples, num_samples)
    if protocol != "dc-gen" or ev.get("pr_reference"):
        return options
    metrics = tuple(options.get("metrics", DEFAULT_METRICS))
    if {"precision", "recall"} & set(metrics):
        log.warning("protocol dc-gen: no evaluate.pr_reference (ADM's VIRTUAL batch), so no precision/recall")
        options["metrics"] = [m for m in metrics if m not in ("precision", "recall")]
    return options


@task(cache_policy=STAGE_CACHE, persist_result=True, result_serializer="json")
def score_samples(root: str, samples: dict[str, Any], dataset: dict[str, Any], ev: dict[str, Any],
                  resolution: int) -> dict[str, Any]:
    """Generation metrics of a sample store against the dataset's reference statistics; appends one result row."""
    from dcae15.metrics.fidelity import generation_metrics
    from dcae15.metrics.results import append_results, part_url
    from storage.fingerprint import short_id
    from storage.lease import claim

    log = get_run_logger()
    extractor = extractor_for(ev, dataset["url"])
    protocol = protocol_of(ev)
    key = _row_key(samples, extractor.label, reference_label(ev), protocol)
    row = short_id(key)
    # one evaluator per row: a second one (the sweep racing an event) waits, then finds the row (storage/lease.py)
    with requests_shown("evaluation row", row), \
            claim(part_url(results_url(root), row), what="evaluation row", log=log.info):
        if not describe_row(root, key)["complete"]:  # a rerun after a kill between append and cache write: no copy
            with reference_progress(dataset["url"], extractor.label):
                ref = load_reference_for(ev, dataset["url"], resolution, extractor)
                options, pr_ref = _protocol_metrics(ev, protocol, int(samples["num_samples"])), None
                if protocol == "dc-gen" and ev.get("pr_reference"):  # DC-Gen: precision/recall vs the VIRTUAL batch
                    from dcae15.metrics.adm import adm_reference

                    pr_ref = adm_reference(ev["pr_reference"], extractor)
            isc = None
            if protocol == "dc-gen":  # DC-Gen's IS: torch-fidelity's Inception with its own input
                from dcae15.metrics.fidelity import inception_extractor

                isc = inception_extractor(ev["options"].get("inception_weights"))
            values = generation_metrics(samples["url"], ref, extractor=extractor, resolution=resolution,
                                        protocol=protocol, pr_reference=pr_ref, isc_extractor=isc, **options)
            if extractor.prefix == "proxy-":  # do the class-conditional samples show their class?
                values["proxy-class_accuracy"] = _sample_class_accuracy(extractor, samples["url"])
            context = {"backbone": samples["backbone"], "store": samples.get("store_id", ""),
                       "autoencoder": samples.get("ae_fingerprint", ""), "sampler": samples["sampler"],
                       "sampling_steps": samples["sampling_steps"], "cfg_scale": samples["cfg_scale"],
                       "num_samples": samples["num_samples"], "dataset_fingerprint": dataset["fingerprint"],
                       "extractor_fingerprint": extractor.fingerprint, "reference_url": ref.url or "",
                       "pr_reference": f"adm:{ev['pr_reference']}" if pr_ref is not None else "",
                       **samples.get("sampling", {})}
            # part named by the key: an event-triggered evaluation racing the sweep still leaves one copy of the row
            append_results(results_url(root), [{**key, **context, **values}], part_id=short_id(key))
            log.info("scored %s step %s: %s", samples["run_id"], samples["step"], values)
            _track(root, samples["run_id"], samples["step"], values=values, label=row)
    return {"kind": "result_row", "root": root, "key": key}


def _track(root: str, run_id: str, step: int, **logged: Any) -> None:
    """Mirror an evaluation to the run's tracker (``diffusion.train.logging``; nothing when it is ``none``)."""
    from dcae15.tracking import log_evaluation
    from storage.layout import Root

    try:
        log_evaluation(Root(root).diffusion_run(run_id), int(step), **logged)
    except FileNotFoundError:  # samples of a run kept outside this root: its tracker is not known here
        _logger().info("run %s is not under %s: evaluation not mirrored to a tracker", run_id, root)


def _sample_class_accuracy(extractor: Any, samples_url: str, block: int = 1024) -> float:
    """The proxy classifier's accuracy on a sample store against the labels the samples were drawn for, read in
    blocks so a 50k-sample store never sits in memory at once."""
    from dcae15.metrics.proxy import class_accuracy, load_proxy_net
    from storage.sample_store import SampleStore

    store, net = SampleStore.open(samples_url, read_only=True), load_proxy_net(extractor)
    correct = 0
    for a in range(0, store.num_samples, block):
        images, labels = store.read_range(a, min(store.num_samples, a + block))
        correct += round(class_accuracy(extractor, images, labels, net=net) * len(labels))
    return correct / store.num_samples


@flow(name="evaluate_samples", flow_run_name=names.evaluate_name)
def evaluate_samples(samples: str, dataset: str, root: str | None = None, config: ConfigArg = "demo") -> dict[str, Any]:
    """Score the sample store at ``samples`` against the packed dataset at ``dataset``; one row in the results table."""
    cfg = stage_config(root, config)
    spointer = describe_samples(samples)
    if not spointer["complete"]:
        raise ValueError(f"sample store {samples} has missing units: rerun the sample flow first")
    return publish_metrics(run_cached(score_samples, root=cfg.root, samples=spointer,
                                      dataset=describe_dataset(dataset), ev=dataclasses.asdict(cfg.evaluate),
                                      resolution=cfg.resolution))


@task(cache_policy=STAGE_CACHE, persist_result=True, result_serializer="json")
def reconstruction_scores(root: str, ae: dict[str, Any], dataset: dict[str, Any], ev: dict[str, Any],
                          resolution: int) -> dict[str, Any]:
    """Per-c' PSNR / SSIM / LPIPS / rFID of the autoencoder with its figures, under ``<root>/eval/ae/<fingerprint>``."""
    from dcae15.ae.recon_eval import ReconEvalConfig, evaluate_reconstruction
    from storage.layout import Root

    out_url = Root(root).ae_eval(ae["fingerprint"])
    cfg = ReconEvalConfig(**{"resolution": resolution, **ev["options"].get("reconstruction", {})})
    extractor = extractor_for(ev, dataset["url"])
    evaluate_reconstruction(ae["url"], dataset["url"], out_url, cfg, extractor=extractor)
    if extractor.prefix == "proxy-":
        _proxy_check(out_url, ae, dataset, ev, extractor, resolution)
    return describe_recon(out_url, ae["fingerprint"])


def _proxy_check(out_url: str, ae: dict[str, Any], dataset: dict[str, Any], ev: dict[str, Any], extractor: Any,
                 resolution: int) -> None:
    """``proxy_check.json``: the proxy classifier on real vs reconstructed held-out images, and the proxy-FID
    floor (the AE's own reconstructions), which the results plot draws next to the samples' proxy-FID."""
    import json

    from dcae15.metrics.proxy import ProxyConfig
    from dcae15.metrics.recon_proxy import reconstruction_class_check
    from dcae15.metrics.reference import get_reference
    from storage.urls import join, put_atomic, url_to_fs

    ref = get_reference(dataset["url"], resolution, extractor, **ev["options"].get("reference_stats", {}))
    check = reconstruction_class_check(ae["url"], dataset["url"], extractor, ref, resolution=resolution,
                                       proxy_cfg=ProxyConfig(**ev["options"].get("proxy", {})))
    check.update(feature_extractor=extractor.label, ae_fingerprint=ae["fingerprint"],
                 **{f"proxy-{k}": v for k, v in extractor.info.items() if k.startswith("held_out_accuracy")})
    fs, path = url_to_fs(join(out_url, "proxy_check.json"))
    put_atomic(fs, path, json.dumps(check, indent=1).encode())
    get_run_logger().info("proxy classifier on held-out images: real %.3f, reconstructed %.3f (ratio %.2f); "
                          "proxy-FID floor (reconstructions) %.2f, real images %.2f",
                          check["proxy-class_accuracy_real"], check["proxy-class_accuracy_recon"],
                          check["recon_over_real"], check["proxy-fid_recon"], check["proxy-fid_real"])


@flow(name="evaluate_autoencoder", flow_run_name=names.evaluate_autoencoder_name)
def evaluate_autoencoder(ae: str, dataset: str, root: str | None = None, config: ConfigArg = "demo") -> dict[str, Any]:
    """Reconstruction quality of the autoencoder at ``ae`` per c' (the structured latent space), with figures."""
    cfg = stage_config(root, config)
    return publish_pointer("evaluate-ae", run_cached(reconstruction_scores, root=cfg.root,
                                                     ae=describe_ae(ae), dataset=describe_dataset(dataset),
                                                     ev=dataclasses.asdict(cfg.evaluate),
                                                     resolution=cfg.resolution))


def checkpoints_to_score(run_url: str, which: str) -> list[int]:
    """The checkpoint steps of a run to sample and score: ``all`` it keeps, or only the ``latest``."""
    from dcae15.diffusion.checkpoint import list_checkpoints

    latest = describe_run(run_url)["step"]
    return sorted({s for s in list_checkpoints(run_url) if s <= latest} | {latest}) if which == "all" else [latest]


@task
def draw_run_figures(root: str, run_url: str, samples_url: str, dataset_url: str,
                     classes: list[int] | None = None, class_names: str | None = None,
                     precision: str = "auto") -> list[str]:
    """A run's loss curve and a grid of its samples under ``<root>/eval/figures``: a row per shown class
    (``classes``, default a bounded spread of them, see ``dcae15.diffusion.plots.grid_classes``), each of
    ``GRID_PER_CLASS`` images, named by ``class_names`` (a ``LOC_synset_mapping.txt``-style file) or the wnid.

    The rows come from the scored store when it holds enough images of every shown class (read unit by unit, only
    the grid's images kept); otherwise (1000 classes with uniform labels leave most rows short) the grid classes get
    samples of their own, drawn as DiT's ``sample.py`` draws its figure (given class labels) with the scored store's
    checkpoint, sampler, steps, guidance, seed, shift and dopri5 tolerances (its attrs) and ``precision`` (the
    ``sample.precision`` that drew it: a store does not record it), into a small sample store under
    ``<root>/eval/grid-samples/`` that a rerun finds complete."""
    from dcae15.diffusion.checkpoint import open_run
    from dcae15.diffusion.plots import (GRID_PER_CLASS, collect_grid_images, display_names, grid_classes,
                                        loss_curve_png, read_class_names, rows_filled, sample_grid_png)
    from storage.fingerprint import short_id
    from storage.layout import Root
    from storage.sample_store import SampleStore
    from storage.shards import open_dataset
    from storage.urls import write_atomic

    store = SampleStore.open(samples_url, read_only=True)
    a = store.attrs
    run_id = a["run_id"]
    wnids = list(open_dataset(dataset_url).class_names)
    rows = grid_classes(len(wnids), classes)
    images, labels = collect_grid_images(store.iter_units(), rows, per_class=GRID_PER_CLASS)
    source = "the scored samples"
    if not rows_filled(labels, rows, GRID_PER_CLASS):
        grid_store = _grid_samples(root, run_url, samples_url, a, rows, GRID_PER_CLASS, precision=precision)
        images, labels = collect_grid_images(SampleStore.open(grid_store, read_only=True).iter_units(), rows,
                                             per_class=GRID_PER_CLASS)
        source = "class-conditional grid samples"
    names = display_names(wnids, read_class_names(class_names) if class_names else None)
    grid = sample_grid_png(images, labels, names, classes=rows, per_class=GRID_PER_CLASS,
                           title=f"{run_id} step {a['checkpoint_step']}: {a['sampler']} {a['steps']} steps, "
                                 f"CFG {a['cfg_scale']} ({source})")
    rows = open_run(run_url).metrics()
    loss = loss_curve_png(rows, title=f"{run_id}: training loss (EMA weights are sampled)")
    _track(root, run_id, int(a["checkpoint_step"]), images={"samples": grid},
           label=f"grid-{short_id(a.get('sample_id') or samples_url, length=8)}")
    out = []
    for name, data in ((f"{run_id}_samples.png", grid), (f"{run_id}_loss.png", loss)):
        url = Root(root).figure(name)
        write_atomic(url, data)
        out.append(url)
    return out


def _logger():
    """The Prefect run's logger inside a flow or task run, else this module's (a task body called directly)."""
    import logging

    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


def _grid_samples(root: str, run_url: str, samples_url: str, attrs: dict[str, Any], rows: list[int],
                  per_class: int, precision: str = "auto") -> str:
    """``per_class`` class-conditional samples of each grid class, drawn like the scored store (same checkpoint,
    sampler, steps, guidance, seed, shift, dopri5 tolerances; ``precision`` as the store was drawn) into
    ``<sample id>-grid-<key>``; resumes like any sample store."""
    from dcae15.diffusion.sample import sample_to_store
    from storage.fingerprint import short_id
    from storage.layout import Root
    from storage.urls import join

    sample_id = attrs.get("sample_id") or samples_url.rstrip("/").rsplit("/", 1)[-1]
    # the store records atol/rtol only where they are not sample_to_store's defaults (dopri5 alone reads them)
    tol = {k: float(attrs[k]) for k in ("atol", "rtol") if k in attrs}
    # under eval/, not samples/: the scored stores stay the only sample stores a root lists; the tolerances enter
    # the key (where set) so a grid drawn before they were passed on is not reopened with other attrs
    key = short_id(rows, per_class, *([tol] if tol else []))
    url = join(Root(root).eval(), "grid-samples", f"{sample_id}-grid-{key}")
    n = len(rows) * per_class
    _logger().info("grid: %d classes x %d class-conditional samples into %s", len(rows), per_class, url)
    return sample_to_store(run_url, url, num_samples=n, sampler=attrs["sampler"], steps=int(attrs["steps"]),
                           cfg_scale=float(attrs["cfg_scale"]), seed=int(attrs.get("seed", 0)),
                           checkpoint=int(attrs["checkpoint_step"]),
                           guidance_interval=tuple(attrs.get("guidance_interval", (0.0, 1.0))), labels="given",
                           classes=rows, batch_size=min(n, 64), chunk_size=n, ema=bool(attrs.get("ema", True)),
                           shift=float(attrs.get("shift", 1.0)), precision=precision, progress=False, **tol)


def reference_lines(root: str) -> dict[str, dict[str, float]]:
    """Per feature extractor, the autoencoder's own numbers the samples are measured against: proxy-FID of its
    reconstructions (the floor) and the proxy's class accuracy on them (what samples can reach at best)."""
    import json

    from storage.layout import Root
    from storage.urls import read_bytes

    out: dict[str, dict[str, float]] = {}
    for url in Root(root).ae_evals("proxy_check.json"):
        check = json.loads(read_bytes(url))
        out[check["feature_extractor"]] = {"proxy-fid": check["proxy-fid_recon"],
                                           "proxy-class_accuracy": check["proxy-class_accuracy_recon"]}
    return out


@task
def plot_results(root: str) -> list[str]:
    """Draw the results table's figures (metric vs step per backbone) under ``<root>/eval``; returns their URLs."""
    from dcae15.metrics.results import plot_results as plot
    from storage.layout import Root

    return plot(results_url(root), Root(root).eval(), references=reference_lines(root))
