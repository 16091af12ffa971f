"""The ImageNet rehearsal (``dcae15 rehearse``): ``configs/rehearsal.yaml`` (= ``imagenet.yaml`` with sizes reduced)
on an ImageNet-shaped tree made on the fly, with stand-in weight files in the real files' formats, and each
stage's wall time and peak memory read back from Prefect's own run records."""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any, Callable

__all__ = ["prepare_rehearsal", "MemoryMonitor", "stage_report", "format_report", "evaluate_checkpoint_events",
           "run_rehearsal"]


def prepare_rehearsal(root: str, *, num_classes: int = 1000, per_class: int = 1, size: int = 64) -> dict[str, str]:
    """Make (once) ``<root>/raw/imagenet-shaped`` (1000 wnid folders of JPEGs plus the odd files, see
    ``storage.synthetic.make_imagenet_tree``) and ``<root>/weights`` (stand-in Inception and VGG files).

    Returns:
        ``{"source": tree URL, "weights": folder for $DCAE15_WEIGHTS, "virtual": a stand-in ADM VIRTUAL batch for
        ``evaluate.pr_reference``}``.
    """
    from dcae15.metrics.stand_in import write_stand_in_weights
    from storage.layout import Root
    from storage.synthetic import make_imagenet_tree
    from storage.urls import exists, is_local, local_path, read_bytes, write_atomic

    source = Root(root).raw_images("imagenet-shaped")
    done = source.rstrip("/") + ".json"  # beside the tree: a file inside it would look like one more class
    spec = {"num_classes": num_classes, "per_class": per_class, "size": size, "seed": 0}
    if not exists(done) or json.loads(read_bytes(done)) != spec:
        make_imagenet_tree(source, **spec)
        write_atomic(done, json.dumps(spec).encode())
    # weight files are read from local disk (find_weights): inside a local root, else the user's cache
    weights = (os.path.join(local_path(root), "weights") if is_local(root)
               else os.path.join(os.path.expanduser("~/.cache"), "dcae15", "stand-in-weights"))
    write_stand_in_weights(weights)
    return {"source": source, "weights": weights, "virtual": _stand_in_virtual_batch(root, source, size)}


def _stand_in_virtual_batch(root: str, source: str, size: int, num_images: int = 64) -> str:
    """A stand-in for ADM's ``VIRTUAL_imagenet256_labeled.npz`` (which the user supplies like the weights): the ADM
    layout with ``num_images`` centre-cropped images of the tree, no statistics (``evaluate.pr_reference`` of the
    ``dc-gen`` protocol needs only its images). Written once."""
    import numpy as np

    from dcae15.metrics.adm import write_adm_npz
    from dcae15.metrics.inputs import as_image_dataset
    from storage.layout import Root
    from storage.urls import exists

    url = Root(root).raw_images(f"VIRTUAL_stand_in_{size}px.npz")
    if not exists(url):
        ds, images = as_image_dataset(source, resolution=size), []
        for i in range(len(ds)):
            try:
                images.append(np.asarray(ds[i]).transpose(1, 2, 0))
            except OSError:  # the tree's truncated / empty files
                continue
            if len(images) == num_images:
                break
        write_adm_npz(url, [np.stack(images).astype(np.uint8)], len(images))
    return url


class MemoryMonitor:
    """Samples the resident memory of this process and all its children (torchrun ranks, Dask workers, loader
    workers) every ``interval`` seconds in a thread; :meth:`peak` is the largest sum within a time window."""

    def __init__(self, interval: float = 0.25):
        self.interval, self.samples = interval, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-monitor")

    def _run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            rss = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    rss += p.memory_info().rss
                except psutil.Error:  # a child that exited between the listing and the read
                    pass
            self.samples.append((time.time(), rss))
            self._stop.wait(self.interval)

    def __enter__(self) -> "MemoryMonitor":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def peak(self, start: float, end: float) -> int:
        """Peak bytes in ``[start, end]`` (epoch seconds); 0 when no sample fell in it."""
        return max((r for t, r in self.samples if start <= t <= end), default=0)


