"""Project-wide test fixtures: a loopback S3 server (moto), a guard that forbids non-loopback network, and commands
started together that meet at an artifact's lease (the one-writer tests)."""

from __future__ import annotations

import ipaddress
import os
import socket
import tempfile
import uuid
from dataclasses import dataclass

import pytest

# One intra-op thread per process (before torch is imported; subprocesses inherit it): tests start Dask workers,
# DataLoader workers and torchrun children on 2 cores, and tiny models slow down 10-50x when threads oversubscribe.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# inductor keys its compile cache without ATEN_CPU_CAPABILITY, yet the C++ it generates depends on it: a kernel cached
# by a run on AVX-512 fails to build in a run under ATEN_CPU_CAPABILITY=default ("'at::vec' has not been declared"),
# as .ci/run's numerics passes do. One cache per capability named.
if os.environ.get("ATEN_CPU_CAPABILITY") and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), f"torchinductor_{os.getuid()}_{os.environ['ATEN_CPU_CAPABILITY']}")

_LOCAL_NAMES = {"localhost", "localhost.localdomain", ""}


def pytest_addoption(parser):
    parser.addoption("--repeat", type=int, default=1, metavar="N",
                     help="run each selected test N times (the concurrency tests in a loop beside a load, issue 30)")


def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (pyproject's addopts): one test process more than the cores this process may run on (not the
    host's count, which ``psutil`` reports in a container), at most 4. The tests wait on subprocesses, servers and
    leases for part of their time: with one process per core the suite kept 1.4 of 2 cores busy (647 s), with
    three 614 s beside the same background load (bench/RESULTS.md). Every test process runs its own Prefect test
    server. ``PYTEST_XDIST_AUTO_NUM_WORKERS`` overrides; ``-n 0`` runs the suite in one process."""
    env = os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS")
    if env:
        return int(env)
    return max(1, min(4, len(os.sched_getaffinity(0)) + 1))


def pytest_generate_tests(metafunc):
    n = metafunc.config.getoption("repeat")
    if n > 1:
        metafunc.fixturenames.append("_repeat")
        metafunc.parametrize("_repeat", range(n), ids=[f"run{i}" for i in range(n)])


def _is_loopback(address) -> bool:
    """True for AF_UNIX paths and 127.0.0.0/8, ::1 (and 'localhost') addresses."""
    if not isinstance(address, tuple):
        return True  # AF_UNIX socket path / abstract namespace
    host = address[0]
    if isinstance(host, bytes):
        host = host.decode()
    if host in _LOCAL_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False  # a host name other than localhost would need DNS: not allowed either


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Any connect() to a non-loopback address raises: tests prove the code needs no network."""
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def guarded(real):
        def connect(self, address, *args, **kwargs):
            if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address):
                raise ConnectionRefusedError(f"network access blocked in tests (tried {address!r})")
            return real(self, address, *args, **kwargs)

        return connect

    monkeypatch.setattr(socket.socket, "connect", guarded(real_connect))
    monkeypatch.setattr(socket.socket, "connect_ex", guarded(real_connect_ex))
    yield


@pytest.fixture(scope="session")
def _moto_endpoint():
    """One moto S3 server on 127.0.0.1 (a free port) for the whole session."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@dataclass
class S3Server:
    """Handle given to tests: the endpoint and a helper that makes a fresh bucket."""

    endpoint_url: str

    def make_bucket(self, name: str | None = None) -> str:
        """Create a bucket (unique name by default) and return ``s3://<name>``."""
        import boto3

        name = name or f"test-{uuid.uuid4().hex[:12]}"
        client = boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        client.create_bucket(Bucket=name)
        return f"s3://{name}"

    @property
    def storage_options(self) -> dict:
        """Explicit options equal to what the environment says (for code paths that take options)."""
        return {"endpoint_url": self.endpoint_url, "key": "testing", "secret": "testing"}


