"""A unit writer SIGKILLed mid-store leaves no unit marked complete with bad data; a rerun finishes the store
with exactly the arrays of an uninterrupted run.

The kill lands at an explicit point, never after a sleep: the writer holds still once unit ``HOLD_AT``'s arrays are
written and before its completion marker, says so, and waits there until it is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from storage.latent_store import LatentStore
from storage.urls import join

WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from storage.latent_store import LatentStore

    url, n, chunk, c = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    hold_at = int(sys.argv[5]) if len(sys.argv) > 5 else None
    attrs = {"ae_fingerprint": "ae", "dataset_fingerprint": "ds", "resolution": 32}
    store = LatentStore.create(url, num_samples=n, channels=c, height=8, width=8, flip=True, attrs=attrs,
                               chunk_size=chunk)
    if hold_at is not None:  # hold still between unit hold_at's arrays and its marker: the test kills us there
        import time
        import storage.units

        put_atomic = storage.units.put_atomic

        def put_or_hold(fs, path, data):
            if path == store._marker(hold_at):
                print("holding", flush=True)
                time.sleep(3600)
            return put_atomic(fs, path, data)

        storage.units.put_atomic = put_or_hold
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
HOLD_AT = 3  # units 0-2 complete, unit 3 written but unmarked when the kill lands


def run_writer(url, env, sizes):
    return subprocess.run([sys.executable, "-c", WRITER, url, *sizes], env=env, check=True, capture_output=True, text=True)


def arrays(url):
    store = LatentStore.open(url, read_only=True)
    return {name: store.group[name][:] for name in ("latents", "latents_flip", "labels", "valid")}


@pytest.mark.concurrency
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["local", "s3"])
def test_sigkill_mid_store_then_rerun_equals_uninterrupted(tmp_path, backend, request):
    """SIGKILLed between a unit's arrays and its marker (an explicit point the writer reports and waits at), the
    store has exactly the earlier units complete and intact; the rerun redoes only the rest, the kill's half-written
    unit included, and ends with the arrays and statistics of an uninterrupted run."""
    sizes = SIZES[backend]
    if backend == "local":
        root = str(tmp_path)
    else:
        root = request.getfixturevalue("s3_server").make_bucket()  # it also set the AWS env we pass on
    killed_url, clean_url = join(root, "killed"), join(root, "clean")
    env = {**os.environ, "PYTHONPATH": os.getcwd()}

    proc = subprocess.Popen([sys.executable, "-c", WRITER, killed_url, *sizes, str(HOLD_AT)], env=env,
                            stdout=subprocess.PIPE, text=True)
    try:
        # units 0..HOLD_AT-1 are done and unit HOLD_AT's arrays are written: it waits for its kill there, however slow
        lines = [proc.stdout.readline().strip() for _ in range(HOLD_AT + 1)]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert lines == [*map(str, range(HOLD_AT)), "holding"], lines
    partial = LatentStore.open(killed_url)
    missing = partial.missing_units()
    assert missing == list(range(HOLD_AT, partial.num_units)) and not partial.is_complete
    a, b = partial.unit_bounds(HOLD_AT)
    assert partial.group["latents"][a:b].any()  # the kill cut a unit whose rows were written, its marker not
    assert partial.verify()["corrupt"] == []  # every unit with a marker is intact

    out = run_writer(killed_url, env, sizes).stdout.split()
    assert out[-1] == "done" and [int(u) for u in out[:-1]] == missing  # the rerun only redid the missing units
    run_writer(clean_url, env, sizes)
    a, b = arrays(killed_url), arrays(clean_url)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert LatentStore.open(killed_url).statistics() == LatentStore.open(clean_url).statistics()
