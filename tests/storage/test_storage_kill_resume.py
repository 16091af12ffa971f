"""A unit writer SIGKILLed mid-store leaves no unit marked complete with bad data; a rerun finishes the store
with exactly the arrays of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from storage.latent_store import LatentStore
from storage.urls import join

WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from storage.latent_store import LatentStore

    url, n, chunk, c = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    attrs = {"ae_fingerprint": "ae", "dataset_fingerprint": "ds", "resolution": 32}
    store = LatentStore.create(url, num_samples=n, channels=c, height=8, width=8, flip=True, attrs=attrs,
                               chunk_size=chunk)
    for u in store.missing_units():
        a, b = store.unit_bounds(u)
        rng = np.random.default_rng(u)  # the data of a unit depends only on the unit: reruns write the same
        lat = rng.standard_normal((b - a, c, 8, 8)).astype(np.float16)
        store.write_unit(u, lat, np.arange(a, b) % 10, np.ones(b - a, bool), -lat)
        print(u, flush=True)
    store.finalize()
    print("done", flush=True)
""")


SIZES = {"local": ["4000", "100", "16"], "s3": ["600", "20", "4"]}  # moto is slow: a smaller store there


def run_writer(url, env, sizes):
    return subprocess.run([sys.executable, "-c", WRITER, url, *sizes], env=env, check=True, capture_output=True, text=True)


def arrays(url):
    store = LatentStore.open(url, read_only=True)
    return {name: store.group[name][:] for name in ("latents", "latents_flip", "labels", "valid")}


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["local", "s3"])
def test_sigkill_mid_store_then_rerun_equals_uninterrupted(tmp_path, backend, request):
    sizes = SIZES[backend]
    if backend == "local":
        root = str(tmp_path)
    else:
        root = request.getfixturevalue("s3_server").make_bucket()  # it also set the AWS env we pass on
    killed_url, clean_url = join(root, "killed"), join(root, "clean")
    env = {**os.environ, "PYTHONPATH": os.getcwd()}

    proc = subprocess.Popen([sys.executable, "-c", WRITER, killed_url, *sizes], env=env, stdout=subprocess.PIPE, text=True)
    lines = [proc.stdout.readline() for _ in range(3)]  # at least 3 units are done and it is writing more
    time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert all(line.strip().isdigit() for line in lines), lines
    partial = LatentStore.open(killed_url)
    missing = partial.missing_units()
    assert 0 < len(missing) < partial.num_units - 2 and not partial.is_complete
    assert partial.verify()["corrupt"] == []  # every unit with a marker is intact

    out = run_writer(killed_url, env, sizes).stdout.split()
    assert out[-1] == "done" and [int(u) for u in out[:-1]] == missing  # the rerun only redid the missing units
    run_writer(clean_url, env, sizes)
    a, b = arrays(killed_url), arrays(clean_url)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert LatentStore.open(killed_url).statistics() == LatentStore.open(clean_url).statistics()
