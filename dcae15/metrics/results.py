"""The results table: one Parquet part file per evaluation under a table URL, read back as one table; print, plot.

Rows are long: one (context, ``metric``, ``value``) row per number. Context columns: ``checkpoint`` (fingerprint),
``run_id``, ``backbone``, ``autoencoder``, ``store``, ``samples_url``, ``sampler``, ``sampling_steps``,
``cfg_scale``, ``num_samples``, ``feature_extractor`` (+ ``extractor_fingerprint``), ``reference`` (``train-split`` or
``adm:<npz>``, + ``reference_url``), ``step`` (training step), ``dataset_fingerprint``, the sampling fields ``labels``,
``classes``, ``guidance_interval``, ``seed``, ``time``, ``protocol`` (``dcae15.metrics.protocols``: ``dc-gen``,
``adm``, ``proxy``, ``torch-fidelity``; empty in rows written before protocols existed) and ``pr_reference``;
any other scalar a caller adds becomes a column too. Appending writes a new ``part-<time>-<uuid>.parquet`` object,
so concurrent evaluators never read-modify-write a shared object; reading concatenates the parts.

Metric names carry their feature network: ``fid``/``is``/... come from Inception, ``proxy-fid``/... from the demo's
proxy classifier; the ``feature_extractor`` column names the exact network. Plots draw one figure per feature
extractor, so proxy and Inception numbers never share axes, and one line per (run, protocol), so numbers of
different protocols never share a line.
"""

from __future__ import annotations

import datetime as _dt
import io
import math
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from dcae15.figures import png_bytes, pyplot
from dcae15.metrics import _io

__all__ = ["CONTEXT_COLUMNS", "ResultsTable", "append_results", "format_table", "has_result", "is_metric_name",
           "part_url", "plot_results", "read_results", "results_cli"]

# context column -> arrow type name (fixed so part files concatenate cleanly)
CONTEXT_COLUMNS = {
    "checkpoint": "string", "run_id": "string", "backbone": "string", "autoencoder": "string", "store": "string",
    "samples_url": "string", "sampler": "string", "sampling_steps": "int64", "cfg_scale": "float64",
    "num_samples": "int64", "feature_extractor": "string", "step": "int64", "dataset_fingerprint": "string",
    "reference": "string", "reference_url": "string", "extractor_fingerprint": "string",
    "labels": "string", "classes": "string", "guidance_interval": "string", "seed": "int64",
    "protocol": "string", "pr_reference": "string", "shift": "float64",
}
_BASE_METRICS = ("fid", "sfid", "is", "is_std", "precision", "recall", "kid", "kid_std", "rfid", "psnr", "ssim", "lpips",
                 "classifier_accuracy", "class_accuracy")
_FEATURE_METRICS = ("fid", "sfid", "is", "is_std", "precision", "recall", "kid", "kid_std", "rfid", "classifier_accuracy",
                    "class_accuracy")
# Properties of the feature network itself (the proxy's held-out accuracy), not of the samples: plotted as text.
_EXTRACTOR_PROPERTIES = ("classifier_accuracy",)


def is_metric_name(name: str) -> bool:
    """True for names of numbers (``fid``, ``proxy-fid``, ``is_std``, ...) rather than context columns."""
    return name.removeprefix("proxy-") in _BASE_METRICS


class ResultsTable:
    """Columns as numpy arrays (no pandas): ``len(t)`` rows, ``t["metric"]``, ``t.columns``, ``t.rows()``."""

    def __init__(self, columns: Mapping[str, np.ndarray] | None = None):
        self._cols = {k: np.asarray(v, dtype=object) if np.asarray(v).dtype.kind in "OUS" else np.asarray(v)
                      for k, v in (columns or {}).items()}

    def __len__(self) -> int:
        return len(next(iter(self._cols.values()))) if self._cols else 0

    def __getitem__(self, column: str) -> np.ndarray:
        if column not in self._cols:
            return np.full(len(self), None, dtype=object)  # absent column: all missing, so comparisons are False
        return self._cols[column]

    def __contains__(self, column: str) -> bool:
        return column in self._cols

    @property
    def columns(self) -> list[str]:
        return list(self._cols)

    def rows(self) -> list[dict[str, Any]]:
        return [{k: _plain(v[i]) for k, v in self._cols.items()} for i in range(len(self))]

    def select(self, mask: np.ndarray) -> "ResultsTable":
        return ResultsTable({k: v[mask] for k, v in self._cols.items()})


