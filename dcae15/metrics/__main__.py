"""``python -m dcae15.metrics results TABLE_URL [--plot OUT_URL]``: print the results table, plot metric vs step."""

from __future__ import annotations

import sys

from dcae15.metrics.results import results_cli

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``results`` (the only subcommand; ``dcae15 results`` is another command: it prints a root's outputs)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "results":
        print("usage: python -m dcae15.metrics results TABLE_URL [--plot OUT_URL] [--metric M] [--run RUN]",
              file=sys.stderr)
        return 2
    return results_cli(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
