"""Parallel, resumable packing: same bytes and fingerprint for 1 or N workers and after SIGKILL + rerun; tar input
streamed with bounded memory; a no-op rerun reads only listings."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from storage.packing import PARTS_DIR, pack_image_folder, plan_shards
from storage.shards import open_dataset
from storage.synthetic import make_shapes_dataset

PACK = textwrap.dedent("""
    import sys
    from storage.packing import pack_image_folder
    info = pack_image_folder(sys.argv[1], sys.argv[2], shard_bytes=int(sys.argv[3]), workers=int(sys.argv[4]),
                             read_threads=int(sys.argv[5]), progress=False)
    print(info.fingerprint, flush=True)
""")


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("pack") / "train"
    make_shapes_dataset(str(root), num_classes=4, per_class=60, size=32, fmt="jpg")
    (root / "00_circle" / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    return str(root)


def _tars(root: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(root).glob("shard-*.tar"))}


def _index(url: str) -> dict[str, list]:
    ds = open_dataset(url)
    return {k: list(v) for k, v in ds.index.items()}


def test_plan_shards_depends_only_on_sizes():
    sizes = np.full(100, 1000)
    bounds = plan_shards(sizes, 10_000)
    assert bounds[0][0] == 0 and bounds[-1][1] == 100
    assert all(b > a for a, b in bounds) and all(bounds[i][1] == bounds[i + 1][0] for i in range(len(bounds) - 1))
    assert len(bounds) == 25  # 1000 + ~2 KB of tar headers per sample: the 4th sample reaches 10 KB
    assert plan_shards(np.array([50_000, 1, 1]), 10) == [(0, 1), (1, 2), (2, 3)]  # never an empty shard
    with pytest.raises(ValueError, match="shard_bytes"):
        plan_shards(sizes, 0)


@pytest.mark.slow
def test_workers_and_kill_rerun_give_the_same_dataset(tree, tmp_path):
    serial = pack_image_folder(tree, str(tmp_path / "serial"), shard_bytes=8_000, progress=False)
    assert len(serial.shards) > 20 and serial.num_samples == 241 and serial.num_valid == 240
    parallel = pack_image_folder(tree, str(tmp_path / "parallel"), shard_bytes=8_000, workers=2, read_threads=4,
                                 progress=False)
    assert parallel.fingerprint == serial.fingerprint and parallel.shards == serial.shards
    assert _tars(str(tmp_path / "parallel")) == _tars(str(tmp_path / "serial"))  # byte-identical shards
    assert _index(str(tmp_path / "parallel")) == _index(str(tmp_path / "serial"))
    assert not (tmp_path / "parallel" / PARTS_DIR).exists()  # parts are tidied once dataset.json is written

    # SIGKILL a serial packer after a few shards, then rerun: only the unfinished shards are packed
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([sys.executable, "-c", PACK, tree, str(killed), "8000", "1", "1"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(list(killed.glob(f"{PARTS_DIR}/*/*.done"))) < 3 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    markers = sorted(killed.glob(f"{PARTS_DIR}/*/*.done"))
    assert 3 <= len(markers) < len(serial.shards) and not (killed / "dataset.json").exists(), proc.stderr.read()
    finished = {m.name[:-len(".done")]: (killed / m.name[:-len(".done")]).stat().st_mtime_ns for m in markers}
    rerun = pack_image_folder(tree, str(killed), shard_bytes=8_000, progress=False)
    assert rerun.fingerprint == serial.fingerprint
    assert {n: (killed / n).stat().st_mtime_ns for n in finished} == finished  # finished shards were not redone
    assert _tars(str(killed)) == _tars(str(tmp_path / "serial")) and _index(str(killed)) == _index(str(tmp_path / "serial"))


def _big_tars(root: Path, n_tars: int, per_tar: int, side: int) -> int:
    """Webdataset tars of incompressible-size BMP images (decoded fast); returns the total bytes."""
    root.mkdir(parents=True)
    total = 0
    for t in range(n_tars):
        with tarfile.open(root / f"part-{t:03d}.tar", "w") as tf:
            for i in range(per_tar):
                buf = io.BytesIO()
                Image.new("RGB", (side, side), (t * 40 % 256, i * 13 % 256, 90)).save(buf, format="BMP")
                for name, data in ((f"s{t}_{i}.bmp", buf.getvalue()), (f"s{t}_{i}.cls", str(i % 3).encode())):
                    member = tarfile.TarInfo(name)
                    member.size = len(data)
                    tf.addfile(member, io.BytesIO(data))
                    total += len(data)
    return total


MEASURE = textwrap.dedent("""
    import resource, sys
    from storage.packing import pack_image_folder
    import pyarrow.parquet, PIL.BmpImagePlugin  # imported before the baseline: only packing's own growth counts
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    info = pack_image_folder(sys.argv[1], sys.argv[2], shard_bytes=64 << 20, read_threads=2, progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(info.num_valid, (peak - base) * 1024, flush=True)
""")


@pytest.mark.slow
def test_tar_input_is_streamed_with_bounded_memory(tmp_path):
    total = _big_tars(tmp_path / "tars", n_tars=4, per_tar=12, side=1100)  # 48 images x 3.6 MB = 174 MB
    out = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path / "tars"), str(tmp_path / "out")],
                         env={**os.environ, "PYTHONPATH": os.getcwd()}, capture_output=True, text=True, check=True)
    valid, growth = map(int, out.stdout.split())
    assert valid == 48
    # reading whole tars would grow by >= total; streaming holds a few images (+ one decode) at a time
    assert growth < total / 4, (growth, total)
    ds = open_dataset(str(tmp_path / "out"))
    images, labels, ok = ds.read_range(0, 3, 16)
    assert ok.all() and images.shape == (3, 16, 16, 3)


def test_noop_rerun_reads_only_listings(tmp_path, monkeypatch):
    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    _big_tars(tmp_path / "tars", n_tars=2, per_tar=3, side=24)
    dst = f"memory://noop-{os.getpid()}-{time.monotonic_ns()}"
    first = pack_image_folder(str(tmp_path / "tars"), dst, progress=False)

    def forbidden(*args, **kwargs):
        raise AssertionError("a no-op rerun must not read source content")

    monkeypatch.setattr(LocalFileSystem, "_open", forbidden)
    monkeypatch.setattr(LocalFileSystem, "cat_file", forbidden)
    again = pack_image_folder(str(tmp_path / "tars"), dst, progress=False)
    assert again == first and json.loads(fsspec.filesystem("memory").cat_file(dst + "/dataset.json"))["fingerprint"] == first.fingerprint
    monkeypatch.undo()
    # a changed source (same names, new content) is noticed from the listing alone, and repacked
    _big_tars(tmp_path / "tars2", n_tars=2, per_tar=4, side=24)
    for p in (tmp_path / "tars2").iterdir():
        os.replace(p, tmp_path / "tars" / p.name)
    changed = pack_image_folder(str(tmp_path / "tars"), dst, progress=False)
    assert changed.num_samples == 8 and changed.fingerprint != first.fingerprint
    fsspec.filesystem("memory").rm(dst.split("://", 1)[1], recursive=True)
    (tmp_path / "tars" / "zz-broken.tar").write_bytes(b"not a tar" * 400)
    with pytest.raises(ValueError, match="zz-broken.tar: not a readable tar"):
        pack_image_folder(str(tmp_path / "tars"), str(tmp_path / "out-broken"), progress=False)


def test_reads_from_s3_are_concurrent(s3_server, tmp_path, monkeypatch):
    import asyncio

    import s3fs

    make_shapes_dataset(str(tmp_path / "src"), num_classes=2, per_class=8, size=16, fmt="png")
    src = s3_server.make_bucket() + "/train"
    s3fs.S3FileSystem().put(str(tmp_path / "src"), src.split("://", 1)[1], recursive=True)
    live, peak = [0], [0]
    real = s3fs.S3FileSystem._cat_file

    async def counting(self, path, *args, **kwargs):
        live[0] += 1
        peak[0] = max(peak[0], live[0])
        try:
            await asyncio.sleep(0.02)  # a GET with some latency: concurrent reads overlap it
            return await real(self, path, *args, **kwargs)
        finally:
            live[0] -= 1

    monkeypatch.setattr(s3fs.S3FileSystem, "_cat_file", counting)
    info = pack_image_folder(src, str(tmp_path / "out"), read_threads=4, progress=False)
    assert info.num_valid == 16 and peak[0] >= 3, peak  # several GETs in flight at once (one process)
    local = pack_image_folder(str(tmp_path / "src"), str(tmp_path / "out-local"), progress=False)
    assert local.fingerprint == info.fingerprint  # the same images packed from S3 or from disk
