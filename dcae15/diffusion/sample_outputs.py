"""What a researcher looks at after sampling: a PNG grid (a row per class) and a folder of PNGs, from a sample store.

Both read the store one unit at a time (a 50k store never sits in memory) and write with the project's atomic write,
so a killed export leaves only whole files and a rerun skips the PNGs already there.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np

__all__ = ["write_grid", "write_png_dir"]


def _open(samples_url: str, storage_options: dict | None):
    from storage.sample_store import SampleStore

    store = SampleStore.open(samples_url, storage_options=storage_options, read_only=True)
    missing = store.missing_units()
    if missing:
        raise ValueError(f"sample store {samples_url!r} is incomplete ({len(missing)} of {store.num_units} units "
                         "missing): rerun sampling first")
    return store


def write_grid(samples_url: str, out_url: str, *, class_names: Sequence[str] | None = None, max_classes: int = 16,
               per_class: int = 8, storage_options: dict | None = None) -> str:
    """A PNG with one row per class — the store's ``classes`` when it was sampled with a class list, else the first
    ``max_classes`` classes in sampling order — and ``per_class`` images each (``dcae15.diffusion.plots``).

    Args:
        class_names: names indexed by class id (e.g. the dataset's wnids); default the ids.
    """
    from dcae15.diffusion.plots import MAX_GRID_CLASSES, collect_grid_images, sample_grid_png
    from storage.urls import write_atomic

    if not 1 <= max_classes <= MAX_GRID_CLASSES or per_class < 1:
        raise ValueError(f"max_classes must be in 1..{MAX_GRID_CLASSES} and per_class >= 1, got {max_classes}, "
                         f"{per_class}")
    store = _open(samples_url, storage_options)
    a = store.attrs
    rows = list(dict.fromkeys(int(c) for c in a["classes"]))[:max_classes] if a.get("classes") else []
    if not rows:  # classes in the order they were drawn (labels only: one small read per unit)
        for unit in range(store.num_units):
            for c in store.read_unit(unit, ["labels"])["labels"].tolist():
                if int(c) not in rows and len(rows) < max_classes:
                    rows.append(int(c))
            if len(rows) == max_classes:
                break
    images, labels = collect_grid_images(store.iter_units(), rows, per_class=per_class)
    n = max(rows) + 1
    names = [str(class_names[c]) if class_names is not None and c < len(class_names) else str(c) for c in range(n)]
    title = (f"{a.get('run_id', '')} step {a.get('checkpoint_step', '?')}: {a.get('sampler')} {a.get('steps')} steps, "
             f"CFG {a.get('cfg_scale')} in {a.get('guidance_interval')}")
    write_atomic(out_url, sample_grid_png(images, labels, names, classes=rows, per_class=per_class, title=title),
                 storage_options)
    return out_url


def write_png_dir(samples_url: str, out_url: str, *, storage_options: dict | None = None) -> dict:
    """Every sample as ``<out>/<index:06d>.png`` plus ``labels.txt`` (one class id per line, in index order).

    Returns:
        ``{"url", "written", "skipped"}`` (skipped: PNGs a previous run already wrote).
    """
    from PIL import Image

    from storage.urls import join, url_to_fs, write_atomic

    store = _open(samples_url, storage_options)
    fs, root = url_to_fs(out_url, storage_options)
    fs.makedirs(root, exist_ok=True)
    have = {p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)}
    written = skipped = 0
    labels_all = []
    for unit in range(store.num_units):
        a, b = store.unit_bounds(unit)
        images, labels = store.read_range(a, b)
        labels_all.append(labels)
        for i, img in enumerate(images, start=a):
            name = f"{i:06d}.png"
            if name in have:
                skipped += 1
                continue
            buf = io.BytesIO()
            Image.fromarray(np.asarray(img)).save(buf, format="PNG")
            write_atomic(join(out_url, name), buf.getvalue(), storage_options)
            written += 1
    text = "\n".join(str(int(v)) for v in np.concatenate(labels_all)) + "\n"
    write_atomic(join(out_url, "labels.txt"), text.encode(), storage_options)
    return {"url": out_url, "written": written, "skipped": skipped}