def stage_report(since: float, monitor: MemoryMonitor) -> list[dict[str, Any]]:
    """One row per stage flow run (and per figure task) started after ``since``: flow name, run name, wall seconds
    and the peak RSS of the process tree meanwhile — read from the Prefect API the runs were recorded in."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterStartTime, TaskRunFilter, TaskRunFilterName
    from prefect.client.schemas.filters import TaskRunFilterStartTime

    import datetime as dt

    after = dt.datetime.fromtimestamp(since, dt.timezone.utc)
    rows = []
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(after_=after)))
        flows = {f.id: f.name for f in client.read_flows()}
        tasks = client.read_task_runs(task_run_filter=TaskRunFilter(
            start_time=TaskRunFilterStartTime(after_=after),
            name=TaskRunFilterName(like_="draw_run_figures")))  # the figures are a task of the pipeline itself
    for kind, name, run in [*((flows.get(r.flow_id, "?"), r.name, r) for r in runs),
                            *(("draw_run_figures", t.name, t) for t in tasks)]:
        if run.start_time is None or kind in ("run_pipeline", "evaluate_checkpoint"):
            continue
        start = run.start_time.timestamp()
        end = run.end_time.timestamp() if run.end_time else time.time()
        rows.append({"stage": kind, "run": name, "start": start, "seconds": round(end - start, 1),
                     "peak_rss_mib": round(monitor.peak(start, end) / 2**20)})
    return sorted(rows, key=lambda r: r["start"])


def format_report(rows: list[dict[str, Any]], total: float, monitor: MemoryMonitor) -> str:
    """The per-stage table (wall seconds, peak RSS of the process tree) with the total."""
    lines = [f"{'stage':<30} {'seconds':>8} {'peak RSS MiB':>13}  run"]
    for r in rows:
        lines.append(f"{r['stage']:<30} {r['seconds']:>8.1f} {r['peak_rss_mib']:>13}  {r['run']}")
    peak = round(max((b for _, b in monitor.samples), default=0) / 2**20)
    lines.append(f"{'total (pipeline)':<30} {total:>8.1f} {peak:>13}")
    return "\n".join(lines)


def evaluate_checkpoint_events(root: str, since: float, evaluate: Callable[..., Any], *,
                               wait_s: float = 30.0) -> list[dict[str, Any]]:
    """Feed each ``dcae15.checkpoint.saved`` event under ``root`` since ``since`` to ``evaluate`` (the
    ``evaluate_checkpoint`` flow) with the parameters the deployment's trigger templates from its payload (run, step,
    root, config): the event-triggered evaluation without a deployment. Returns what each call returned."""
    import datetime as dt

    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter

    from flows.events import CHECKPOINT_SAVED

    after = dt.datetime.fromtimestamp(since, dt.timezone.utc)
    deadline, events = time.monotonic() + wait_s, []
    with get_client(sync_client=True) as client:
        while not events and time.monotonic() < deadline:  # events are recorded asynchronously
            page = client.read_events(EventFilter(event=EventNameFilter(name=[CHECKPOINT_SAVED]),
                                                  occurred=EventOccurredFilter(since=after)), limit=50)  # the API max
            events = [e for e in page.events if e.payload.get("root") == root]
            time.sleep(0.5)
    return [evaluate(run=e.payload["run_url"], step=int(e.payload["step"]), root=e.payload["root"],
                     config=e.payload.get("config") or "demo") for e in events]


def run_rehearsal(run: Callable[[], Any], root: str, evaluate: Callable[..., Any]) -> tuple[Any, list[dict], str]:
    """Run ``run`` (the pipeline flow call), then the event-triggered evaluation of each checkpoint event
    (``evaluate``: the ``evaluate_checkpoint`` flow; every row exists already, so it adds none), under a
    :class:`MemoryMonitor`; returns (the pipeline's result, the stage rows, the printed table)."""
    from dcae15.metrics.results import read_results
    from flows.pointers import results_url

    t0 = time.time()
    with MemoryMonitor() as mon:
        out = run()
        t1, before = time.time(), len(read_results(results_url(root)))
        scored = evaluate_checkpoint_events(root, t0, evaluate)
    rows = stage_report(t0, mon)
    for r in rows:  # the event-triggered evaluations' own sample/evaluate subflows (cache hits)
        if r["start"] >= t1:
            r["stage"] += " (event)"
    added = len(read_results(results_url(root))) - before
    table = format_report(rows, t1 - t0, mon)
    table += (f"\ncheckpoint events: {len(scored)}, each evaluated by evaluate_checkpoint (the deployment trigger's "
              f"flow) in {time.time() - t1:.1f} s: {added} new result rows (the pipeline scored them already)")
    return out, rows, table