def _plain(v: Any) -> Any:
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


def _melt(rows: Iterable[Mapping[str, Any]], now: _dt.datetime) -> list[dict[str, Any]]:
    """Long rows: a row with ``metric``/``value`` stays; a wide row gives one row per metric-named key."""
    out = []
    for row in rows:
        row = dict(row)
        if "metric" in row:
            if "value" not in row:
                raise ValueError(f"row {row} has 'metric' but no 'value'")
            longs = [(row.pop("metric"), row.pop("value"))]
        else:
            longs = [(k, row.pop(k)) for k in [k for k in row if is_metric_name(k)]]
            if not longs:
                raise ValueError(f"row {sorted(row)} names no metric: add metric/value or keys like fid, proxy-fid")
        for k, v in row.items():
            if v is not None and not isinstance(v, (str, int, float, bool, np.generic)):
                raise ValueError(f"results column {k!r} must be a scalar (str/int/float/bool), got {type(v).__name__}")
        for metric, value in longs:
            if not is_metric_name(str(metric)):
                raise ValueError(f"unknown metric name {metric!r}: expected one of {_BASE_METRICS} (optionally proxy-)")
            fe = str(row.get("feature_extractor") or "")
            if str(metric).startswith("proxy-") and fe and not fe.startswith("proxy"):
                raise ValueError(f"{metric} must come from a proxy feature extractor, got {fe!r}")
            if fe.startswith("proxy") and str(metric) in _FEATURE_METRICS:  # never an unlabelled proxy number
                raise ValueError(f"metric {metric!r} from proxy extractor {fe!r} must be named 'proxy-{metric}'")
            out.append({**row, "metric": str(metric), "value": float(value), "time": row.get("time", now)})
    return out


def _arrow_table(rows: list[dict[str, Any]]):
    import pyarrow as pa

    names = list(dict.fromkeys(k for r in rows for k in r))
    arrays, fields = [], []
    for name in names:
        vals = [r.get(name) for r in rows]
        if name == "time":
            typ = pa.timestamp("us", tz="UTC")
        elif name in CONTEXT_COLUMNS:
            typ = getattr(pa, CONTEXT_COLUMNS[name])()
        elif name == "value":
            typ = pa.float64()
        else:
            typ = None  # caller-defined extra column: let arrow infer
        arrays.append(pa.array(vals, type=typ))
        fields.append(pa.field(name, arrays[-1].type))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def append_results(table_url: str, rows: Sequence[Mapping[str, Any]], *, storage_options: dict | None = None,
                   part_id: str | None = None) -> str:
    """Append rows (long, or wide with metric-named keys) as one new part file; returns its URL.

    ``part_id`` (letters, digits, dashes) names the part file ``part-<part_id>.parquet`` instead of a time + random
    name: appending the same evaluation twice (an event-triggered evaluator racing a scheduled sweep) then writes
    the same object twice, one atomic PUT each, and the table keeps one copy of the rows.

    Raises:
        ValueError: a row without a metric, an unknown metric name, a ``proxy-`` metric from a non-proxy extractor,
            or a non-scalar value.
    """
    import pyarrow.parquet as pq

    now = _dt.datetime.now(_dt.timezone.utc)
    long_rows = _melt(rows, now)
    if not long_rows:
        raise ValueError("append_results needs at least one row")
    buf = io.BytesIO()
    pq.write_table(_arrow_table(long_rows), buf)
    url = part_url(table_url, part_id or f"{now.strftime('%Y%m%dT%H%M%S%f')}-{uuid.uuid4().hex[:8]}")
    _io.write_atomic(url, buf.getvalue(), storage_options)
    return url


