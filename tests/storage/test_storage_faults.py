"""Object-storage faults (issue 24): throttling answers are retried by the client and counted (storage/retries.py);
a writer that still fails after the client's retries leaves a state that a rerun resumes — it writes only the units
that are missing — and the store then equals an uninterrupted one."""

from __future__ import annotations

import http.client
import http.server
import json
import os
import subprocess
import sys
import textwrap
import threading
from urllib.parse import urlsplit

import numpy as np
import pytest

from storage.latent_store import LatentStore

pytestmark = pytest.mark.slow

SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
            b"<Message>Please reduce your request rate.</Message></Error>")

WRITER = textwrap.dedent("""
    import json, sys
    import numpy as np
    from storage import retries
    from storage.latent_store import LatentStore

    url = sys.argv[1]
    before, written = retries.snapshot(), []
    try:
        attrs = {"ae_fingerprint": "ae", "dataset_fingerprint": "ds", "resolution": 32}
        store = LatentStore.create(url, num_samples=120, channels=4, height=4, width=4, flip=False, attrs=attrs,
                                   chunk_size=20)
        for u in store.missing_units():
            a, b = store.unit_bounds(u)
            lat = np.random.default_rng(u).standard_normal((b - a, 4, 4, 4)).astype(np.float16)
            store.write_unit(u, lat, np.arange(a, b) % 10, np.ones(b - a, bool))
            written.append(u)
        store.finalize()
    finally:  # the stage's line: how many requests needed retrying, also when it failed
        print("RESULT " + json.dumps({"written": written, **retries.since(before)}), flush=True)
""")


class FaultProxy:
    """An HTTP proxy in front of the moto server: every ``every``-th request is answered 503 SlowDown, and from
    request ``outage_after`` on every request is (the store is down: more faults than the client retries)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = urlsplit(upstream)
        self.every, self.outage_after, self.seen, self.faults = 0, None, 0, 0
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _any(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with proxy.lock:
                    proxy.seen += 1
                    n = proxy.seen
                    fault = (proxy.every and n % proxy.every == 0) or (
                        proxy.outage_after is not None and n > proxy.outage_after)
                    proxy.faults += bool(fault)
                if fault:
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOWDOWN)))
                    self.end_headers()
                    self.wfile.write(SLOWDOWN)
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=30)
                conn.request(self.command, self.path, body=body, headers=dict(self.headers))
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def _write(url: str, endpoint: str) -> tuple[int, dict, str]:
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1", "AWS_ENDPOINT_URL": endpoint,
           "AWS_MAX_ATTEMPTS": "3", "AWS_RETRY_MODE": "standard"}  # botocore: 2 retries (fail fast in the outage)
    proc = subprocess.run([sys.executable, "-c", WRITER, url], env=env, capture_output=True, text=True, timeout=240)
    last = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")][-1]
    return proc.returncode, json.loads(last.removeprefix("RESULT ")), proc.stderr


def test_faults_retried_and_counted_then_a_failed_writer_resumes(s3_server):
    bucket = s3_server.make_bucket()
    proxy = FaultProxy(s3_server.endpoint_url)
    proxy.every, proxy.outage_after = 7, 110  # every 7th request throttled, then the store goes down
    code, first, err = _write(f"{bucket}/faulty", proxy.url)
    assert code != 0, "the first attempt should fail after the client's retries"
    assert "SlowDown" in err or "503" in err or "reduce your request rate" in err.lower(), err[-2000:]
    assert first["retried"] > 0 and first["requests"] > 0, first
    done = set(LatentStore.open(f"{bucket}/faulty", read_only=True).completed_units())
    assert 0 < len(done) < 6, done  # some units finished before the outage, not all

    proxy.every, proxy.outage_after = 0, None  # the store is back
    code, again, err = _write(f"{bucket}/faulty", proxy.url)
    assert code == 0, err[-3000:]
    assert set(again["written"]) == set(range(6)) - done  # resumed: only the missing units were written
    assert again["retried"] == 0 and again["requests"] > 0

    store = LatentStore.open(f"{bucket}/faulty", read_only=True)  # equals what an uninterrupted writer writes
    want = np.concatenate([np.random.default_rng(u).standard_normal((20, 4, 4, 4)).astype(np.float16)
                           for u in range(6)])
    assert np.array_equal(store.group["latents"][:], want) and store.verify()["ok"]
