"""What a person reads in the Prefect UI: per-stage artifacts with stable keys, and progress bars for long stages.

Every stage flow calls one function of this module after its work (one line at the call site):

- ``publish_pointer(stage, pointer)``: a markdown artifact naming the URLs the stage wrote (key ``<stage>-<object>``);
- ``publish_metrics(pointer)``: a table artifact of the metrics of one evaluation (its pointer ``{"root", "key"}``),
  with the feature extractor (and, for proxy metrics, the proxy classifier's held-out accuracy, a metric row itself);
- ``publish_figures(urls)``: one link artifact per PNG figure;
- ``Progress`` / ``progress_while``: a progress artifact (0-100 %) updated as units / steps complete, either pushed by
  the caller or polled from storage by a background thread while a blocking library call runs;
- ``requests_shown(what, id)``: around a stage's work, its object-storage requests and retries (a log line and an
  artifact ``requests-<what>-<id>``), also when the stage fails.

Keys are stable (derived from what the artifact is about, not from the run), so the UI's Artifacts page shows one
entry per stage object with its history. Publishing never fails a run: an API error is logged and ignored.
Artifacts hold URLs and small summaries only; storage options (credentials) never reach them.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
import threading
from typing import Any, Callable, Iterator
from uuid import UUID

from prefect import get_run_logger
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

__all__ = ["artifact_key", "publish_pointer", "publish_metrics", "publish_figures", "Progress", "progress_while",
           "sample_progress", "reference_progress", "publish_requests", "requests_shown"]

_KEY_MAX = 100


def artifact_key(*parts: Any) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) from readable parts, e.g. ("train", "DiT-tiny-3f2a")."""
    text = "-".join(str(p) for p in parts if p not in (None, ""))
    key = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return key[:_KEY_MAX].rstrip("-") or "dcae15"


def _warn(what: str, exc: BaseException) -> None:
    try:
        get_run_logger().warning("could not publish %s: %s", what, exc)
    except Exception:  # noqa: BLE001 - no run context (a background thread at shutdown)
        pass


def _basename(url: str) -> str:
    return str(url).rstrip("/").rsplit("/", 1)[-1]


def _object_name(url: str) -> str:
    """The name that identifies what a URL holds: ``.../runs/ae/<id>/model`` -> ``<id>``, else the last part."""
    parts = str(url).rstrip("/").rsplit("/", 2)
    return parts[-2] if len(parts) >= 2 and parts[-1] == "model" else parts[-1]


_URL_FIELDS = ("url", "checkpoint", "samples_url")
_SKIP = {"kind", "complete"}


