"""One writer per artifact: the lease (storage/lease.py) on local disk, memory:// and S3 (moto), with real processes:
two holders never overlap, a dead holder's stale lease is taken over at once, a SIGKILLed holder's after expiry."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from storage.lease import ClaimHeldError, Lease, LeaseConfig, claim, lease_url
from storage.urls import join, read_bytes, url_to_fs, write_atomic

# Holds the claim on argv[1] until its heartbeat has renewed the lease argv[2] times (a deadline only turns a heartbeat
# that never renews into a failure), or forever with argv[2] "forever" (the test kills it); records when it held it
# (one JSON line per process).
HOLDER = textwrap.dedent("""
    import json, sys, time
    from storage.lease import claim
    from storage.urls import join, write_atomic
    url, renewals, out = sys.argv[1], sys.argv[2], sys.argv[3]
    with claim(url, what="test artifact") as lease:
        t0 = time.time()
        print("holding", flush=True)
        if renewals == "forever":
            time.sleep(3600)
        deadline = time.monotonic() + 300
        while lease.renewals < int(renewals) and not lease.lost and time.monotonic() < deadline:
            time.sleep(0.05)
        t1 = time.time()
    write_atomic(out, json.dumps({"start": t0, "end": t1, "took_over": lease.took_over is not None,
                                  "renewals": lease.renewals, "lost": lease.lost}).encode())
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
    """A live-looking lease of another host is waited for (one "waiting" note naming its holder) and taken over only
    once it has expired. The steps meet at explicit points, never at a clock: the lease expires in an hour while the
    claim meets it; the test expires it only after the claim has said it waits."""
    art = join(backend_url, "runs", "diffusion", "r1")
    now = time.time()
    held = {"holder": "pid 1 on elsewhere", "token": "t-old", "host": "elsewhere", "pid": 1, "acquired": now,
            "renewed": now, "expires": now + 3600}  # held however late the claim starts on a loaded machine
    write_atomic(lease_url(art), json.dumps(held).encode())
    notes, waiting, out = [], threading.Event(), {}

    def log(msg):
        notes.append(msg)
        if msg.startswith("waiting:"):
            waiting.set()

    def take():
        try:
            with claim(art, what="diffusion run", config=LeaseConfig(ttl=30, poll=0.2), log=log) as lease:
                out["took_over"] = lease.took_over
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            out["error"] = exc

    taker = threading.Thread(target=take, daemon=True)
    taker.start()
    assert waiting.wait(120), (notes, out)  # the deadline only turns a hang into a failure
    expired = {**held, "renewed": time.time() - 60, "expires": time.time() - 30}  # its holder stopped renewing
    write_atomic(lease_url(art), json.dumps(expired).encode())
    taker.join(120)
    assert not taker.is_alive() and "error" not in out, (notes, out)
    assert out["took_over"] == expired  # it replaced the expired lease, never the one still held
    assert notes[0].startswith("waiting: diffusion run") and "pid 1 on elsewhere" in notes[0]
    assert notes[1].startswith("took over diffusion run") and len(notes) == 2, notes


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["local", "s3"])
def test_two_processes_never_hold_at_once_and_a_dead_holders_lease_is_taken_at_once(backend, tmp_path, request,
                                                                                   commands):
    """Two processes that meet at a held lease write one after the other, each renewing its lease by heartbeat while
    it holds it and each saying once that it waits; a lease whose holder process is gone from this host is taken
    over at the first look, not after its hour-long expiry."""
    root = _root(backend, tmp_path, request)
    art = join(root, "latents", "store")
    # a 6 s lease, renewed every 2 s: a heartbeat may come up to 4 s late on a loaded machine before the lease lapses
    env = _env(DCAE15_LEASE_SECONDS="6")
    outs = [join(root, f"out{i}.json") for i in range(2)]
    # the two meet at the lease the test holds until both have said they wait: however slowly each one starts
    with claim(art, what="test artifact", config=LeaseConfig(ttl=30)):
        procs = commands([[sys.executable, "-c", HOLDER, art, "1", out] for out in outs], env)
        procs.until(lambda logs: all("waiting: test artifact" in log for log in logs), timeout=120)
    logs = procs.finish(timeout=400)
    assert procs.returncodes == [0, 0], logs
    a, b = sorted((json.loads(read_bytes(o)) for o in outs), key=lambda r: r["start"])
    assert a["end"] <= b["start"], (a, b)  # one writer at a time
    # each held until its heartbeat renewed the lease (not lost, not cut by the holder's deadline)
    assert all(r["renewals"] >= 1 and not r["lost"] for r in (a, b)), (a, b)
    # each said once that it waits, although the second waited twice (for the test, then for the first)
    assert [log.count("waiting: test artifact") for log in logs] == [1, 1], logs

    # a stale lease left by a process that is gone (same host): taken over at once, not after its expiry
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    now = time.time()
    write_atomic(lease_url(art), json.dumps({"holder": f"pid {dead.pid}", "token": "t-dead", "pid": dead.pid,
                                             "host": os.uname().nodename, "renewed": now,
                                             "expires": now + 3600}).encode())
    with claim(art, config=LeaseConfig(ttl=30, wait=0)) as lease:  # wait=0: taken at the first look or refused
        assert lease.took_over["token"] == "t-dead"


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["local", "s3"])
def test_sigkilled_holder_is_taken_over_after_its_lease_expires(backend, tmp_path, request):
    """The lease of a SIGKILLed holder on another host (nothing can tell it is gone) is taken over once it expired,
    never before."""
    root = _root(backend, tmp_path, request)
    art = join(root, "samples", "s1")
    env = _env(DCAE15_LEASE_SECONDS="2")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, art, "forever", join(root, "never.json")], env=env,
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
    # wait=120: refused (the test fails) rather than hanging if the expired lease were never taken over; a 2 s lease
    # lapses long before, however loaded the machine
    with claim(art, config=LeaseConfig(ttl=30, poll=0.2, wait=120)) as lease:
        taken = time.time()
        assert lease.took_over["pid"] == holder.pid
    assert taken >= lease.took_over["expires"]  # not before its lease lapsed
