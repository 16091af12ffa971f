"""The pipeline's configuration: one YAML file with a section per stage, loaded into small validated dataclasses."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "CONFIG_DIR",
    "PRESET_CONFIGS",
    "DataSection",
    "AESection",
    "EncodeSection",
    "DiffusionSection",
    "SampleSection",
    "EvalSection",
    "PipelineConfig",
    "load_config",
    "resolve_config_path",
]

# configs/ ships next to the package in a source checkout; the demo config is also embedded below as a fallback
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
PRESET_CONFIGS = ("demo", "tiny")


@dataclass(kw_only=True)
class DataSection:
    """Where the images come from."""

    name: str = "shapes"
    """Dataset name: packed to ``<root>/data/<name>/``."""
    source: str | None = None
    """URL of a class-folder tree to pack; None = generate the shapes dataset (``synthetic``)."""
    synthetic: dict[str, Any] = field(default_factory=lambda: {"num_classes": 8, "per_class": 64, "size": 32, "seed": 0})
    """Keyword arguments of ``storage.synthetic.make_shapes_dataset`` (used when ``source`` is None)."""
    shard_bytes: int = 64 * 2**20
    """Target webdataset shard size."""
    workers: int = 1
    """Packing processes (a Dask LocalCluster when > 1; 1 packs inline). ImageNet: one per core."""
    scheduler: str | None = None
    """Dask scheduler address to pack on a running cluster instead (``workers`` is then ignored)."""
    read_threads: int = 16
    """Concurrent image reads per packing process (hides S3 latency; harmless on local disk)."""

    def __post_init__(self) -> None:
        if self.workers < 1 or self.read_threads < 1:
            raise ValueError(f"data.workers and data.read_threads must be >= 1, got {self.workers}, {self.read_threads}")
        if not self.name or "/" in self.name:
            raise ValueError(f"data.name must be a non-empty name without '/', got {self.name!r}")
        allowed = {"num_classes", "per_class", "size", "seed", "fmt", "texture", "noise", "scale", "background",
                   "jitter"}
        if self.source is None and set(self.synthetic) - allowed:
            raise ValueError(f"data.synthetic has unknown keys {sorted(set(self.synthetic) - allowed)}; allowed: {sorted(allowed)}")


@dataclass(kw_only=True)
class AESection:
    """The autoencoder: a preset trained on the data, or a pretrained one."""

    preset: str = "tiny-f8c32"
    """A name from ``dcae15.ae.model.AE_PRESETS``."""
    pretrained: str | None = None
    """URL of a ``save_pretrained`` directory; skips training when set."""
    train: dict[str, Any] = field(default_factory=dict)
    """Fields of ``dcae15.ae.train.AETrainConfig`` (the preset is filled in): the one phase of a single-phase config
    (the demo), or, with ``phases``, fields shared by every phase (a phase's own value wins)."""
    phases: list[dict[str, Any]] | str | None = None
    """The recipe: a list of phases (``AETrainConfig`` fields each, plus an optional ``name``), each started from
    the previous phase's model; ``"paper"`` = ``dcae15.ae.recipe.PAPER_PHASES``. None: ``train`` as one phase,
    or the paper's three phases for real data (``data.source`` set) when ``train`` is empty too."""
    nproc_per_node: int = 1
    """> 1 trains each phase under ``torchrun --nproc_per_node N`` (DDP); 1 trains in the flow's own process."""
    nnodes: int = 1
    torchrun_args: list[str] = field(default_factory=list)
    """Extra torchrun arguments passed through (``--rdzv-endpoint``, ``--node-rank``, ...)."""
    launcher: str = "auto"
    """``auto`` (in-process for one process), ``inprocess`` or ``torchrun``."""

    def __post_init__(self) -> None:
        if isinstance(self.phases, str) and self.phases != "paper":
            raise ValueError(f"autoencoder.phases must be 'paper' or a list of phase configs, got {self.phases!r}")
        if self.nproc_per_node < 1 or self.nnodes < 1:
            raise ValueError(f"autoencoder.nproc_per_node and nnodes must be >= 1, got {self.nproc_per_node}, {self.nnodes}")
        if self.launcher not in ("auto", "inprocess", "torchrun"):
            raise ValueError(f"autoencoder.launcher must be one of auto, inprocess, torchrun; got {self.launcher!r}")
        if self.launcher == "inprocess" and self.nproc_per_node * self.nnodes > 1:
            raise ValueError("autoencoder.launcher 'inprocess' needs nproc_per_node = nnodes = 1; use 'torchrun'")


@dataclass(kw_only=True)
class EncodeSection:
    """Encoding the dataset into a latent store with Dask."""

    resolution: int = 32
    flip: bool = True
    batch_size: int = 128
    """Images per forward (x2 with flips): sized for a 256 px f32 AE on one GPU; the demo sets its own."""
    chunk_size: int | None = None
    """Samples per store unit (one Zarr shard, one writer); None = the store's default (~16 MB of latents per unit:
    1024 rows of 128x8x8 fp16 at ImageNet size, 1252 units)."""
    scheduler: str | None = None
    """Dask scheduler address (``tcp://host:8786``); None = start a LocalCluster."""
    workers: int = 2
    """LocalCluster worker processes (ignored with ``scheduler``)."""
    processes: bool = True
    """LocalCluster with processes (True) or threads (False)."""
    units_per_task: int = 1
    """Store units (Zarr shards) per Dask task; one writer per unit always."""
    device: str = "cpu"
    """``cpu``, ``cuda`` (one pinned worker per visible GPU; ``workers`` is then ignored) or ``auto``."""
    dtype: str = "auto"
    """Encoder compute dtype: ``auto`` (bfloat16 autocast on CUDA, float32 on CPU), ``float32`` or ``bfloat16``;
    recorded in the store (latents are stored as float16 either way)."""
    decode_threads: int = 2
    """CPU threads per worker reading + decoding + cropping batches ahead of the forward pass (ImageNet: 4 per GPU)."""
    prefetch_batches: int = 4
    """Batches decoded ahead of the forward pass, per worker."""

    def __post_init__(self) -> None:
        for name in ("resolution", "batch_size", "workers", "units_per_task"):
            if getattr(self, name) < 1:
                raise ValueError(f"encode.{name} must be >= 1, got {getattr(self, name)}")
        if self.decode_threads < 0 or self.prefetch_batches < 0:
            raise ValueError(f"encode.decode_threads and encode.prefetch_batches must be >= 0, got "
                             f"{self.decode_threads}, {self.prefetch_batches}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"encode.dtype={self.dtype!r}; allowed: auto, float32, bfloat16")
        if self.device not in ("cpu", "cuda", "auto") and not self.device.startswith("cuda:"):
            raise ValueError(f"encode.device={self.device!r}; allowed: cpu, cuda, cuda:N, auto")


@dataclass(kw_only=True)
class DiffusionSection:
    """Diffusion backbones trained on the one latent store."""

    backbones: list[str] = field(default_factory=lambda: ["DiT-tiny", "USiT-tiny"])
    """Names from ``dcae15.models`` presets; each gets its own run on the same store."""
    train: dict[str, Any] = field(default_factory=dict)
    """Fields of ``dcae15.diffusion.train.DiffusionTrainConfig`` shared by all backbones (model is filled in)."""
    nproc_per_node: int = 1
    """> 1 launches ``torchrun --nproc_per_node N``; 1 trains in the flow's own process."""
    nnodes: int = 1
    torchrun_args: list[str] = field(default_factory=list)
    """Extra torchrun arguments passed through (``--rdzv-endpoint``, ``--node-rank``, ...)."""
    launcher: str = "auto"
    """``auto`` (in-process for one process), ``inprocess`` or ``torchrun``."""
    retries: int = 0
    """Task retries for training; a retry resumes from the last checkpoint."""

    def __post_init__(self) -> None:
        if not self.backbones:
            raise ValueError("diffusion.backbones must name at least one backbone preset")
        if self.nproc_per_node < 1 or self.nnodes < 1:
            raise ValueError(f"diffusion.nproc_per_node and nnodes must be >= 1, got {self.nproc_per_node}, {self.nnodes}")
        if self.launcher not in ("auto", "inprocess", "torchrun"):
            raise ValueError(f"diffusion.launcher must be one of auto, inprocess, torchrun; got {self.launcher!r}")
        if self.launcher == "inprocess" and self.nproc_per_node * self.nnodes > 1:
            raise ValueError("diffusion.launcher 'inprocess' needs nproc_per_node = nnodes = 1; use 'torchrun'")


@dataclass(kw_only=True)
class SampleSection:
    """Sampling from each trained backbone (arguments of ``dcae15.diffusion.sample.sample_to_store``)."""

    num_samples: int = 512
    sampler: str | None = None
    """None = the backbone's default (DDPM for epsilon models, Euler/Heun for flow models)."""
    steps: int = 50
    cfg_scale: float = 1.5
    seed: int = 0
    batch_size: int = 64
    chunk_size: int = 256
    """Images per sample-store unit: the granularity at which a killed sampling job resumes."""
    precision: str = "auto"
    """Backbone + decoder autocast: ``auto`` (bf16 on a GPU, fp32 on CPU), ``bf16`` or ``fp32``. Sampling runs
    on as many processes as training (``diffusion.nproc_per_node`` / ``nnodes`` / ``launcher``)."""

    def __post_init__(self) -> None:
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"sample.precision must be one of auto, bf16, fp32; got {self.precision!r}")
        if self.num_samples < 1 or self.steps < 1 or self.batch_size < 1 or self.chunk_size < 1:
            raise ValueError(f"sample.num_samples, steps, batch_size, chunk_size must be >= 1, got {self.num_samples}, "
                             f"{self.steps}, {self.batch_size}, {self.chunk_size}")


@dataclass(kw_only=True)
class EvalSection:
    """Scoring samples against the real data."""

    extractor: str = "auto"
    """``inception`` (the standard numbers; needs its local weights), ``proxy`` (a small classifier trained on the
    demo data; numbers labelled proxy-*), or ``auto``: inception for real data (``data.source`` set), proxy for
    the generated demo dataset."""
    options: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments of the metrics package (e.g. the proxy's training steps, Inception weights path)."""
    reconstruction: bool = True
    """Also score the autoencoder's reconstructions per c' (rFID / PSNR / SSIM / LPIPS) and draw its figures."""
    checkpoints: str = "all"
    """Which checkpoints of each run the pipeline samples and scores: ``all`` it keeps (``diffusion.train.
    keep_checkpoints``), so the results plot shows curves, or only the ``latest``."""

    def __post_init__(self) -> None:
        if self.extractor not in ("auto", "proxy", "inception"):
            raise ValueError(f"evaluate.extractor must be 'auto', 'proxy' or 'inception', got {self.extractor!r}")
        if self.checkpoints not in ("all", "latest"):
            raise ValueError(f"evaluate.checkpoints must be 'all' or 'latest', got {self.checkpoints!r}")


@dataclass(kw_only=True)
class PipelineConfig:
    """Everything a pipeline run needs; each section feeds one stage."""

    root: str = "./demo_out"
    """Object-storage root URL (local directory, ``s3://bucket/prefix``, ``memory://``)."""
    seed: int = 0
    data: DataSection = field(default_factory=DataSection)
    autoencoder: AESection = field(default_factory=AESection)
    encode: EncodeSection = field(default_factory=EncodeSection)
    diffusion: DiffusionSection = field(default_factory=DiffusionSection)
    sample: SampleSection = field(default_factory=SampleSection)
    evaluate: EvalSection = field(default_factory=EvalSection)

    def __post_init__(self) -> None:
        if self.evaluate.extractor == "auto":  # real data gets the standard extractor; the demo keeps its proxy
            self.evaluate.extractor = "inception" if self.data.source is not None else "proxy"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS = {
    "data": DataSection,
    "autoencoder": AESection,
    "encode": EncodeSection,
    "diffusion": DiffusionSection,
    "sample": SampleSection,
    "evaluate": EvalSection,
}


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def resolve_config_path(config: str | None) -> Path | None:
    """A preset name (``demo``, ``tiny``) or a path to a YAML file; None = the built-in defaults."""
    if config is None:
        return None
    if config in PRESET_CONFIGS:
        path = CONFIG_DIR / f"{config}.yaml"
        if not path.is_file():
            raise ValueError(f"config preset {config!r} expects {path}, which does not exist (run from a source checkout)")
        return path
    path = Path(config).expanduser()
    if not path.is_file():
        raise ValueError(f"config {config!r} is neither a preset ({', '.join(PRESET_CONFIGS)}) nor an existing YAML file")
    return path


def load_config(config: str | dict[str, Any] | None = None, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Build a :class:`PipelineConfig` from a preset name / YAML path / dict, then apply nested ``overrides``.

    Raises:
        ValueError: unknown sections or fields, or invalid values, naming the field.
    """
    if isinstance(config, dict):
        raw = copy.deepcopy(config)
    else:
        path = resolve_config_path(config)
        raw = yaml.safe_load(path.read_text()) if path else {}
        raw = raw or {}
    raw = _deep_merge(raw, overrides or {})
    unknown = set(raw) - set(_SECTIONS) - {"root", "seed"}
    if unknown:
        raise ValueError(f"unknown config sections {sorted(unknown)}; allowed: root, seed, {', '.join(_SECTIONS)}")
    kwargs: dict[str, Any] = {k: raw[k] for k in ("root", "seed") if k in raw}
    for name, cls in _SECTIONS.items():
        section = raw.get(name) or {}
        names = {f.name for f in dataclasses.fields(cls)}
        bad = set(section) - names
        if bad:
            raise ValueError(f"unknown fields {sorted(bad)} in config section {name!r}; allowed: {sorted(names)}")
        kwargs[name] = cls(**section)
    return PipelineConfig(**kwargs)