@pytest.fixture
def s3_server(_moto_endpoint, monkeypatch):
    """A loopback S3 endpoint with the AWS env set for s3fs / boto3 (and child processes).

    Usage: ``url = s3_server.make_bucket() + "/prefix"``.
    """
    monkeypatch.setenv("AWS_ENDPOINT_URL", _moto_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # instances made under another env must not be reused
    yield S3Server(_moto_endpoint)
    _close_s3_sessions()


def _close_s3_sessions() -> None:
    """Close the aiohttp sessions of the s3fs instances a test made, then forget the instances.

    Clearing the instance cache alone left the sessions of zarr's instances (``asynchronous=True``, opened on zarr's
    own IO loop, which s3fs's finaliser cannot reach) open until interpreter exit, where aiohttp reported "Unclosed
    client session". Each is closed here on the loop it was opened on; an instance used again later reconnects (s3fs
    opens a client when ``_s3`` is None).
    """
    import s3fs
    from fsspec.asyn import sync
    from zarr.core.sync import sync as zarr_sync

    for fs in list(s3fs.S3FileSystem._cache.values()):
        client, fs._s3 = getattr(fs, "_s3", None), None
        if client is None:
            continue
        if fs.asynchronous:
            zarr_sync(client.__aexit__(None, None, None))
        elif fs.loop is not None and fs.loop.is_running():
            sync(fs.loop, client.__aexit__, None, None, None)
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def no_download(monkeypatch):
    """Any weights download (torch.hub, torch-fidelity's Inception loader, urllib) fails the test loudly."""
    import urllib.request

    import torch.hub
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    def refuse(*args, **kwargs):
        raise AssertionError(f"a download was attempted: {args[:1]}")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(fe, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


class Commands:
    """Processes started together; each one's output (stdout + stderr) is collected line by line as it comes, so a
    test can wait for a line a process is certain to print (never for one it may or may not print) or for a file it
    writes.

    Args:
        cmds: one argv per process.
        env: their environment.
    """

    def __init__(self, cmds: list[list[str]], env: dict) -> None:
        import subprocess
        import threading

        self.procs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                      for c in cmds]
        self.lines: list[list[str]] = [[] for _ in cmds]
        self._readers = [threading.Thread(target=lambda p=p, out=out: out.extend(p.stdout), daemon=True)
                         for p, out in zip(self.procs, self.lines)]
        for r in self._readers:
            r.start()

    @property
    def logs(self) -> list[str]:
        return ["".join(list(out)) for out in self.lines]

    def until(self, done, *, timeout: float = 300.0, while_running: bool = True) -> None:
        """Wait until ``done(logs)`` holds. The deadline only turns a hang into a failure (with the logs); a process
        that exits first fails the test too (``while_running``)."""
        import time

        deadline = time.monotonic() + timeout
        while not done(self.logs):
            dead = [p.returncode for p in self.procs if p.poll() is not None]
            if (while_running and dead) or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"exited: {dead}; logs: {self.logs}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL the processes still running (a failed test leaves none behind)."""
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    def finish(self, timeout: float = 600.0) -> list[str]:
        """Wait for every process to exit; returns their logs (see :attr:`returncodes`)."""
        import subprocess

        try:
            for p in self.procs:
                p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        for r in self._readers:
            r.join(timeout=60)
        return self.logs

    @property
    def returncodes(self) -> list[int | None]:
        return [p.returncode for p in self.procs]


def _meet_at_lease(artifact_url: str, what: str, cmd: list[str], env: dict, n: int = 2) -> tuple[list[int], list[str]]:
    """Start ``cmd`` ``n`` times while the test holds the artifact's lease, and release it only once every command
    has said it waits for it (``storage.lease.claim`` says so exactly once, always, when it meets a held lease): the
    commands then meet at the released lease, however slowly each one started. Returns (return codes, logs).

    The "waiting: ..." line is a synchronisation point, not a timing guess: ``claim`` prints it after reading the
    lease as held and before its first wait, and a command cannot pass a lease the test holds; so once every command
    printed it, every one is at the lease, whatever the machine's load."""
    from storage.lease import LeaseConfig, claim

    with claim(artifact_url, what=what, config=LeaseConfig(ttl=60)):
        cmds = Commands([cmd] * n, env)
        cmds.until(lambda logs: all(f"waiting: {what}" in log for log in logs))
    logs = cmds.finish()
    return cmds.returncodes, logs


@pytest.fixture
def meet_at_lease():
    """``meet_at_lease(artifact_url, what, cmd, env, n=2) -> (return codes, logs)``: ``n`` identical commands that
    reach the artifact's lease while the test holds it, then race for it at once (see :func:`_meet_at_lease`)."""
    return _meet_at_lease


@pytest.fixture
def commands():
    """``commands(cmds, env) -> Commands``: processes started together, their output collected as it comes."""
    return Commands
