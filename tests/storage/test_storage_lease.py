"""One writer per artifact: the lease (storage/lease.py) on local disk, memory:// and S3 (moto), with real processes:
two holders never overlap, a dead holder's stale lease is taken over at once, a SIGKILLed holder's after expiry."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from storage.lease import ClaimHeldError, Lease, LeaseConfig, claim, lease_url
from storage.urls import join, read_bytes, url_to_fs, write_atomic

# Holds the claim on argv[1] for argv[2] seconds and records when it held it (one JSON line per process).
HOLDER = textwrap.dedent("""
    import json, sys, time
    from storage.lease import claim
    from storage.urls import join, write_atomic
    url, hold, out = sys.argv[1], float(sys.argv[2]), sys.argv[3]
    with claim(url, what="test artifact") as lease:
        t0 = time.time()
        print("holding", flush=True)
        time.sleep(hold)
        t1 = time.time()
    write_atomic(out, json.dumps({"start": t0, "end": t1, "took_over": lease.took_over is not None,
                                  "renewals": lease.renewals}).encode())
""")


pytestmark = pytest.mark.concurrency


def _env(**extra):
    return {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1", **extra}


def _root(backend, tmp_path, request):
    if backend == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("s3_server").make_bucket() + "/root"


def test_second_writer_refused_in_one_line_then_free_after_release(backend_url):
    art = join(backend_url, "latents", "abc")
    first = Lease(art, what="latent store", config=LeaseConfig(ttl=30, wait=0))
    assert first.try_acquire() is None
    with pytest.raises(ClaimHeldError) as err:
        with claim(art, what="latent store", config=LeaseConfig(ttl=30, wait=0)):
            pass
    msg = str(err.value)
    assert "\n" not in msg and f"latent store {art}" in msg and f"pid {os.getpid()}" in msg and "rerun" in msg
    assert first.renew() and first.renewals == 1
    first.release()
    with claim(art, what="latent store", config=LeaseConfig(ttl=30, wait=0)) as lease:
        with claim(art) as inner:  # re-entrant in one thread: a flow around a library writer
            assert inner is lease
        assert Lease(art, config=LeaseConfig(ttl=30)).holder()["token"] == lease.token
    assert Lease(art).holder() is None


def test_lease_lives_beside_the_artifact_and_layout_listings_skip_it(tmp_path):
    from storage.layout import Root

    root = Root(str(tmp_path))
    store = root.latent_store("abc")
    write_atomic(join(store, "x"), b"1")
    assert lease_url(store).endswith("/latents/.abc.lease")
    with claim(store, config=LeaseConfig(ttl=30)):
        assert root.latent_stores() == [store]


def test_expired_lease_of_another_host_taken_over_after_expiry(backend_url):
    art = join(backend_url, "runs", "diffusion", "r1")
    now = time.time()
    stale = {"holder": "pid 1 on elsewhere", "token": "t-old", "host": "elsewhere", "pid": 1, "acquired": now,
             "renewed": now, "expires": now + 4}  # long enough to be seen held on a loaded machine
    write_atomic(lease_url(art), json.dumps(stale).encode())
    notes = []
    with claim(art, what="diffusion run", config=LeaseConfig(ttl=30, poll=0.2), log=notes.append) as lease:
        taken = time.time()
        assert lease.took_over["token"] == "t-old"
    assert stale["expires"] <= taken < stale["expires"] + 10, (stale, taken)  # not before it lapsed
    assert notes[0].startswith("waiting: diffusion run") and "pid 1 on elsewhere" in notes[0]
    assert notes[1].startswith("took over diffusion run")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["local", "s3"])
def test_two_processes_never_hold_at_once_and_a_dead_holders_lease_is_taken_at_once(backend, tmp_path, request,
                                                                                   commands):
    root = _root(backend, tmp_path, request)
    art = join(root, "latents", "store")
    env = _env(DCAE15_LEASE_SECONDS="3")
    outs = [join(root, f"out{i}.json") for i in range(2)]
    # the two meet at the lease the test holds until both have said they wait: however slowly each one starts
    with claim(art, what="test artifact", config=LeaseConfig(ttl=30)):
        procs = commands([[sys.executable, "-c", HOLDER, art, "2.5", out] for out in outs], env)
        procs.until(lambda logs: all("waiting: test artifact" in log for log in logs), timeout=120)
    logs = procs.finish(timeout=120)
    assert procs.returncodes == [0, 0], logs
    a, b = sorted((json.loads(read_bytes(o)) for o in outs), key=lambda r: r["start"])
    assert a["end"] <= b["start"], (a, b)  # one writer at a time
    assert a["renewals"] >= 1  # held 2.5 s with a 3 s lease: the heartbeat renewed it
    # each said once that it waits, although the second waited twice (for the test, then for the first)
    assert [log.count("waiting: test artifact") for log in logs] == [1, 1], logs

    # a stale lease left by a process that is gone (same host): taken over at once, not after its expiry
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    now = time.time()
    write_atomic(lease_url(art), json.dumps({"holder": f"pid {dead.pid}", "token": "t-dead", "pid": dead.pid,
                                             "host": os.uname().nodename, "renewed": now,
                                             "expires": now + 3600}).encode())
    t0 = time.monotonic()
    with claim(art, config=LeaseConfig(ttl=30, wait=5)) as lease:
        assert lease.took_over["token"] == "t-dead"
    assert time.monotonic() - t0 < 5


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["local", "s3"])
def test_sigkilled_holder_is_taken_over_after_its_lease_expires(backend, tmp_path, request):
    root = _root(backend, tmp_path, request)
    art = join(root, "samples", "s1")
    env = _env(DCAE15_LEASE_SECONDS="2")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, art, "600", join(root, "never.json")], env=env,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "holding"
    doc = Lease(art).holder()
    assert doc["pid"] == holder.pid
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    # pretend the holder ran on another machine: only the expiry can free it then
    doc["host"] = "another-machine"
    fs, path = url_to_fs(lease_url(art))
    if backend == "local":
        with open(path, "w") as f:
            f.write(json.dumps(doc))
    else:
        fs.pipe_file(path, json.dumps(doc).encode())
    t0 = time.monotonic()
    with claim(art, config=LeaseConfig(ttl=30, poll=0.2)) as lease:
        assert lease.took_over["pid"] == holder.pid
    assert time.monotonic() - t0 < 10