def part_url(table_url: str, part_id: str) -> str:
    """The part file ``part-<part_id>.parquet`` of the table (what an evaluation writes, and claims first).

    Raises:
        ValueError: ``part_id`` is not letters, digits and dashes.
    """
    if not part_id.replace("-", "").isalnum():
        raise ValueError(f"part_id must be letters, digits and dashes, got {part_id!r}")
    return _io.join(table_url, f"part-{part_id}.parquet")


def read_results(table_url: str, *, storage_options: dict | None = None) -> ResultsTable:
    """All part files concatenated (missing columns are nulls); an empty table when nothing was written yet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, path = _io.url_to_fs(table_url, storage_options)
    if not fs.exists(path):
        return ResultsTable()
    parts = sorted(p for p in fs.ls(path, detail=False) if p.rsplit("/", 1)[-1].startswith("part-")
                   and p.endswith(".parquet"))
    if not parts:
        return ResultsTable()
    tables = []
    for p in parts:
        with fs.open(p, "rb") as f:
            tables.append(pq.read_table(f))
    table = pa.concat_tables(tables, promote_options="permissive")
    cols = {}
    for name in table.column_names:
        col = table.column(name)
        if pa.types.is_timestamp(col.type):
            cols[name] = np.array(col.to_pylist(), dtype=object)
        elif pa.types.is_floating(col.type):
            cols[name] = col.to_numpy()  # nulls become NaN
        elif pa.types.is_integer(col.type) and col.null_count == 0:
            cols[name] = col.to_numpy()
        else:
            cols[name] = np.array(col.to_pylist(), dtype=object)
    return ResultsTable(cols)


#: The protocols whose formulas dcae15 used before result rows recorded a protocol: a row without one matches them.
LEGACY_PROTOCOLS = ("proxy", "torch-fidelity")


def has_result(table_url: str, *, storage_options: dict | None = None, **match: Any) -> bool:
    """True when some row equals every given column value, e.g. ``has_result(url, checkpoint=fp,
    metric="proxy-fid", sampler="euler", sampling_steps=50, cfg_scale=1.5, num_samples=50000)``."""
    if not match:
        raise ValueError("has_result needs at least one column=value to match")
    table = read_results(table_url, storage_options=storage_options)
    if len(table) == 0:
        return False
    hit = np.ones(len(table), dtype=bool)
    for column, value in match.items():
        col = table[column]
        if isinstance(value, float) and col.dtype.kind == "f":
            hit &= np.isclose(col, value)
        elif column == "protocol" and value in LEGACY_PROTOCOLS:
            # rows written before protocols existed (no protocol) were computed by these formulas: no rescoring
            hit &= np.array([_plain(v) in (value, None) for v in col], dtype=bool)
        else:
            hit &= np.array([_plain(v) == value for v in col], dtype=bool)
    return bool(hit.any())


_SHOW = ("run_id", "backbone", "step", "sampler", "sampling_steps", "cfg_scale", "num_samples", "feature_extractor",
         "protocol", "metric", "value")


def format_table(table: ResultsTable, columns: Sequence[str] = _SHOW) -> str:
    """A plain-text table (the columns present among ``columns``), sorted by extractor, metric, run and step."""
    if len(table) == 0:
        return "(no results yet)"
    cols = [c for c in columns if c in table]
    rows = table.rows()
    rows.sort(key=lambda r: tuple(str(r.get(c) if r.get(c) is not None else "")
                                  if c != "step" else f"{r.get(c) or 0:012d}"
                                  for c in ("feature_extractor", "protocol", "metric", "run_id", "step")))

    def fmt(v: Any) -> str:
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.rjust(w) if c in ("value", "step") else v.ljust(w)  # noqa: E731
                                  for v, w, c in zip(vals, widths, cols))
    return "\n".join([line(cols), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def plot_results(table_url: str, out_url: str, *, references: Mapping[str, Mapping[str, float]] | None = None,
                 storage_options: dict | None = None) -> list[str]:
    """One PNG per feature extractor, ``<out_url>/results-<extractor>.png``: a panel per metric, value vs training
    step, one line per run (labelled with its backbone). Returns the PNG URLs (none for an empty table).

    Properties of the feature network (``proxy-classifier_accuracy``) are written in the title, not drawn as if
    they were sample curves. ``references`` maps an extractor label to ``{metric: value}`` drawn as a dashed
    horizontal line (e.g. the proxy-FID of the autoencoder's reconstructions: the floor for its samples)."""
    plt = pyplot()

    table = read_results(table_url, storage_options=storage_options)
    if len(table) == 0:
        return []
    urls = []
    for extractor in sorted({str(v) for v in table["feature_extractor"]}):
        sub = table.select(np.array([str(v) == extractor for v in table["feature_extractor"]]))
        props = sorted({m for m in sub["metric"] if str(m).removeprefix("proxy-") in _EXTRACTOR_PROPERTIES})
        metrics = sorted({m for m in sub["metric"] if not str(m).endswith("_std") and m not in props})
        if not metrics:
            continue
        refs = (references or {}).get(extractor, {})
        fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
        for ax, metric in zip(axes[0], metrics):
            m = sub.select(np.array([v == metric for v in sub["metric"]]))
            lines = sorted({(str(v), str(p or "")) for v, p in zip(m["run_id"], m["protocol"])})
            for run, protocol in lines:  # a line never mixes protocols
                r = m.select(np.array([str(v) == run and str(p or "") == protocol
                                       for v, p in zip(m["run_id"], m["protocol"])]))
                steps = np.array([s if s is not None else 0 for s in r["step"]], dtype=np.int64)
                order = np.argsort(steps, kind="stable")
                backbone = next((str(b) for b in r["backbone"] if b), "")
                label = f"{backbone} {run[:10]}".strip() + (f" [{protocol}]" if protocol else "")
                ax.plot(steps[order], np.asarray(r["value"], dtype=float)[order], marker="o", label=label)
            if metric in refs:
                ax.axhline(refs[metric], color="k", ls="--", lw=1, label="AE reconstructions")
            ax.set_title(metric)
            ax.set_xlabel("training step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        facts = "; ".join(f"{p} {np.nanmean(np.asarray(sub.select(np.array([v == p for v in sub['metric']]))['value'], dtype=float)):.3f}"
                          for p in props)
        fig.suptitle(f"feature extractor: {extractor}" + (f"  ({facts}: a property of the extractor)" if facts else ""),
                     fontsize=9)
        fig.tight_layout()
        png = png_bytes(fig)
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in extractor)
        url = _io.join(out_url, f"results-{safe}.png")
        _io.write_atomic(url, png, storage_options)
        urls.append(url)
    return urls


def results_cli(argv: Sequence[str] | None = None) -> int:
    """``python -m dcae15.metrics results TABLE_URL [--plot OUT_DIR] [--metric M] [--run RUN]``: print the table, draw
    the plots."""
    import argparse

    p = argparse.ArgumentParser(prog="dcae15 results", description="Print the results table and plot metric vs step.")
    p.add_argument("table", help="results table URL (a folder of part-*.parquet), e.g. <root>/eval/results")
    p.add_argument("--plot", metavar="OUT_URL", help="write results-<extractor>.png per feature extractor here")
    p.add_argument("--metric", action="append", help="only these metrics (repeatable)")
    p.add_argument("--run", action="append", help="only these run ids (repeatable)")
    args = p.parse_args(argv)
    table = read_results(args.table)
    if args.metric:
        table = table.select(np.array([m in args.metric for m in table["metric"]], dtype=bool))
    if args.run:
        table = table.select(np.array([r in args.run for r in table["run_id"]], dtype=bool))
    print(format_table(table))
    if args.plot:
        for url in plot_results(args.table, args.plot):
            print(f"wrote {url}")
    return 0
