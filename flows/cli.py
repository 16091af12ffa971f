"""The ``dcae15`` command: one subcommand per pipeline stage, ``pipeline`` (also spelled ``demo``) and ``results``.

Building the parser imports no torch, Prefect or Zarr (``dcae15 --help`` and ``dcae15 results`` answer in about a
second): each command imports what it needs inside its own function, and the backbone choices are read from the
model registry only when a backbone name is checked or a subcommand's help is printed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Callable

import yaml

from flows.config_files import preset_names, read_raw_config

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


def _backbone(text: str) -> str:
    """A preset name or an import path ``package.module:factory`` (checked at parse time, imported later)."""
    from dcae15.models.registry import PRESETS, check_backbone_name

    try:
        return check_backbone_name(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from {', '.join(sorted(PRESETS))}, or "
                                         "an import path package.module:factory)") from None


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated class ids like 207,360, got {text!r}") from None


def _float_pair(text: str) -> list[float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI like 0.1,0.7, got {text!r}") from None
    return [lo, hi]


_SAMPLE_FLAGS = {"num_samples": "num_samples", "sampler": "sampler", "steps": "steps", "classes": "classes",
                 "cfg": "cfg_scale", "guidance_interval": "guidance_interval", "labels": "labels", "seed": "seed",
                 "grid": "grid", "png_dir": "png_dir", "shift": "shift"}  # `dcae15 sample` flag -> sample section field


def sample_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The ``sample`` section fields that ``dcae15 sample``'s flags set (only the flags given)."""
    return {field: getattr(args, flag) for flag, field in _SAMPLE_FLAGS.items() if getattr(args, flag) is not None}


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


# ---------------------------------------------------------------------------------------------------------------
# The parser: the options every command shares, then one function per group of subcommands (in the order
# `dcae15 --help` lists them)
# ---------------------------------------------------------------------------------------------------------------

_AddCommand = Callable[..., argparse.ArgumentParser]


