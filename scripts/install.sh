#!/usr/bin/env bash
# Create .venv and install dcae15 with its dev extra, pinned by constraints.txt (a lock: ~2x faster installs).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
.venv/bin/python -m pip install --quiet --upgrade pip
if [ -f constraints.txt ] && [ -z "${DCAE15_NO_LOCK:-}" ]; then
  .venv/bin/python -m pip install --quiet -c constraints.txt -e ".[dev]"
else
  .venv/bin/python -m pip install --quiet -e ".[dev]"
fi
echo "installed: $(.venv/bin/python -c 'import torch, zarr, prefect; print("torch", torch.__version__, "zarr", zarr.__version__, "prefect", prefect.__version__)')"