def publish_pointer(stage: str, pointer: dict[str, Any], *, title: str | None = None,
                    extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A markdown artifact for a stage's output pointer: the URLs it wrote, then its identifying fields.

    Args:
        stage: the stage's short name (``prepare``, ``autoencoder``, ``encode``, ``train``, ``sample``, ...).
        pointer: the stage task's pointer dict (URL + fingerprints + sizes).
        title: heading; default ``<stage>: <last part of the URL>``.
        extra: further ``name -> value`` lines (e.g. figure URLs).

    Returns:
        ``pointer`` itself, so that a flow can ``return publish_pointer(stage, run_cached(...))``.
    """
    from flows import rerun

    rerun.record(stage, pointer)  # what a cached rerun re-validates before starting Prefect (flows/rerun.py)
    url = pointer.get("url", "")
    key = artifact_key(stage, pointer.get("run_id") or pointer.get("store_id") or _object_name(url))
    lines = [f"# {title or f'{stage}: {_basename(url)}'}", ""]
    for name in _URL_FIELDS:
        if pointer.get(name):
            lines.append(f"- **{name}**: `{pointer[name]}`")
    for name, value in {**{k: v for k, v in pointer.items() if k not in _URL_FIELDS and k not in _SKIP},
                        **(extra or {})}.items():
        if isinstance(value, (list, tuple)):
            lines.append(f"- **{name}**:")
            lines.extend(f"  - `{v}`" for v in value)
        elif isinstance(value, dict):
            continue  # nested pointers are published by their own stage
        else:
            lines.append(f"- **{name}**: `{value}`")
    try:
        create_markdown_artifact(markdown="\n".join(lines), key=key, description=f"dcae15 {stage}: where it wrote")
    except Exception as exc:  # noqa: BLE001 - the UI is a convenience; the run's work is done
        _warn(f"the {stage} artifact", exc)
    return pointer


_TABLE_COLUMNS = ("metric", "value", "feature_extractor", "run_id", "step", "sampler", "sampling_steps", "cfg_scale",
                  "num_samples", "samples_url")


def publish_metrics(pointer: dict[str, Any]) -> dict[str, Any]:
    """A table artifact of the result rows that the evaluation pointer ``{"root", "key"}`` names (one evaluation:
    run, step, samples, feature extractor); returns ``pointer``.

    The proxy extractor's held-out accuracy is the ``proxy-classifier_accuracy`` row of the same table.
    """
    from dcae15.metrics.results import read_results
    from flows import rerun
    from flows.pointers import results_url

    rerun.record("evaluate", pointer)
    root, key = pointer["root"], pointer["key"]
    akey = artifact_key("metrics", key.get("run_id"), f"step-{key.get('step')}", key.get("feature_extractor"))
    try:
        table = read_results(results_url(root))
        rows = [r for r in table.rows() if all(r.get(k) == v for k, v in key.items())]
        # one value per metric: the newest row wins should a table ever hold an older duplicate
        latest: dict[str, dict[str, Any]] = {}
        for r in sorted(rows, key=lambda r: str(r.get("created", ""))):
            latest[r["metric"]] = r
        out = [{c: latest[m].get(c) for c in _TABLE_COLUMNS} for m in sorted(latest)]
        create_table_artifact(table=out, key=akey,
                              description=f"dcae15 metrics of {key.get('run_id')} at step {key.get('step')} "
                                          f"({key.get('feature_extractor')}); table: {results_url(root)}")
    except Exception as exc:  # noqa: BLE001
        _warn("the metrics table artifact", exc)
    return pointer


def publish_figures(urls: list[str], *, stage: str = "figure") -> list[str]:
    """One link artifact per PNG figure (local paths become ``file://`` links). Returns the keys published."""
    from flows import rerun
    from storage.urls import is_local, local_path

    keys = []
    for url in urls:
        rerun.record("figure", {"url": url})
        link = f"file://{local_path(url)}" if is_local(url) else url
        key = artifact_key(stage, _basename(url).removesuffix(".png"))
        try:
            create_link_artifact(link=link, link_text=_basename(url), key=key, description=f"dcae15 figure {url}")
        except Exception as exc:  # noqa: BLE001
            _warn(f"the link to {url}", exc)
            continue
        keys.append(key)
    return keys


class Progress:
    """A progress artifact (0-100 %) with a stable key; ``update(done, total)`` pushes only visible changes."""

    def __init__(self, key: str, description: str, *, done: float = 0.0, total: float = 1.0) -> None:
        self.key, self.description = key, description
        self._id: UUID | None = None
        self._last: float | None = None
        start = 100.0 * done / total if total > 0 else 0.0
        try:
            self._id = create_progress_artifact(progress=start, key=key, description=description)
            self._last = start
        except Exception as exc:  # noqa: BLE001
            _warn(f"progress {key}", exc)

    def update(self, done: float, total: float, note: str | None = None) -> None:
        if self._id is None or total <= 0:
            return
        pct = max(0.0, min(100.0, 100.0 * float(done) / float(total)))
        if self._last is not None and abs(pct - self._last) < 0.5 and pct < 100.0:
            return
        try:
            update_progress_artifact(artifact_id=self._id, progress=pct,
                                     description=f"{self.description} — {note}" if note else None)
            self._last = pct
        except Exception as exc:  # noqa: BLE001
            _warn(f"progress {self.key}", exc)


@contextlib.contextmanager
def progress_while(key: str, description: str, poll: Callable[[], tuple[float, float]], *, interval: float = 5.0,
                   on_poll: Callable[[], None] | None = None) -> Iterator[Progress]:
    """Run the body while a daemon thread polls ``poll() -> (done, total)`` every ``interval`` s into a progress
    artifact (and calls ``on_poll``, e.g. to emit events); one last poll when the body ends.

    The thread runs in a copy of this context, so Prefect's run and settings context (the API URL of a temporary
    server included) reach its API calls. A failing poll is skipped, never raised into the body.
    """
    progress = Progress(key, description)
    stop = threading.Event()

    def tick() -> None:
        try:
            if on_poll is not None:
                on_poll()
            done, total = poll()
            progress.update(done, total)
        except Exception:  # noqa: BLE001 - storage not there yet, a transient read error: try again next tick
            pass

    def loop() -> None:
        while not stop.wait(interval):
            tick()

    thread = threading.Thread(target=contextvars.copy_context().run, args=(loop,), daemon=True,
                              name=f"dcae15-progress-{key}")
    thread.start()
    try:
        yield progress
    finally:
        stop.set()
        thread.join(timeout=interval + 30)
        tick()


def sample_progress(out_url: str, run_id: str, step: int, *, interval: float = 5.0):
    """``progress_while`` for a sample store being written: units with their marker / all units."""

    def poll() -> tuple[float, float]:
        from storage.sample_store import SampleStore

        store = SampleStore.open(out_url, read_only=True)
        missing = len(store.missing_units())
        return float(store.num_units - missing), float(store.num_units)

    return progress_while(artifact_key("progress-sample", run_id, f"step-{step}"), f"sampling {run_id} step {step} into {out_url}",
                          poll, interval=interval)


@contextlib.contextmanager
def reference_progress(dataset: str, extractor_label: str) -> Iterator[Progress]:
    """A progress artifact around the reference statistics of ``dataset``: 0 % until they are loaded (computed once,
    in blocks that survive a restart), then 100 %."""
    progress = Progress(artifact_key("progress-reference", extractor_label, _basename(dataset)),
                        f"reference statistics of {dataset} ({extractor_label})")
    yield progress
    progress.update(1, 1)


def publish_requests(what: str, artifact_id: str, counts: dict[str, int], *, failed: bool = False) -> None:
    """The stage's object-storage requests and retries (storage/retries.py): its log line and a markdown artifact
    ``requests-<what>-<id>``; nothing when it made no object-storage request."""
    from storage.retries import describe

    if not counts.get("requests"):
        return
    line = f"{what} {artifact_id}: {describe(counts)}" + (" before it failed (a rerun resumes)" if failed else "")
    get_run_logger().info(line)
    try:
        create_markdown_artifact(
            markdown=f"**{what}** `{artifact_id}`\n\n| requests | retried |\n|---|---|\n"
                     f"| {counts['requests']} | {counts['retried']} |" + ("\n\nthe stage failed" if failed else ""),
            key=artifact_key("requests", what, artifact_id),
            description=f"dcae15 object-storage requests of {what} {artifact_id}")
    except Exception as exc:  # noqa: BLE001 - reporting must not fail the stage
        _warn("request counts", exc)


@contextlib.contextmanager
def requests_shown(what: str, artifact_id: str) -> Iterator[None]:
    """Count the body's object-storage requests and retries (storage/retries.py) and :func:`publish_requests` them
    when it ends: also (especially) when it failed after the client's retries."""
    from storage import retries

    before, failed = retries.snapshot(), True
    try:
        yield
        failed = False
    finally:
        publish_requests(what, artifact_id, retries.since(before), failed=failed)
