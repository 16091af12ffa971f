"""Operating the flows: DataLoader workers forked inside a flow run, artifacts and run names read back from the API,
the checkpoint event, the GPU work-pool template and the heartbeat automation files."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def small_store(tmp_path_factory) -> str:
    from tests.diffusion.conftest import make_latent_store

    return make_latent_store(str(tmp_path_factory.mktemp("ops") / "latents" / "store"), n=64, c=8, unit=16, flip=False)


def _wait_for(fetch, ok, timeout: float = 30.0):
    """Poll ``fetch()`` until ``ok(result)`` (Prefect records artifacts and events asynchronously)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        out = fetch()
        if ok(out) or time.monotonic() > deadline:
            return out
        time.sleep(0.5)


@pytest.mark.slow
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")  # the trainer's loader dies in __del__
def test_training_with_two_loader_workers_inside_a_flow_run(prefect_api, tmp_path, results_dir, tiny_config,
                                                            small_store):
    """DataLoader workers forked in a process that runs Prefect flows used to exit 1 with no traceback (Prefect's
    queue services' threading-atexit hooks failed in the child; see flows/forksafe.py). The same run is then read
    back through the Prefect client: its name, its artifacts and its checkpoint events."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.events.filters import EventFilter, EventNameFilter

    from dcae15.diffusion.train import latest_checkpoint
    from flows.artifacts import artifact_key
    from flows.diffusion import train_diffusion
    from flows.events import CHECKPOINT_SAVED

    cfg = tiny_config(tmp_path / "root", diffusion={"train": {"steps": 4, "checkpoint_every": 2, "num_workers": 2,
                                                               "log_every": 1}})
    state = train_diffusion.with_options(result_storage=results_dir)(
        store=small_store, backbone="DiT-tiny", root=str(tmp_path / "root"), config=cfg, return_state=True)
    out = state.result()
    assert out["step"] == 4 and latest_checkpoint(out["url"])[0] == 4

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
        assert run.name == "train DiT-tiny on store"
        keys = [artifact_key("train", out["run_id"]), artifact_key("progress-train", out["run_id"])]
        arts = _wait_for(lambda: client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys))),
                         lambda a: {x.key for x in a} == set(keys))
        by_type = {a.type: a for a in arts}
        assert out["url"] in by_type["markdown"].data and out["checkpoint"] in by_type["markdown"].data
        assert by_type["progress"].data == 100.0
        run_res = f"dcae15.run.{out['run_id']}"
        page = _wait_for(lambda: client.read_events(EventFilter(event=EventNameFilter(name=[CHECKPOINT_SAVED])),
                                                    limit=50),
                         lambda p: len([e for e in p.events if e.resource.id == run_res]) >= 2)
    events = sorted((e for e in page.events if e.resource.id == run_res), key=lambda e: int(e.resource["dcae15.step"]))
    assert [int(e.resource["dcae15.step"]) for e in events] == [2, 4]  # one event per committed checkpoint
    assert events[-1].resource["dcae15.checkpoint-url"] == out["checkpoint"]
    assert events[-1].payload["run_url"] == out["url"] and events[-1].payload["config"]["root"] == cfg["root"]


@pytest.mark.concurrency
def test_a_process_forked_inside_a_flow_run_exits_cleanly(prefect_api):
    """The root cause, without torch: a forked multiprocessing child of a Prefect client exited with status 1."""
    import multiprocessing

    from prefect import flow

    @flow(name="fork_a_child")
    def fork_a_child() -> int:
        child = multiprocessing.get_context("fork").Process(target=int)
        child.start()
        child.join(30)
        return child.exitcode

    assert fork_a_child() == 0


def _deploy_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "deploy" / "apply.py"
    spec = importlib.util.spec_from_file_location("dcae15_deploy_apply", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prefect_yaml_trigger_and_heartbeats_validate_with_prefects_schema():
    from pathlib import Path

    import yaml
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

    conf = yaml.safe_load((Path(__file__).resolve().parents[2] / "prefect.yaml").read_text())
    deps = {d["name"]: d for d in conf["deployments"]}
    (trigger,) = deps["evaluate-checkpoint"]["triggers"]
    t = DeploymentEventTrigger.model_validate({k: v for k, v in trigger.items() if k != "type"})
    assert t.expect == {"dcae15.checkpoint.saved"} and set(t.parameters) == {"run", "step", "root", "config"}
    assert deps["evaluate-new-checkpoints"]["schedules"][0]["cron"] == "0 * * * *"  # the sweep stays
    env = deps["train-diffusion"]["work_pool"]["job_variables"]["env"]
    assert 30 <= int(env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"]) < 90  # < the zombie automation's window
    assert "gpu" in deps["train-diffusion"]["tags"]


def test_gpu_pool_template_renders_for_a_training_job():
    """The Kubernetes template passes Prefect's work-pool validation and renders with Prefect's own templating."""
    from prefect.utilities.schema_tools import validate
    from prefect.utilities.templating import apply_values

    template = _deploy_module().load_gpu_pool_template()
    schema = template["variables"]
    values = {k: v["default"] for k, v in schema["properties"].items() if "default" in v}
    values.update(gpus=4, image="registry.lab/dcae15:1", name="train-dit-xl", command="prefect flow-run execute",
                  labels={"app": "dcae15"})
    validate(values, schema, raise_on_error=True)
    job = apply_values(template["job_configuration"], values)
    pod = job["job_manifest"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4 and container["image"] == "registry.lab/dcae15:1"
    assert job["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30" and "{{" not in str(job)
    with pytest.raises(Exception):
        validate({**values, "gpus": 0}, schema, raise_on_error=True)  # fewer than one GPU is refused


def test_apply_creates_automations_limits_and_pool_idempotently(prefect_api):
    from prefect.client.orchestration import get_client

    from flows.machine import gpu_limit_name, gpu_slot

    deploy = _deploy_module()
    automations = deploy.load_automations()
    assert [a.name for a in automations] == ["dcae15-crash-zombie-flow-runs"]
    assert automations[0].trigger.posture.value == "Proactive" and automations[0].actions[0].type == "change-flow-run-state"
    with get_client(sync_client=True) as client:
        try:
            for _ in range(2):  # re-applying replaces, never duplicates
                deploy.main(["--gpu-host", "testhost", "--gpu-pool", "dcae15-gpu-test"])
            assert len(client.read_automations_by_name("dcae15-crash-zombie-flow-runs")) == 1
            assert client.read_global_concurrency_limit_by_name(gpu_limit_name("testhost")).limit == 1
            pool = client.read_work_pool("dcae15-gpu-test")
            assert pool.type == "kubernetes" and "nvidia.com/gpu" in str(pool.base_job_template)

            # a GPU stage holds its machine's slot while it runs, and gives it back
            client.upsert_global_concurrency_limit_by_name(gpu_limit_name(), 1)
            with gpu_slot():
                assert client.read_global_concurrency_limit_by_name(gpu_limit_name()).active_slots == 1
            assert client.read_global_concurrency_limit_by_name(gpu_limit_name()).active_slots == 0
        finally:  # the session's other tests share this server
            for name in (gpu_limit_name("testhost"), gpu_limit_name()):
                client.delete_global_concurrency_limit_by_name(name)
            for a in client.read_automations_by_name("dcae15-crash-zombie-flow-runs"):
                client.delete_automation(a.id)


def test_cached_rerun_shortcut_revalidates_pointers_before_starting_prefect(tmp_path, monkeypatch):
    """An identical finished pipeline is answered from its recorded pointers; a missing output sends it through
    Prefect again (flows/rerun.py; bench/rerun.py measures the whole demo)."""
    import argparse

    from flows import rerun
    from flows.cli import _pipeline_or_shortcut

    monkeypatch.setattr(rerun, "shortcut_allowed", lambda: True)  # as without PREFECT_API_URL (this session has one)
    root = str(tmp_path / "root")
    fig = tmp_path / "root" / "eval" / "results.png"
    calls = []

    def fake_pipeline():  # stands in for the Prefect run: it publishes what it wrote
        calls.append(1)
        fig.parent.mkdir(parents=True, exist_ok=True)
        fig.write_bytes(b"png")
        rerun.record("figure", {"url": str(fig)})
        return {"figures": [str(fig)]}

    args = argparse.Namespace(backbones=None, through_prefect=False)
    config = {"root": root, "seed": 0}
    _pipeline_or_shortcut(args, root, config, fake_pipeline)
    out = _pipeline_or_shortcut(args, root, config, fake_pipeline)
    assert len(calls) == 1 and out["figures"] == [str(fig)]  # the rerun started nothing
    _pipeline_or_shortcut(argparse.Namespace(backbones=None, through_prefect=True), root, config, fake_pipeline)
    assert len(calls) == 2  # asked to go through Prefect
    _pipeline_or_shortcut(args, root, {**config, "seed": 1}, fake_pipeline)
    assert len(calls) == 3  # another config is another command
    fig.unlink()
    assert "figure missing" in rerun.check_record(root, rerun.record_key("pipeline", config, {"backbones": None}))
    _pipeline_or_shortcut(args, root, config, fake_pipeline)
    assert len(calls) == 4 and fig.exists()  # a missing output: through Prefect again


def test_rerun_record_stamps_the_autoencoder_files_instead_of_loading_it(tmp_path, monkeypatch):
    from flows import rerun

    model = tmp_path / "runs" / "ae" / "abc" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "weights.safetensors").write_bytes(b"w" * 10)
    rerun.reset()
    rerun.record("autoencoder", {"url": str(model), "fingerprint": "f"})
    rerun.save_record(str(tmp_path), "k")
    assert rerun.check_record(str(tmp_path), "k") is None  # no diffusers import, no model load
    (model / "weights.safetensors").write_bytes(b"w" * 11)
    assert rerun.check_record(str(tmp_path), "k") == "autoencoder: files changed or missing"
    rerun.reset()


def test_an_evaluation_appended_twice_is_one_row(tmp_path):
    """Event-triggered evaluation and the sweep racing on one checkpoint write the same part file."""
    from dcae15.metrics.results import append_results, read_results

    table = str(tmp_path / "results")
    row = {"run_id": "DiT-tiny-x", "step": 5, "samples_url": "s", "feature_extractor": "proxy-a", "proxy-fid": 1.0}
    for _ in range(2):
        append_results(table, [row], part_id="key-1")
    assert len(read_results(table)) == 1
    append_results(table, [{**row, "step": 10}])  # default names still never collide
    assert len(read_results(table)) == 2
    with pytest.raises(ValueError, match="part_id"):
        append_results(table, [row], part_id="../escape")