def _common_options() -> argparse.ArgumentParser:
    """The parent parser of every subcommand: --root, --set, --results, --through-prefect."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--root", default=None,
                        help=f"object-storage root URL for every artifact (default: the config's root, {DEFAULT_ROOT})")
    common.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override one config field, e.g. --set diffusion.train.steps=200 (repeatable)")
    common.add_argument("--results", default=None, metavar="URL",
                        help="where Prefect persists cached task results (default: <root>/prefect-results)")
    common.add_argument("--through-prefect", action="store_true",
                        help="demo/pipeline: run through Prefect even when an identical finished run's outputs are "
                             "all still valid (by default such a rerun is answered without starting Prefect)")
    return common


def _command_adder(sub: Any, common: argparse.ArgumentParser) -> _AddCommand:
    """``add(name, help, aliases=(), config="demo")``: a subcommand with the common options and its own --config."""

    def add(name: str, help_: str, aliases: tuple[str, ...] = (), config: str = "demo") -> argparse.ArgumentParser:
        sp = sub.add_parser(name, parents=[common], help=help_, description=help_, epilog=_EPILOG,
                            aliases=list(aliases), formatter_class=argparse.RawDescriptionHelpFormatter)
        # --config is each command's own action: a parent's actions are shared objects, so set_defaults on one
        # subparser changed the default of every command (`dcae15 demo` ran the rehearsal config)
        sp.add_argument("--config", default=config,
                        help=f"a config preset ({', '.join(preset_names())}) or a YAML file (default: {config}); "
                             "sections: data, autoencoder, encode, diffusion, sample, evaluate")
        return sp

    return add


def _pipeline_commands(add: _AddCommand) -> None:
    """``pipeline`` (also ``demo``) and ``rehearse``: every stage in one flow."""
    # one command, two names: `demo` is the pipeline with its default config (the packaged demo preset)
    p = add("pipeline", "all stages: prepare -> train AE -> encode -> for each backbone: train, sample, evaluate, "
                        "then print where everything is. With the default --config demo (also spelled `dcae15 demo`): "
                        "a generated shapes dataset, a tiny AE and two tiny backbones on CPU (≈10 min first time, "
                        "seconds when rerun)", aliases=("demo",))
    p.add_argument("--backbones", nargs="+", type=_backbone, metavar="NAME",
                   help="backbones to train on the one store (default: the config's): presets (DiT-XL, SiT-XL, "
                        "UViT-H, USiT-H, ... the tiny ones for CPU) or import paths package.module:factory "
                        "(docs/backbones.md)")
    p = add("rehearse", "the ImageNet job rehearsed on this machine: --config rehearsal (configs/imagenet.yaml with "
                        "sizes reduced) on a generated ImageNet-shaped tree (1000 wnid folders of JPEGs, a few odd "
                        "files) with stand-in weight files; prints each stage's time and peak RSS", config="rehearsal")
    p.add_argument("--per-class", type=int, default=1, help="JPEGs per wnid folder (default 1: 1000 images + 5 odd)")


def _training_commands(add: _AddCommand) -> None:
    """``prepare``, ``train-ae``, ``encode``, ``train-diffusion``: the stages up to a trained backbone."""
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
    p.add_argument("--backbone", required=True, type=_backbone, metavar="NAME",
                   help="a preset (DiT-XL, SiT-XL, UViT-H, USiT-H, ... the tiny ones for CPU; a wrong name lists "
                        "them all) or an import path package.module:factory (needs --set diffusion.train.objective="
                        "...; docs/backbones.md)")
    p.add_argument("--nproc-per-node", type=int, default=None, help="> 1 launches torchrun with that many processes")
    p.add_argument("--nnodes", type=int, default=None, help="number of nodes for torchrun")
    p.add_argument("--torchrun-arg", action="append", default=[], metavar="ARG",
                   help="extra torchrun argument, passed through (repeatable), e.g. --torchrun-arg=--rdzv-endpoint=h:29500")


def _sample_command(add: _AddCommand) -> None:
    """``sample``: each flag is a field of the config's sample section (``_SAMPLE_FLAGS``)."""
    p = add("sample", "sample a trained run into a sample store (resumes per unit)")
    p.add_argument("--run", required=True, help="URL of a diffusion run directory (<root>/runs/diffusion/<run_id>)")
    p.add_argument("--checkpoint", type=int, default=None, help="checkpoint step (default: the latest)")
    # each flag is a field of the config's sample section (the same names in YAML / --set sample.<field>=...)
    p.add_argument("--num-samples", type=int, default=None, help="sample.num_samples (50000 for FID-50K)")
    p.add_argument("--sampler", default=None, help="sample.sampler (ddpm/ddim, euler/heun/dopri5/sde)")
    p.add_argument("--steps", type=int, default=None, help="sample.steps")
    p.add_argument("--shift", type=float, default=None,
                   help="sample.shift: flow models' timestep shift t' = s t / (1 + (s-1) t) (LightningDiT; 1 = none)")
    p.add_argument("--classes", type=_int_list, default=None, metavar="C,C,...",
                   help="sample.classes: class ids to sample, e.g. 207,360,387 (default: all)")
    p.add_argument("--cfg", type=float, default=None, help="sample.cfg_scale (1.0 = no guidance)")
    p.add_argument("--guidance-interval", type=_float_pair, default=None, metavar="LO,HI",
                   help="sample.guidance_interval: apply CFG only for t in [LO, HI] (1 = noise), e.g. 0.1,0.7")
    p.add_argument("--labels", choices=("uniform", "balanced", "given"), default=None,
                   help="sample.labels: uniform (FID protocol), balanced, or given (exactly --classes, in order)")
    p.add_argument("--seed", type=int, default=None, help="sample.seed")
    p.add_argument("--grid", default=None, metavar="PNG", help="sample.grid: also write a grid (a row per class)")
    p.add_argument("--png-dir", default=None, metavar="DIR", help="sample.png_dir: also write <index>.png files")


def _evaluate_commands(add: _AddCommand) -> None:
    """``evaluate`` and ``evaluate-new``: rows of the results table."""
    p = add("evaluate", "score a sample store against the real data and append rows to the results table <root>/eval/results/")
    p.add_argument("--samples", required=True, help="URL of a sample store")
    p.add_argument("--dataset", required=True, help="URL of the packed dataset the run was trained on")
    add("evaluate-new", "scan <root>/runs/diffusion and score every checkpoint without a result row")


