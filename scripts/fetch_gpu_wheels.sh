#!/usr/bin/env bash
# Fetch, here (where a package registry is reachable), the wheels of what the GPU machine's image lacks and the
# GPU check needs, at the versions constraints.txt pins, into .gpu-wheels/ (git-ignored, ~15 MB: carry it).
#   scripts/fetch_gpu_wheels.sh            # for the GPU image's Python 3.12
#   scripts/fetch_gpu_wheels.sh 3.11 DIR   # another Python / folder (the CI rehearsal: this machine's Python)
# bench/gpu_check.sh installs them there with `pip install --no-index --no-deps --target`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${1:-3.12}
DEST=${2:-.gpu-wheels}
PY=${PYTHON:-python3}
# Not in bench/gpu_image_packages.txt, imported by the check's sections (storage.reader: zarr; dcae15.ae: diffusers;
# the AE step: lpips), with their own needs that the image also lacks.
NEED=(zarr numcodecs donfig google-crc32c diffusers importlib_metadata lpips)
specs=()
for name in "${NEED[@]}"; do
  pin=$(grep -i -E "^${name//[-_]/[-_]}==" constraints.txt | head -1 || true)
  [ -n "$pin" ] || { echo "fetch_gpu_wheels: $name has no pin in constraints.txt" >&2; exit 1; }
  specs+=("$pin")
done
mkdir -p "$DEST"
rm -f "$DEST"/*.whl
plats=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do plats+=(--platform "$p"); done
"$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: --python-version "$PYVER" \
  --implementation cp "${plats[@]}" -d "$DEST" "${specs[@]}"
echo "fetch_gpu_wheels: $(ls "$DEST"/*.whl | wc -l) wheels for Python $PYVER in $DEST ($(du -sh "$DEST" | cut -f1)):"
ls "$DEST"
