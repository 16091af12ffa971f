"""``python -m dcae15.metrics results TABLE_URL [--plot OUT_URL]``: print the results table, plot metric vs step.
``python -m dcae15.metrics proxy DATASET_URL [--config JSON]``: train (or find) a dataset's proxy classifier in
its cache, in a process of its own (the pipeline trains it beside the autoencoder: both seed torch's global RNG)."""

from __future__ import annotations

import argparse
import json
import sys

from dcae15.metrics.proxy import ProxyConfig, proxy_extractor
from dcae15.metrics.results import results_cli

__all__ = ["main"]

USAGE = ("usage: python -m dcae15.metrics results TABLE_URL [--plot OUT_URL] [--metric M] [--run RUN]\n"
         "       python -m dcae15.metrics proxy DATASET_URL [--config JSON]")


def proxy_cli(argv: list[str]) -> int:
    """Train the proxy classifier of a dataset into its cache (or find it there); print its spec as JSON."""
    ap = argparse.ArgumentParser(prog="python -m dcae15.metrics proxy")
    ap.add_argument("dataset", help="a packed dataset or class-folder tree URL")
    ap.add_argument("--config", default="{}", help="ProxyConfig fields as JSON, e.g. '{\"epochs\": 10}'")
    args = ap.parse_args(argv)
    spec = proxy_extractor(args.dataset, ProxyConfig(**json.loads(args.config)), verbose=True)
    print(json.dumps({"label": spec.label, "weights": spec.weights_path, **spec.info}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``results`` or ``proxy`` (``dcae15 results`` is another command: it prints a root's outputs)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"results": results_cli, "proxy": proxy_cli}
    if not argv or argv[0] not in commands:
        print(USAGE, file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