def _export_commands(add: _AddCommand) -> None:
    """``export-npz``, ``export``, ``convert-ae``, ``export-ae``: files for other tools (no Prefect API)."""
    p = add("export-npz", "write a complete sample store as an ADM-layout .npz (arr_0 uint8 N×H×W×3, arr_1 labels) "
                          "for openai/guided-diffusion's evaluator; starts no Prefect API")
    p.add_argument("--samples", required=True, help="URL of a complete sample store (<root>/samples/<id>)")
    p.add_argument("--out", required=True, help="the .npz file to write (local path or URL)")
    p = add("export", "write a run's EMA weights (or --raw) as one .safetensors file with the model config in its "
                      "metadata (+ <out>.json); starts no Prefect API")
    p.add_argument("--run", required=True, help="URL of a diffusion run directory")
    p.add_argument("--checkpoint", type=int, default=None, help="checkpoint step (default: the latest)")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--ema", dest="ema", action="store_true", default=True, help="the EMA weights (default)")
    weights.add_argument("--raw", dest="ema", action="store_false", help="the raw (non-EMA) weights")
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    p = add("convert-ae", "convert an official efficientvit / DC-Gen DC-AE checkpoint (DC-AE 1.0 or 1.5) into a "
                          "diffusers-format directory dcae15 (and diffusers) loads; starts no Prefect API")
    p.add_argument("--checkpoint", required=True, help="model.safetensors / .pt, or the folder holding model.safetensors")
    p.add_argument("--preset", required=True,
                   help="architecture: dc-ae-1.5-f32c128, dc-ae-1.5-f64c128, dc-ae-f32c32-in-1.0 or one of our presets")
    p.add_argument("--out", required=True, help="the directory to write (config.json + diffusion_pytorch_model.safetensors)")
    p.add_argument("--scaling-factor", type=float, default=None, help="record this scaling factor (default: the preset's)")
    p = add("export-ae", "save an autoencoder with the scaling factor its latent store measured (diffusers' "
                         "config.json then carries it); starts no Prefect API")
    p.add_argument("--ae", required=True, help="URL of the autoencoder (save_pretrained directory)")
    p.add_argument("--store", required=True, help="URL of a latent store encoded with it")
    p.add_argument("--out", required=True, help="the directory to write")


def _score_and_results_commands(add: _AddCommand) -> None:
    """``score-npz`` (ADM's evaluator rules) and ``results`` (print the table): no Prefect API."""
    p = add("score-npz", "FID / sFID / IS / precision / recall of an ADM sample batch (.npz) against an ADM reference "
                         "batch by ADM's evaluator rules (protocol adm: unshuffled 5000-image IS splits, fp16 precision/recall), with the "
                         "Inception network from local weights; starts no Prefect API")
    p.add_argument("samples", help="ADM sample batch (.npz with arr_0), e.g. from export-npz or another project")
    p.add_argument("--reference", required=True, help="ADM reference batch, e.g. VIRTUAL_imagenet256_labeled.npz")
    p.add_argument("--inception-weights", default=None,
                   help="weights-inception-2015-12-05-6726825d.pth (default: $DCAE15_WEIGHTS, the torch hub cache)")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    p.add_argument("--batch-size", type=int, default=64)
    add("results", "print the results table (and list the plots) under <root>/eval; starts no Prefect API")


