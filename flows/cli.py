"""The ``dcae15`` command: one subcommand per pipeline stage, ``pipeline`` (also spelled ``demo``) and ``results``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Callable

import yaml

from flows.config import preset_names

__all__ = ["build_parser", "main"]

DEFAULT_ROOT = "./demo_out"

_EPILOG = """\
Every location is a URL: a local directory, s3://bucket/prefix (endpoint and keys from AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) or memory://. Layout under --root: data/<name>/ (shards + index),
latents/<store_id>/ (Zarr latent store), runs/ae|diffusion/<run_id>/ (checkpoints, metrics), samples/<id>/,
eval/ (results/: the Parquet results table; plots), prefect-results/ (Prefect's cached task results).

Without PREFECT_API_URL each command starts Prefect's temporary local API (~15 s); with PREFECT_API_URL
pointing at `prefect server start`, runs appear in that server's UI. Rerunning a command with the same inputs
reuses every finished stage (cached); a killed run continues where it stopped.
"""


def _backbone_names() -> list[str]:
    from dcae15.models.registry import PRESETS

    return sorted(PRESETS)


def _parse_set(items: list[str]) -> dict[str, Any]:
    """``--set section.field=value`` (YAML value) into a nested overrides dict."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects section.field=value, got {item!r}")
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    return out


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--root", default=None,
                        help=f"object-storage root URL for every artifact (default: the config's root, {DEFAULT_ROOT})")
    common.add_argument("--config", default="demo",
                        help=f"a config preset ({', '.join(preset_names())}) or a YAML file (default: demo); "
                             "sections: data, autoencoder, encode, diffusion, sample, evaluate")
    common.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override one config field, e.g. --set diffusion.train.steps=200 (repeatable)")
    common.add_argument("--results", default=None, metavar="URL",
                        help="where Prefect persists cached task results (default: <root>/prefect-results)")

    parser = argparse.ArgumentParser(
        prog="dcae15",
        description="DC-AE 1.5 latent diffusion pipeline: prepare images, train the structured autoencoder, encode "
                    "a latent store with Dask, train several diffusion backbones on it, sample and evaluate — as "
                    "cached, resumable Prefect flows.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    backbones = _backbone_names()

    def add(name: str, help_: str, aliases: tuple[str, ...] = ()) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], help=help_, description=help_, epilog=_EPILOG,
                              aliases=list(aliases), formatter_class=argparse.RawDescriptionHelpFormatter)

    common.add_argument("--through-prefect", action="store_true",
                        help="demo/pipeline: run through Prefect even when an identical finished run's outputs are "
                             "all still valid (by default such a rerun is answered without starting Prefect)")
    # one command, two names: `demo` is the pipeline with its default config (the packaged demo preset)
    p = add("pipeline", "all stages: prepare -> train AE -> encode -> for each backbone: train, sample, evaluate, "
                        "then print where everything is. With the default --config demo (also spelled `dcae15 demo`): "
                        "a generated shapes dataset, a tiny AE and two tiny backbones on CPU (≈10 min first time, "
                        "seconds when rerun)", aliases=("demo",))
    p.add_argument("--backbones", nargs="+", choices=backbones, metavar="NAME",
                   help=f"backbone presets to train on the one store (default: the config's). Choices: {', '.join(backbones)}")
    add("prepare", "generate (or take --set data.source=URL) images and pack them into shards + an index")
    p = add("train-ae", "train the structured autoencoder on a packed dataset: the config's phases, each cached and "
                        "resumable (in-process, or torchrun when asked)")
    p.add_argument("--dataset", required=True, help="URL of a packed dataset (<root>/data/<name>)")
    p.add_argument("--nproc-per-node", type=int, default=None, help="> 1 trains each phase under torchrun (DDP)")
    p.add_argument("--nnodes", type=int, default=None, help="number of nodes for torchrun")
    p.add_argument("--torchrun-arg", action="append", default=[], metavar="ARG", help="extra torchrun argument (repeatable)")
    p = add("encode", "encode a packed dataset into a Zarr latent store with Dask (only missing units)")
    p.add_argument("--ae", required=True, help="URL of an autoencoder saved with save_pretrained")
    p.add_argument("--dataset", required=True, help="URL of a packed dataset")
    p.add_argument("--scheduler", default=None, help="Dask scheduler address (default: start a LocalCluster)")
    p.add_argument("--workers", type=int, default=None, help="LocalCluster worker processes")
    p = add("train-diffusion", "train one backbone on a latent store (in-process, or torchrun when asked; resumes)")
    p.add_argument("--store", required=True, help="URL of a complete latent store (<root>/latents/<store_id>)")
    p.add_argument("--backbone", required=True, choices=backbones, metavar="NAME", help=f"one of: {', '.join(backbones)}")
    p.add_argument("--nproc-per-node", type=int, default=None, help="> 1 launches torchrun with that many processes")
    p.add_argument("--nnodes", type=int, default=None, help="number of nodes for torchrun")
    p.add_argument("--torchrun-arg", action="append", default=[], metavar="ARG",
                   help="extra torchrun argument, passed through (repeatable), e.g. --torchrun-arg=--rdzv-endpoint=h:29500")
    p = add("sample", "sample a trained run into a sample store (resumes per unit)")
    p.add_argument("--run", required=True, help="URL of a diffusion run directory (<root>/runs/diffusion/<run_id>)")
    p.add_argument("--checkpoint", type=int, default=None, help="checkpoint step (default: the latest)")
    p = add("evaluate", "score a sample store against the real data and append rows to the results table <root>/eval/results/")
    p.add_argument("--samples", required=True, help="URL of a sample store")
    p.add_argument("--dataset", required=True, help="URL of the packed dataset the run was trained on")
    add("evaluate-new", "scan <root>/runs/diffusion and score every checkpoint without a result row")
    add("results", "print the results table (and list the plots) under <root>/eval; starts no Prefect API")
    return parser


