"""One writer per artifact in flow runs: the engine's queue first, then the lease where the data lives.

A stage task that writes a named artifact runs under :func:`artifact_stage`: it holds the single slot of the Prefect
global concurrency limit ``dcae15-<kind>-<artifact id>`` (created on first use, limit 1), so a second flow run of
the same artifact on the same Prefect API waits in Prefect's own queue (visible in the UI: Concurrency) and then
finds the finished result. Around the work it also holds the artifact's lease (``storage.lease``), which is what
excludes writers outside Prefect or under another API (two `dcae15` commands each start their own temporary
API). Stages whose library call takes that lease itself, possibly in a torchrun child (trainers, sampling), ask
for the slot only (``lease=False``): a lease held by the parent would make the child wait for its own parent.

The slot is a Prefect lease renewed while the task lives; a SIGKILLed flow run's slot is freed by the server only
when that lease runs out (``SLOT_LEASE_SECONDS``, Prefect's minimum of 60 s, plus its repossessor's 15 s loop). So a
stage waits for the slot at most ``$DCAE15_SLOT_WAIT_SECONDS`` (default 5 s) and then goes on under the storage
lease alone, which waits for a live writer and takes over a dead one's at once: the rerun of a crashed run is not
held back by the dead run's slot, and two live writers are still never both writing.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import re
import sys
from typing import Any, Callable, Iterator, NamedTuple

__all__ = ["ArtifactKey", "SLOT_LEASE_SECONDS", "SLOT_WAIT_ENV", "artifact_limit_name", "artifact_slot",
           "artifact_claim", "artifact_stage", "dataset_key",
           "ae_run_key", "latent_store_key", "diffusion_run_key", "sample_store_key"]

SLOT_LEASE_SECONDS = 60.0
SLOT_WAIT_ENV = "DCAE15_SLOT_WAIT_SECONDS"


class ArtifactKey(NamedTuple):
    """Which artifact a stage writes: ``what`` for messages, its ``url``, its ``id`` (store id, run id, ...), and
    whether the stage holds the storage lease itself (False: the library call it makes does)."""

    what: str
    url: str
    id: str
    lease: bool = True


def artifact_limit_name(what: str, artifact_id: str) -> str:
    """``dcae15-latent-store-<id>``: the global concurrency limit of one artifact."""
    return re.sub(r"[^a-z0-9-]+", "-", f"dcae15-{what}-{artifact_id}".lower()).strip("-")


def _ensure_limit(name: str) -> int:
    """Create the limit (1 slot) unless it exists; returns how many slots are taken now (0 when a run holds none)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
        except ObjectAlreadyExists:
            pass
        except Exception:  # noqa: BLE001 - two creators at once can get a 500 from a SQLite server: read it back
            pass
        return int(client.read_global_concurrency_limit_by_name(name).active_slots)


@contextlib.contextmanager
def artifact_slot(what: str, artifact_id: str, *, log: Callable[[str], None] = print) -> Iterator[None]:
    """Hold the artifact's Prefect concurrency slot for the body, waiting at most ``$DCAE15_SLOT_WAIT_SECONDS``
    for another flow run's slot (then the body runs without it: see the module docstring)."""
    from prefect.concurrency.sync import concurrency

    name = artifact_limit_name(what, artifact_id)
    wait = float(os.environ.get(SLOT_WAIT_ENV) or 5.0)
    _ensure_limit(name)

    def take(seconds: float):
        slot = concurrency(name, occupy=1, timeout_seconds=seconds, lease_duration=SLOT_LEASE_SECONDS, strict=True)
        slot.__enter__()
        return slot

    try:
        try:
            slot = take(min(2.0, wait))
        except TimeoutError:  # held: say so once, then wait in Prefect's queue
            log(f"waiting: another flow run holds the Prefect slot of {what} {artifact_id} (concurrency limit "
                f"{name})")
            slot = take(wait)
    except TimeoutError:
        log(f"the Prefect slot of {what} {artifact_id} is still held after {wait:.0f} s (a live run, whose storage "
            "lease this one now waits for, or a killed one, whose slot Prefect frees later): going on under the "
            "storage lease")
        yield
        return
    try:
        yield
    except BaseException:
        if not slot.__exit__(*sys.exc_info()):
            raise
    else:
        slot.__exit__(None, None, None)


@contextlib.contextmanager
def artifact_claim(key: ArtifactKey) -> Iterator[None]:
    """The Prefect slot of the artifact, then (``key.lease``) its storage lease, for the body."""
    from prefect import get_run_logger

    from flows.artifacts import publish_requests
    from storage import retries
    from storage.lease import claim

    log, before, failed = get_run_logger().info, retries.snapshot(), True
    try:
        with artifact_slot(key.what, key.id, log=log):
            with claim(key.url, what=key.what, log=log) if key.lease else contextlib.nullcontext():
                yield
        failed = False
    finally:  # retried requests are shown, also (especially) when the stage failed after the client's retries
        publish_requests(key.what, key.id, retries.since(before), failed=failed)


def artifact_stage(key: Callable[..., ArtifactKey]) -> Callable[[Callable], Callable]:
    """Decorate a stage task body (under ``@task``, above ``@gpu_stage``) with the claims of the artifact that
    ``key(**arguments)`` names: the Prefect slot, then (``key.lease``) the storage lease."""

    def wrap(fn: Callable) -> Callable:
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            with artifact_claim(key(**bound.arguments)):
                return fn(*args, **kwargs)

        return guarded

    return wrap


# ------------------------------------------------------------------------------------------------ the stages' keys
def dataset_key(root: str, data: dict[str, Any], **_: Any) -> ArtifactKey:
    from storage.layout import Root

    return ArtifactKey("packed dataset", Root(root).dataset(data["name"]), data["name"])


def ae_run_key(root: str, chain_fingerprint: str, **_: Any) -> ArtifactKey:
    from dcae15.ae.recipe import phase_run_url

    return ArtifactKey("AE run", phase_run_url(root, chain_fingerprint), chain_fingerprint, lease=False)


def latent_store_key(root: str, ae: dict[str, Any], dataset: dict[str, Any], enc: dict[str, Any],
                     **_: Any) -> ArtifactKey:
    from dcae15.ae.encode import CROP
    from storage.latent_store import store_id
    from storage.layout import Root

    sid = store_id(str(dataset["fingerprint"]), ae["fingerprint"], enc["resolution"], CROP, enc["flip"])
    return ArtifactKey("latent store", Root(root).latent_store(sid), sid)


def diffusion_run_key(root: str, store: dict[str, Any], backbone: str, train: dict[str, Any], seed: int,
                      **_: Any) -> ArtifactKey:
    from dcae15.diffusion.train import DiffusionTrainConfig, run_id_for
    from storage.layout import Root

    run_id = run_id_for(DiffusionTrainConfig.from_dict({"model": backbone, "seed": seed, **train}), store["store_id"])
    return ArtifactKey("diffusion run", Root(root).diffusion_run(run_id), run_id, lease=False)


def sample_store_key(root: str, run: dict[str, Any], checkpoint: int, spec: dict[str, Any], **_: Any) -> ArtifactKey:
    from storage.fingerprint import short_id
    from storage.layout import Root

    sid = short_id(run["run_id"], checkpoint, spec)
    return ArtifactKey("sample store", Root(root).sample_store(sid), sid, lease=False)
