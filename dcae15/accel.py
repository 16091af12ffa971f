"""Device-dependent decisions in one place: the GPU branches (and the switch that makes a CPU take them), bf16
autocast, TF32 and cuDNN autotuning.

``DCAE15_GPU_BRANCHES=1`` makes a CPU process take every branch a GPU process takes: the bf16 FSDP2
``MixedPrecisionPolicy`` (bf16 parameters, fp32 reduction), bf16 autocast where precision is 'auto' (sampling,
the AE trainer), activation checkpointing and ``torch.compile`` of every block in the diffusion trainer, and the
AE trainer's DataLoader workers. It exists for tests and ``bench/gpu_check.py --cpu-smoke``: bf16 on a CPU is slow,
and inductor compiles C++ there, so use tiny models.
"""

from __future__ import annotations

import contextlib
import os

import torch

__all__ = ["GPU_BRANCHES_ENV", "COMPILE_BACKEND_ENV", "gpu_branches", "forced_gpu_branches", "compile_backend",
           "bf16_autocast", "enable_speed_switches", "BF16_DENSE_PEAK", "dense_bf16_peak_flops"]

GPU_BRANCHES_ENV = "DCAE15_GPU_BRANCHES"
COMPILE_BACKEND_ENV = "DCAE15_COMPILE_BACKEND"


def forced_gpu_branches() -> bool:
    """True when ``DCAE15_GPU_BRANCHES`` is set to 1/true/yes (the CPU takes the GPU branches)."""
    v = os.environ.get(GPU_BRANCHES_ENV, "").strip().lower()
    if v in ("", "0", "false", "no"):
        return False
    if v in ("1", "true", "yes"):
        return True
    raise ValueError(f"{GPU_BRANCHES_ENV}={v!r}; allowed: 1/true/yes or 0/false/no (unset = off)")


def gpu_branches(device: torch.device | str) -> bool:
    """Whether code running on ``device`` takes the GPU branches: on CUDA, or anywhere under the switch."""
    return torch.device(device).type == "cuda" or forced_gpu_branches()


def compile_backend() -> str:
    """The ``torch.compile`` backend: 'inductor' unless ``DCAE15_COMPILE_BACKEND`` names another (e.g. 'aot_eager'
    traces the same graphs, checkpointing included, without generating code: for quick CPU checks)."""
    return os.environ.get(COMPILE_BACKEND_ENV, "").strip() or "inductor"


def bf16_autocast(device: torch.device | str, precision: str = "auto"):
    """bf16 autocast context for ``precision`` 'bf16', or 'auto' where the GPU branches are taken; else a no-op.

    Raises:
        ValueError: ``precision`` not in ('auto', 'bf16', 'fp32').
    """
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision={precision!r}; allowed: ('auto', 'bf16', 'fp32')")
    device = torch.device(device)
    if precision == "bf16" or (precision == "auto" and gpu_branches(device)):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def enable_speed_switches(device: torch.device | str, *, conv: bool = False) -> None:
    """On CUDA: TF32 for the fp32 matmuls that remain (bf16 paths are unaffected; TF32 keeps fp32's range with a
    10-bit mantissa, what every DiT/ADM recipe trains with), and with ``conv`` cuDNN autotuning
    (``cudnn.benchmark``: the conv-only AE sees a few fixed shapes, so the search pays once). No-op elsewhere.
    Process-wide, idempotent.

    TF32 goes through one API only, ``torch.set_float32_matmul_precision('high')``: since torch 2.9 setting the
    new ``fp32_precision`` attributes makes the legacy getters (``allow_tf32``,
    ``get_float32_matmul_precision``) raise "mix of the legacy and new APIs", and inductor reads those getters
    while it compiles for CUDA. cuDNN convolutions keep their default (TF32 allowed).
    """
    if torch.device(device).type != "cuda":
        return
    torch.set_float32_matmul_precision("high")
    if conv:
        torch.backends.cudnn.benchmark = True


#: Dense bf16 tensor-core peaks (datasheet, no sparsity), FLOP/s, by a substring of the device name.
BF16_DENSE_PEAK = (("H100", 989e12), ("H200", 989e12), ("A100", 312e12))


def dense_bf16_peak_flops(device: torch.device | str) -> float | None:
    """The datasheet dense bf16 peak of ``device`` (MFU's denominator), None when unknown (CPU, other GPUs)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_DENSE_PEAK if key in name), None)
