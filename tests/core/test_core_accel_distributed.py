"""Process-group plans (the CUDA answers, computed on CPU), timeouts, the speed switches, the GPU-branch switch."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch

from dcae15.accel import GPU_BRANCHES_ENV, bf16_autocast, enable_speed_switches, gpu_branches
from dcae15.distributed import IO_TIMEOUT_ENV, PG_TIMEOUT_ENV, GroupPlan, group_timeout, plan_process_group


def test_plan_on_gpus_under_torchrun():
    env = {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1"}
    plan = plan_process_group(env, cuda_devices=8)
    assert plan == GroupPlan("cpu:gloo,cuda:nccl", "cuda:1", 9, 16, True)
    assert plan.device_id == torch.device("cuda", 1)  # set_device + init_process_group(device_id=...)


def test_plan_one_gpu_process_gets_both_backends():
    # an in-process run whose tensors live on the GPU: NCCL for them, gloo for CPU objects
    plan = plan_process_group({}, cuda_devices=1)
    assert (plan.backend, plan.device, plan.rank, plan.world_size, plan.torchrun) == (
        "cpu:gloo,cuda:nccl", "cuda:0", 0, 1, False)


def test_plan_cpu():
    assert plan_process_group({"RANK": "1", "WORLD_SIZE": "2"}, 0) == GroupPlan("gloo", "cpu", 1, 2, True)
    assert plan_process_group({}, 4, use_cuda=False).device_id is None
    assert plan_process_group({"RANK": "3", "WORLD_SIZE": "4"}, 2).device == "cuda:1"  # no LOCAL_RANK: rank % GPUs


def test_plan_errors_say_what_to_do():
    with pytest.raises(ValueError, match="nproc_per_node"):
        plan_process_group({"RANK": "0", "WORLD_SIZE": "8", "LOCAL_RANK": "5"}, cuda_devices=4)
    with pytest.raises(ValueError, match="integers"):
        plan_process_group({"RANK": "x", "WORLD_SIZE": "2"}, 0)
    with pytest.raises(ValueError, match="RANK=2"):
        plan_process_group({"RANK": "2", "WORLD_SIZE": "2"}, 0)


def test_timeouts():
    assert group_timeout(PG_TIMEOUT_ENV, {}) == timedelta(minutes=30)  # > NCCL's 10 min default
    assert group_timeout(IO_TIMEOUT_ENV, {}) == timedelta(hours=2)
    assert group_timeout(IO_TIMEOUT_ENV, {IO_TIMEOUT_ENV: "90"}) == timedelta(seconds=90)
    with pytest.raises(ValueError, match=PG_TIMEOUT_ENV):
        group_timeout(PG_TIMEOUT_ENV, {PG_TIMEOUT_ENV: "soon"})


def test_speed_switches_set_the_cuda_flags():
    m, c, bench = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision,
                   torch.backends.cudnn.benchmark)
    try:
        enable_speed_switches("cpu", conv=True)
        assert torch.backends.cudnn.benchmark == bench  # nothing on CPU
        enable_speed_switches("cuda", conv=True)  # flags only: the lines a GPU run executes
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        assert torch.backends.cudnn.conv.fp32_precision == "tf32" and torch.backends.cudnn.benchmark
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = m, c
        torch.backends.cudnn.benchmark = bench


def test_gpu_branch_switch(monkeypatch):
    monkeypatch.delenv(GPU_BRANCHES_ENV, raising=False)
    assert gpu_branches("cuda:3") and not gpu_branches("cpu")
    with bf16_autocast("cpu", "auto"):
        assert not torch.is_autocast_enabled("cpu")
    monkeypatch.setenv(GPU_BRANCHES_ENV, "1")
    assert gpu_branches("cpu")
    with bf16_autocast("cpu", "auto"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with bf16_autocast("cpu", "fp32"):
        assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(ValueError, match="allowed"):
        bf16_autocast("cpu", "fp16")


def test_ae_loader_workers_default(monkeypatch):
    from dcae15.ae.train import AETrainConfig, loader_workers

    monkeypatch.delenv(GPU_BRANCHES_ENV, raising=False)
    cfg = AETrainConfig(perceptual="none")
    assert cfg.num_workers is None and loader_workers(cfg, torch.device("cpu")) == 0
    monkeypatch.setattr("os.cpu_count", lambda: 64)
    assert loader_workers(cfg, torch.device("cuda", 0), local_world=8) == 8
    assert loader_workers(cfg, torch.device("cuda", 0), local_world=32) == 2
    assert loader_workers(AETrainConfig(perceptual="none", num_workers=0), torch.device("cuda", 0)) == 0
    monkeypatch.setenv(GPU_BRANCHES_ENV, "1")
    assert loader_workers(cfg, torch.device("cpu")) == 8


def test_init_distributed_sets_the_device_before_the_group(monkeypatch):
    """The CUDA lines of init_distributed, run on CPU with CUDA's answers faked: set_device first, then the
    two-backend group bound to that GPU with the long timeout."""
    import torch.distributed as dist

    import dcae15.distributed as d

    calls = []

    class Stop(Exception):
        pass

    def fake_init(**kw):
        calls.append(("init", kw))
        raise Stop

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "set_device", lambda dev: calls.append(("set_device", torch.device(dev))))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", fake_init)
    for k, v in {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", PG_TIMEOUT_ENV: "3600"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(Stop):
        d.init_distributed()
    assert [c[0] for c in calls] == ["set_device", "init"] and calls[0][1] == torch.device("cuda", 3)
    kw = calls[1][1]
    assert kw == {"backend": "cpu:gloo,cuda:nccl", "timeout": timedelta(hours=1), "device_id": torch.device("cuda", 3)}
    calls.clear()
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k)
    with pytest.raises(Stop):  # one in-process GPU run: the same two backends, an in-memory store
        d.init_distributed()
    kw = calls[1][1]
    assert kw["backend"] == "cpu:gloo,cuda:nccl" and (kw["rank"], kw["world_size"]) == (0, 1) and "store" in kw


def test_tf32_through_one_api_every_getter_still_answers():
    """``enable_speed_switches`` for CUDA (it only sets flags, so a CPU runs it): the legacy getters that inductor
    reads while it compiles must answer after it (setting the new ``fp32_precision`` API makes them raise)."""
    import torch

    from dcae15.accel import enable_speed_switches

    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark
    try:
        enable_speed_switches("cuda", conv=True)
        assert torch.get_float32_matmul_precision() == "high"
        assert torch.backends.cuda.matmul.allow_tf32 is True
        assert torch.backends.cudnn.allow_tf32 is True  # cuDNN left at its default
        assert torch.backends.cudnn.benchmark is True
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"  # the new getters agree
        assert torch.backends.cudnn.conv.fp32_precision == "tf32"
        enable_speed_switches("cpu")  # no-op elsewhere
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.benchmark = saved[1]