def _print_outputs(summary: dict[str, Any]) -> None:
    print("\n=== dcae15: where the outputs are ===")
    for key in ("dataset", "autoencoder", "store"):
        if key in summary:
            print(f"{key:>12}: {summary[key]}")
    for run in summary.get("runs", []):
        print(f"{'run':>12}: {run}")
    for s in summary.get("samples", []):
        print(f"{'samples':>12}: {s}")
    if "results" in summary:
        print(f"{'metrics':>12}: {summary['results']}")
    for fig in summary.get("figures", []):
        print(f"{'figure':>12}: {fig}")
    if summary.get("table"):
        print("\n" + summary["table"])
    if summary.get("headline"):
        print("\n" + summary["headline"])
    if summary.get("stage_seconds"):  # concurrent stages overlap: their times add up to more than the wall time
        print("\n=== wall time per stage (s) ===")
        for name, sec in summary["stage_seconds"].items():
            print(f"{name:>28}: {sec:7.1f}")


def _run(args: argparse.Namespace) -> Any:
    from flows.env import apply_cpu_defaults, apply_prefect_defaults, local_root
    from flows.config import load_config

    overrides = _parse_set(args.set)
    if args.root:
        overrides["root"] = args.root
    try:
        cfg = load_config(args.config, overrides)  # fail fast on a bad config, before Prefect starts
    except ValueError as exc:
        raise SystemExit(f"dcae15 {args.command}: config error: {exc}") from None
    root = local_root(cfg.root)
    apply_prefect_defaults(root)
    apply_cpu_defaults()

    from flows.autoencoder import train_autoencoder
    from flows.caching import result_storage_for
    from flows.diffusion import train_diffusion
    from flows.encode import encode_latents
    from flows.evaluate import evaluate_samples
    from flows.pipeline import run_pipeline
    from flows.prepare import prepare_images
    from flows.sample import sample_run
    from flows.score_checkpoints import evaluate_new_checkpoints
    from storage.layout import Root

    storage = result_storage_for(args.results or Root(root).prefect_results())
    config = {**cfg.to_dict(), "root": root}

    def call(flow_obj: Any, **kw: Any) -> Any:
        return flow_obj.with_options(result_storage=storage)(root=root, config=config, **kw)

    c = args.command
    if c in ("demo", "pipeline"):
        return _pipeline_or_shortcut(args, root, config, lambda: call(run_pipeline, backbones=args.backbones))
    if c == "prepare":
        return call(prepare_images)
    if c == "train-ae":
        return call(train_autoencoder, dataset=args.dataset, nproc_per_node=args.nproc_per_node, nnodes=args.nnodes,
                    torchrun_args=args.torchrun_arg or None)
    if c == "encode":
        return call(encode_latents, ae=args.ae, dataset=args.dataset, scheduler=args.scheduler, workers=args.workers)
    if c == "train-diffusion":
        return call(train_diffusion, store=args.store, backbone=args.backbone, nproc_per_node=args.nproc_per_node,
                    nnodes=args.nnodes, torchrun_args=args.torchrun_arg or None)
    if c == "sample":
        return call(sample_run, run=args.run, checkpoint=args.checkpoint)
    if c == "evaluate":
        return call(evaluate_samples, samples=args.samples, dataset=args.dataset)
    if c == "evaluate-new":
        return call(evaluate_new_checkpoints)
    raise SystemExit(f"unknown command {c!r}")


def _pipeline_or_shortcut(args: argparse.Namespace, root: str, config: dict[str, Any], run: Callable[[], Any]) -> Any:
    """Answer an identical finished pipeline from its validated pointers (flows/rerun.py), else run it."""
    from flows import rerun
    from flows.report import outputs_summary

    key = rerun.record_key("pipeline", config, {"backbones": args.backbones})
    if not args.through_prefect and rerun.shortcut_allowed():
        problem = rerun.check_record(root, key)
        if problem is None:
            print("dcae15: every stage's output is still valid (identical finished run): not starting Prefect "
                  "(--through-prefect to run it anyway)")
            return outputs_summary(root)
        print(f"dcae15: running through Prefect ({problem})")
    rerun.reset()
    out = run()
    rerun.save_record(root, key)
    return out


def _results(args: argparse.Namespace) -> None:
    from flows.config import load_config
    from flows.env import local_root
    from flows.report import outputs_summary

    overrides = {"root": args.root} if args.root else {}
    root = local_root(load_config(args.config, overrides).root)
    _print_outputs(outputs_summary(root))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dcae15`` console script."""
    args = build_parser().parse_args(argv)
    if args.command == "results":
        _results(args)
        return 0
    t0 = time.perf_counter()
    out = _run(args)
    if args.command in ("demo", "pipeline"):
        if isinstance(out, dict) and "in the flow" in out.get("stage_seconds", {}):
            out["stage_seconds"]["Prefect start, imports, exit"] = round(
                time.perf_counter() - t0 - out["stage_seconds"]["in the flow"], 1)
        _print_outputs(out)
    else:
        print(json.dumps(out, indent=2, default=str))
    print(f"\ndcae15 {args.command}: done in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