_COMMAND_GROUPS = (_pipeline_commands, _training_commands, _sample_command, _evaluate_commands, _export_commands,
                   _score_and_results_commands)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(
        prog="dcae15",
        description="DC-AE 1.5 latent diffusion pipeline: prepare images, train the structured autoencoder, encode "
                    "a latent store with Dask, train several diffusion backbones on it, sample and evaluate — as "
                    "cached, resumable Prefect flows.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add = _command_adder(sub, _common_options())
    for group in _COMMAND_GROUPS:  # in the order `dcae15 --help` lists the commands
        group(add)
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
    from flows.env import apply_cpu_defaults, apply_prefect_defaults, local_root, prepare_prefect_database
    from flows.config import load_config

    overrides = _parse_set(args.set)
    if args.root:
        overrides["root"] = args.root
    if args.command == "sample":  # the flags are sample-section fields, validated with the rest of the config
        overrides["sample"] = {**overrides.get("sample", {}), **sample_overrides(args)}
    try:
        cfg = load_config(args.config, overrides)  # fail fast on a bad config, before Prefect starts
        named = getattr(args, "backbones", None) or ([args.backbone] if getattr(args, "backbone", None) else None)
        if named:  # the flow applies --backbone(s); check them with the rest now
            load_config(args.config, {**overrides, "diffusion": {**overrides.get("diffusion", {}),
                                                                 "backbones": list(named)}})
    except ValueError as exc:
        raise SystemExit(f"dcae15 {args.command}: config error: {exc}") from None
    root = local_root(cfg.root)
    if args.command == "rehearse":  # the tree and the weight files, then the same config pointed at them
        import os

        from flows.rehearsal import prepare_rehearsal

        made = prepare_rehearsal(root, per_class=args.per_class, size=cfg.resolution)
        os.environ["DCAE15_WEIGHTS"] = made["weights"]
        overrides.setdefault("data", {})["source"] = made["source"]
        if load_config(args.config, overrides).evaluate.pr_reference:  # the user's VIRTUAL batch: a stand-in
            overrides.setdefault("evaluate", {})["pr_reference"] = made["virtual"]
        cfg = load_config(args.config, overrides)
    apply_prefect_defaults(root)
    prepare_prefect_database()  # two commands at once on a fresh Prefect home: one migrates, the other waits
    apply_cpu_defaults()

    from flows.autoencoder import train_autoencoder
    from flows.caching import result_storage_for
    from flows.diffusion import train_diffusion
    from flows.encode import encode_latents
    from flows.evaluate import evaluate_samples
    from flows.pipeline import run_pipeline
    from flows.prepare import prepare_images
    from flows.sample import sample_run
    from flows.score_checkpoints import evaluate_checkpoint, evaluate_new_checkpoints
    from storage.layout import Root

    storage = result_storage_for(args.results or Root(root).prefect_results())
    config = {**cfg.to_dict(), "root": root}

    def call(flow_obj: Any, **kw: Any) -> Any:
        return flow_obj.with_options(result_storage=storage)(root=root, config=config, **kw)

    c = args.command
    if c == "rehearse":
        from flows.rehearsal import run_rehearsal

        out, _, table = run_rehearsal(lambda: call(run_pipeline), root, lambda **kw: evaluate_checkpoint.with_options(
            result_storage=storage)(**kw))
        return {**out, "stages": table}
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
    from flows.env import local_root
    from flows.report import outputs_summary

    # only the root is needed: read from the config file, not the typed config (which imports torch)
    try:
        root = args.root or read_raw_config(args.config).get("root") or DEFAULT_ROOT
    except ValueError as exc:
        raise SystemExit(f"dcae15 {args.command}: config error: {exc}") from None
    _print_outputs(outputs_summary(local_root(root)))


def _export_npz(args: argparse.Namespace) -> dict[str, Any]:
    from dcae15.metrics.adm import export_npz

    return export_npz(args.samples, args.out)


def _export(args: argparse.Namespace) -> dict[str, Any]:
    from dcae15.diffusion.export import export_weights

    return {"out": args.out, **export_weights(args.run, args.out, checkpoint=args.checkpoint, ema=args.ema)}


def _convert_ae(args: argparse.Namespace) -> dict[str, Any]:
    from dcae15.ae.convert import from_efficientvit

    ae = from_efficientvit(args.checkpoint, args.preset)
    ae.save_pretrained(args.out, scaling_factor=args.scaling_factor)
    return {"out": args.out, "preset": ae.config.name, "fingerprint": ae.fingerprint(),
            "scaling_factor": args.scaling_factor or ae.scaling_factor}


def _export_ae(args: argparse.Namespace) -> dict[str, Any]:
    from dcae15.ae.convert import save_with_store_scaling

    return {"out": args.out, "scaling_factor": save_with_store_scaling(args.ae, args.store, args.out)}


def _score_npz(args: argparse.Namespace) -> dict[str, Any]:
    from dcae15.metrics.adm import adm_reference
    from dcae15.metrics.fidelity import generation_metrics, inception_extractor

    extractor = inception_extractor(args.inception_weights)
    ref = adm_reference(args.reference, extractor, batch_size=args.batch_size, device=args.device)
    values = generation_metrics(args.samples, ref, extractor=extractor, batch_size=args.batch_size,
                                device=args.device, protocol="adm")  # an ADM batch against an ADM reference
    return {"samples": args.samples, "reference": ref.describe(), "protocol": "adm", "feature_extractor": extractor.label,
            "extractor_fingerprint": extractor.fingerprint, **values}


_LIBRARY_COMMANDS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "export-npz": _export_npz, "export": _export, "score-npz": _score_npz, "convert-ae": _convert_ae,
    "export-ae": _export_ae,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dcae15`` console script."""
    args = build_parser().parse_args(argv)
    if args.command == "results":
        _results(args)
        return 0
    if args.command in _LIBRARY_COMMANDS:  # plain library calls: no config, no Prefect
        print(json.dumps(_LIBRARY_COMMANDS[args.command](args), indent=2, default=str))
        return 0
    t0 = time.perf_counter()
    from storage.lease import ClaimHeldError

    try:
        out = _run(args)
    except ClaimHeldError as exc:  # another live job writes the same artifact: one line, no traceback
        print(f"dcae15 {args.command}: {exc}", file=sys.stderr)
        return 3
    if args.command in ("demo", "pipeline", "rehearse"):
        if isinstance(out, dict) and "in the flow" in out.get("stage_seconds", {}):
            out["stage_seconds"]["Prefect start, imports, exit"] = round(
                time.perf_counter() - t0 - out["stage_seconds"]["in the flow"], 1)
        _print_outputs(out)
        if "stages" in out:
            print("\n=== stages: wall time and peak RSS (this process and its children) ===\n" + out["stages"])
    else:
        print(json.dumps(out, indent=2, default=str))
    print(f"\ndcae15 {args.command}: done in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
