#!/usr/bin/env bash
# Rehearse the GPU machine on this CPU (CI runs it): a bare Python environment holding only the GPU image's
# packages (bench/gpu_image_packages.txt, linked from .venv: torch and its kin, nothing of dcae15's own
# dependencies that the image lacks, dcae15 not installed), a copy of the committed tree (git archive), the wheels
# scripts/fetch_gpu_wheels.sh fetches for this Python, the network cut (a new network namespace), and then the
# documented command's CPU form, `bash bench/gpu_check.sh --cpu-smoke`: every section must say "ok".
set -euo pipefail
cd "$(dirname "$0")/.."
REF=${1:-HEAD}
VENV_PY=${DCAE15_VENV_PYTHON:-.venv/bin/python}  # where torch and the image packages come from
tmp=$(mktemp -d "${TMPDIR:-/tmp}/dcae15-gpu-rehearsal.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/tree"
git archive "$REF" | tar -x -C "$tmp/tree"
pyver=$("$VENV_PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
PYTHON=$VENV_PY scripts/fetch_gpu_wheels.sh "$pyver" "$tmp/tree/.gpu-wheels" 2>&1 | grep -v "^WARNING: Location" >&2
# the bare environment: a venv (pip included, as on the image) whose only other packages are the image's
"$(readlink -f "$VENV_PY")" -m venv "$tmp/bare"
"$VENV_PY" - "$tmp/view" "$tmp/bare" <<'PY'
import importlib.metadata as md, os, sys, sysconfig
view, bare = sys.argv[1], sys.argv[2]
os.makedirs(view)
wanted = {l.strip().lower().replace("_", "-") for l in open("bench/gpu_image_packages.txt")
          if l.strip() and not l.startswith("#")}
from packaging.requirements import Requirement

norm = lambda n: (n or "").lower().replace("_", "-").replace(".", "-")
here = {norm(d.metadata["Name"]): d for d in md.distributions()}
# The image is a consistent environment; where this machine has another version of one of its packages, that
# version's own requirements come along (e.g. huggingface-hub 2.x needs httpx2, the image's 1.33 does not).
todo, chosen = [n for n in wanted if n in here], set()
while todo:
    n = todo.pop()
    if n in chosen:
        continue
    chosen.add(n)
    for r in here[n].requires or []:
        req = Requirement(r)
        if (req.marker is None or req.marker.evaluate({"extra": ""})) and norm(req.name) in here:
            todo.append(norm(req.name))
extra = sorted(chosen - wanted)
linked, tops = [], set()
for name in sorted(chosen):
    dist = here[name]
    if not dist.files:
        continue
    linked.append(name)
    for f in dist.files:
        top = f.parts[0]
        if top.endswith(".pth") or top in ("..", "__pycache__") or top.startswith("__editable__"):
            continue
        tops.add((top, str(dist.locate_file(top))))
for top, src in sorted(tops):
    if os.path.exists(src) and not os.path.exists(os.path.join(view, top)):
        os.symlink(src, os.path.join(view, top))
site = os.path.join(bare, "lib", f"python{sys.version_info[0]}.{sys.version_info[1]}", "site-packages")
open(os.path.join(site, "gpu_image.pth"), "w").write(view + "\n")
print(f"rehearsal: bare environment with {len(linked) - len(extra)} of the image's {len(wanted)} packages "
      f"(torch {md.version('torch')}) and what this machine's versions of them need: {extra}", file=sys.stderr)
PY
for m in dcae15 zarr diffusers prefect; do  # from a neutral folder: what the environment itself can import
  if (cd / && env -u PYTHONPATH "$tmp/bare/bin/python" -c "import $m" 2>/dev/null); then
    echo "rehearsal: the bare environment can import $m: it is not bare" >&2; exit 1
  fi
done
run=(bash -c 'ip link set lo up 2>/dev/null; cd "$0" && PATH="$1:$PATH" bash bench/gpu_check.sh --cpu-smoke'
     "$tmp/tree" "$tmp/bare/bin")
if unshare -n true 2>/dev/null; then cut=(unshare -n)
elif unshare -rn true 2>/dev/null; then cut=(unshare -rn)
else echo "rehearsal: cannot make a network namespace here; running with the network" >&2; cut=(); fi
env -u PYTHONPATH -u VIRTUAL_ENV "${cut[@]}" "${run[@]}" | tee "$tmp/out.jsonl"
"$VENV_PY" - "$tmp/out.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
sections = [r for r in rows if r.get("section") != "total"]
bad = [f"{r['section']}: {r['status']} {r.get('error', '')[:300]}" for r in sections if r.get("status") != "ok"]
if len(sections) < 8 or bad:
    sys.exit(f"rehearsal FAILED: {len(sections)} sections, not ok: {bad}")
print(f"rehearsal ok: {len(sections)} sections ok, {rows[-1].get('seconds')} s, network cut, nothing installed")
PY
