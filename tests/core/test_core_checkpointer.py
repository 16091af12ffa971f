"""The trainers' one checkpointer (``dcae15.checkpointer``) on a local run directory with tiny tensors: the payload
before ``latest``, pruning, one asynchronous save in flight, a failed save leaving ``latest`` alone, resume."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch

from dcae15.checkpointer import Checkpointer, load_torch_file, save_torch_file
from storage.rundir import RunDir


def _run(tmp_path: Path) -> RunDir:
    return RunDir(str(tmp_path / "run"), kind="test", checkpoint_suffix=".pt")


def _writer(run: RunDir, step: int, seen: list):
    """A synchronous payload: one torch file; records what ``latest`` named while it was written."""
    def write(url: str) -> None:
        seen.append((step, (run.latest() or {}).get("step")))
        save_torch_file(url, {"step": step, "w": torch.full((2,), float(step))})
    return write


def _files(run: RunDir) -> list[str]:
    return sorted(p.name for p in Path(run.root, "checkpoints").iterdir())


def test_sync_save_writes_the_payload_then_metrics_then_latest_and_prunes(tmp_path):
    run = _run(tmp_path)
    ckpt = Checkpointer(run, keep=2)
    seen: list = []
    for step in (2, 4, 6):
        ckpt.metrics.append({"step": step, "loss": 1.0 / step})
        ckpt.save(step, _writer(run, step, seen))
        assert run.latest()["step"] == step and [r["step"] for r in run.metrics()] == list(range(2, step + 1, 2))
    assert seen == [(2, None), (4, 2), (6, 4)]  # each payload written while `latest` named the previous one
    assert _files(run) == ["step-0000004.pt", "step-0000006.pt"]  # keep=2: the oldest pruned
    assert torch.equal(load_torch_file(run.latest()["checkpoint"])["w"], torch.full((2,), 6.0))


def test_metrics_past_the_step_are_not_published(tmp_path):
    run = _run(tmp_path)
    ckpt = Checkpointer(run, keep=1)
    ckpt.metrics.extend({"step": s} for s in (1, 2, 3))
    ckpt.save(2, _writer(run, 2, []))
    assert [r["step"] for r in run.metrics()] == [1, 2]


@pytest.mark.concurrency
def test_async_save_is_published_when_done_and_one_is_in_flight(tmp_path):
    run = _run(tmp_path)
    ckpt = Checkpointer(run, keep=3)
    futures: dict[int, Future] = {}
    seen: list = []

    def write_async(step):
        def write(url):
            seen.append((step, (run.latest() or {}).get("step")))
            save_torch_file(url, {"step": step})
            futures[step] = Future()
            return futures[step]
        return write

    ckpt.save(2, write_async(2))
    assert ckpt.in_flight == 2 and run.latest() is None  # written, not yet complete
    ckpt.poll()
    assert run.latest() is None  # poll never blocks
    futures[2].set_result(None)
    ckpt.poll()
    assert run.latest()["step"] == 2 and ckpt.in_flight is None
    ckpt.save(4, write_async(4))
    timer = threading.Timer(0.2, futures[4].set_result, args=(None,))
    timer.start()
    ckpt.save(6, write_async(6))  # waits for step 4's save first: one save in flight at a time
    timer.join()
    assert seen == [(2, None), (4, 2), (6, 4)] and ckpt.in_flight == 6
    futures[6].set_result(None)
    with ckpt:  # leaving without an error waits for the save in flight
        pass
    assert run.latest()["step"] == 6


@pytest.mark.concurrency
def test_a_failed_async_save_keeps_latest_at_the_previous_checkpoint(tmp_path):
    run = _run(tmp_path)
    ckpt = Checkpointer(run, keep=3)
    ckpt.save(2, _writer(run, 2, []))
    failed: Future = Future()
    failed.set_exception(OSError("disk full"))
    ckpt.save(4, lambda url: failed)
    with pytest.raises(OSError, match="disk full"):
        ckpt.poll()
    assert run.latest()["step"] == 2 and ckpt.in_flight is None
    # leaving on an error: the loop's error is the one raised, not the failed save's
    ckpt.save(6, lambda url: failed)
    with pytest.raises(KeyError, match="the loop's"):
        with ckpt:
            raise KeyError("the loop's")
    assert run.latest()["step"] == 2
    # ... and a good save in flight still completes and is published
    done: Future = Future()
    done.set_result(None)
    ckpt.save(8, lambda url: save_torch_file(url, {"step": 8}) or done)
    with pytest.raises(KeyError):
        with ckpt:
            raise KeyError("stop")
    assert run.latest()["step"] == 8


def test_resume_loads_what_latest_names_drops_partial_saves_and_metrics_past_it(tmp_path):
    run = _run(tmp_path)
    ckpt = Checkpointer(run, keep=5)
    ckpt.metrics.extend({"step": s} for s in (1, 2, 3, 4))
    for step in (2, 4):
        ckpt.save(step, _writer(run, step, []))
    run.write_metrics([{"step": s} for s in range(1, 7)])  # rows logged past the checkpoint before a crash
    save_torch_file(run.checkpoint_url(6), {"step": 6})  # a save the crash interrupted before `latest`
    assert Checkpointer(_run(tmp_path), keep=5).resume(lambda url: None) == 4
    assert _files(run) == ["step-0000002.pt", "step-0000004.pt", "step-0000006.pt"]  # kept unless asked

    again = Checkpointer(_run(tmp_path), keep=5)
    loaded: list = []
    assert again.resume(lambda url: loaded.append(load_torch_file(url)["step"]), drop_partial=True) == 4
    assert loaded == [4] and [r["step"] for r in again.metrics] == [1, 2, 3, 4]
    assert _files(run) == ["step-0000002.pt", "step-0000004.pt"]
    assert Checkpointer(RunDir(str(tmp_path / "new")), keep=1).resume(lambda url: 1 / 0) == 0  # a new run
