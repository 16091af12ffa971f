#!/usr/bin/env bash
# The GPU check, from the root of a copied tree on a machine where nothing of ours is installed:
#   bash bench/gpu_check.sh                # on the GPU machine: <= 8 min, one JSON line per section
#   bash bench/gpu_check.sh --cpu-smoke    # every section at tiny sizes on a CPU
# It needs no install and no environment variable: the repository root goes on PYTHONPATH, and the wheels that
# scripts/fetch_gpu_wheels.sh put in .gpu-wheels/ (what the image lacks) are installed into a temporary folder.
# Arguments go to bench/gpu_check.py (--only SECTIONS, --out FILE, --patch 2).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(command -v python3 || command -v python)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".gpu-wheels/*.whl" >/dev/null; then
  site=$(mktemp -d "${TMPDIR:-/tmp}/dcae15-gpu-site.XXXXXX")
  trap 'rm -rf "$site"' EXIT  # the installed wheels (~40 MB) go when the check ends
  "$PY" -m pip install --quiet --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
    --target "$site" .gpu-wheels/*.whl
  export PYTHONPATH="$PYTHONPATH:$site"
fi
missing=$("$PY" - <<'PY'
import importlib.util
print(" ".join(m for m in ("torch", "numpy", "yaml", "fsspec", "zarr", "numcodecs", "diffusers", "lpips", "tqdm")
               if importlib.util.find_spec(m) is None))
PY
)
if [ -n "$missing" ]; then
  echo "gpu_check: missing Python packages: $missing. On a machine with a package registry run" \
       "scripts/fetch_gpu_wheels.sh (it fills .gpu-wheels/), then carry .gpu-wheels with the tree." >&2
  exit 2
fi
"$PY" -u bench/gpu_check.py "$@"  # not exec: the trap cleans up after it
