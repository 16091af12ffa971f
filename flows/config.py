"""The pipeline's configuration: one YAML file with a section per stage, loaded into typed dataclasses.

The sections embed the library's own config classes (``autoencoder.phases``: ``AETrainConfig``; ``diffusion.train``:
``DiffusionTrainConfig``; ``evaluate.options``: ``ProxyConfig``, ``ReconEvalConfig``), built with
``dcae15.typed_config.from_dict``: an unknown key, a value of the wrong type or out of range is refused by
:func:`load_config` with its dotted path and the allowed values, before any Prefect run starts.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from dcae15.ae.recon_eval import ReconEvalConfig
from dcae15.ae.train import AETrainConfig
from dcae15.diffusion.train import DiffusionTrainConfig
from dcae15.metrics.proxy import ProxyConfig
from dcae15.tracking import TrackingConfig
from dcae15.typed_config import above, at_least, check_declared, check_fields, check_kwargs, from_dict, one_of
from flows.config_files import CONFIG_DIR, preset_names, read_raw_config, resolve_config_path

__all__ = [
    "CONFIG_DIR",
    "preset_names",
    "DataSection",
    "AESection",
    "EncodeSection",
    "DiffusionSection",
    "SampleSection",
    "EvalOptions",
    "EvalSection",
    "PipelineConfig",
    "load_config",
    "read_raw_config",
    "resolve_config_path",
]


def _synthetic_kwargs(data: dict[str, Any], path: str) -> dict[str, Any]:
    """``data.synthetic`` checked as keyword arguments of ``storage.synthetic.make_shapes_dataset``."""
    from storage.synthetic import make_shapes_dataset

    return check_kwargs(make_shapes_dataset, data, path, exclude=("root", "storage_options"))


@dataclass(kw_only=True)
class DataSection:
    """Where the images come from."""

    name: str = "shapes"
    """Dataset name: packed to ``<root>/data/<name>/``."""
    source: str | None = None
    """URL of a class-folder tree to pack; None = generate the shapes dataset (``synthetic``)."""
    synthetic: dict[str, Any] = field(default_factory=lambda: {"num_classes": 8, "per_class": 64, "seed": 0})
    """Keyword arguments of ``storage.synthetic.make_shapes_dataset`` (used when ``source`` is None); ``size``
    defaults to the pipeline's ``resolution``."""
    shard_bytes: int = 64 * 2**20
    """Target webdataset shard size."""
    workers: int = field(default=1, metadata=at_least(1))
    """Packing processes (a Dask LocalCluster when > 1; 1 packs inline). ImageNet: one per core."""
    scheduler: str | None = None
    """Dask scheduler address to pack on a running cluster instead (``workers`` is then ignored)."""
    read_threads: int = field(default=16, metadata=at_least(1))
    """Concurrent image reads per packing process (hides S3 latency; harmless on local disk)."""
    class_names: str | None = None
    """A ``LOC_synset_mapping.txt``-style file (``<wnid> <name>, <synonym>, ...`` per line) whose names label the
    sample grid's rows; None: the rows show the class folder names (wnids). Output only: no id depends on it."""

    def __post_init__(self) -> None:
        check_declared(self)
        if not self.name or "/" in self.name:
            raise ValueError(f"data.name must be a non-empty name without '/', got {self.name!r}")
        if self.source is None:
            self.synthetic = _synthetic_kwargs(self.synthetic, "data.synthetic")


@dataclass(kw_only=True)
class LaunchFields:
    """How a stage's job runs: in the flow's own process, or under ``torchrun`` on several processes / nodes."""

    nproc_per_node: int = 1
    """> 1 launches ``torchrun --nproc_per_node N`` (DDP / FSDP); 1 runs in the flow's own process."""
    nnodes: int = 1
    torchrun_args: list[str] = field(default_factory=list)
    """Extra torchrun arguments passed through (``--rdzv-endpoint``, ``--node-rank``, ...)."""
    launcher: str = "auto"
    """``auto`` (in-process for one process), ``inprocess`` or ``torchrun``."""
    node_launcher: str = "self"
    """With ``nnodes`` > 1, who starts each node's ``torchrun`` (c10d rendezvous, see ``flows.launch``): ``srun``
    (from inside a SLURM allocation: deploy/sbatch-pipeline.sh), ``local`` (all nodes on this machine, on loopback:
    tests and rehearsals) or ``self`` (this flow run is one node; every node's run names the same
    ``rdzv_endpoint``)."""
    rdzv_endpoint: str | None = None
    """``HOST:PORT`` of the c10d rendezvous; None = this host:29500 (srun) or a free loopback port (local)."""

    def check_launch(self, section: str) -> None:
        if self.nproc_per_node < 1 or self.nnodes < 1:
            raise ValueError(f"{section}.nproc_per_node and nnodes must be >= 1, got {self.nproc_per_node}, {self.nnodes}")
        if self.launcher not in ("auto", "inprocess", "torchrun"):
            raise ValueError(f"{section}.launcher must be one of auto, inprocess, torchrun; got {self.launcher!r}")
        from flows.launch import NODE_LAUNCHERS

        if self.node_launcher not in NODE_LAUNCHERS:
            raise ValueError(f"{section}.node_launcher must be one of {', '.join(NODE_LAUNCHERS)}; got {self.node_launcher!r}")
        if self.launcher == "inprocess" and self.nproc_per_node * self.nnodes > 1:
            raise ValueError(f"{section}.launcher 'inprocess' needs nproc_per_node = nnodes = 1; use 'torchrun'")

    def launch(self) -> dict[str, Any]:
        """The plain dict a stage task takes (not part of its cache key): see :func:`flows.launch.in_process`."""
        return {"launcher": self.launcher, "nproc_per_node": self.nproc_per_node, "nnodes": self.nnodes,
                "torchrun_args": list(self.torchrun_args), "node_launcher": self.node_launcher,
                "rdzv_endpoint": self.rdzv_endpoint}


@dataclass(kw_only=True)
class AESection(LaunchFields):
    """The autoencoder: a preset trained on the data, or a pretrained one."""

    preset: str = "tiny-f8c32"
    """A name from ``dcae15.ae.model.AE_PRESETS``."""
    pretrained: str | None = None
    """URL of a ``save_pretrained`` directory; skips training when set."""
    train: dict[str, Any] = field(default_factory=dict)
    """Fields of ``dcae15.ae.train.AETrainConfig`` (the preset, seed and resolution are filled in): the one phase of
    a single-phase config (the demo), or, with ``phases``, fields shared by every phase (a phase's own value
    wins). Checked field by field when loaded."""
    phases: list[dict[str, Any]] | list[AETrainConfig] | str | None = None
    """The recipe: a list of phases (``AETrainConfig`` fields each, plus an optional ``name``), each started from
    the previous phase's model; ``"paper"`` = ``dcae15.ae.recipe.PAPER_PHASES``. None: ``train`` as one phase,
    or the paper's three phases for real data (``data.source`` set) when ``train`` is empty too.
    :func:`load_config` resolves it into the list of validated ``AETrainConfig`` phases the flow trains."""

    def __post_init__(self) -> None:
        self.train = check_fields(AETrainConfig, self.train, "autoencoder.train")
        if isinstance(self.phases, list):
            self.phases = [p if isinstance(p, AETrainConfig) else check_fields(AETrainConfig, p, f"autoencoder.phases[{i}]")
                           for i, p in enumerate(self.phases)]
        if isinstance(self.phases, str) and self.phases != "paper":
            raise ValueError(f"autoencoder.phases must be 'paper' or a list of phase configs, got {self.phases!r}")
        self.check_launch("autoencoder")


@dataclass(kw_only=True)
class EncodeSection:
    """Encoding the dataset into a latent store with Dask."""

    flip: bool = True
    batch_size: int = field(default=128, metadata=at_least(1))
    """Images per forward (x2 with flips): sized for a 256 px f32 AE on one GPU; the demo sets its own."""
    chunk_size: int | None = None
    """Samples per store unit (one Zarr shard, one writer); None = the store's default (~16 MB of latents per unit:
    1024 rows of 128x8x8 fp16 at ImageNet size, 1252 units)."""
    scheduler: str | None = None
    """Dask scheduler address (``tcp://host:8786``); None = start a LocalCluster."""
    workers: int = field(default=2, metadata=at_least(1))
    """LocalCluster worker processes (ignored with ``scheduler``)."""
    processes: bool = True
    """LocalCluster with processes (True) or threads (False)."""
    units_per_task: int = field(default=1, metadata=at_least(1))
    """Store units (Zarr shards) per Dask task; one writer per unit always."""
    device: str = "cpu"
    """``cpu``, ``cuda`` (one pinned worker per visible GPU; ``workers`` is then ignored) or ``auto``."""
    dtype: str = field(default="auto", metadata=one_of("auto", "float32", "bfloat16"))
    """Encoder compute dtype: ``auto`` (bfloat16 autocast on CUDA, float32 on CPU), ``float32`` or ``bfloat16``;
    recorded in the store (latents are stored as float16 either way)."""
    decode_threads: int = field(default=2, metadata=at_least(0))
    """CPU threads per worker reading + decoding + cropping batches ahead of the forward pass (ImageNet: 4 per GPU)."""
    prefetch_batches: int = field(default=4, metadata=at_least(0))
    """Batches decoded ahead of the forward pass, per worker."""

    def __post_init__(self) -> None:
        check_declared(self)
        if self.device not in ("cpu", "cuda", "auto") and not self.device.startswith("cuda:"):
            raise ValueError(f"encode.device={self.device!r}; allowed: cpu, cuda, cuda:N, auto")


@dataclass(kw_only=True)
class DiffusionSection(LaunchFields):
    """Diffusion backbones trained on the one latent store."""

    backbones: list[str] = field(default_factory=lambda: ["DiT-tiny", "USiT-tiny"])
    """Names from ``dcae15.models`` presets, or import paths ``package.module:factory`` of your own backbones
    (docs/backbones.md; they need ``train.objective``); each gets its own run on the same store."""
    train: DiffusionTrainConfig = field(default_factory=DiffusionTrainConfig)
    """The training config shared by all backbones: ``model`` is replaced by each name of ``backbones``; ``seed``
    defaults to the pipeline's."""
    retries: int = 0
    """Task retries for training; a retry resumes from the last checkpoint."""
    concurrency: int = field(default=1, metadata=at_least(0))
    """Backbones the pipeline trains at the same time, each under torchrun in its own job slot: an equal, disjoint
    share of this machine's cores (CPU affinity) and GPUs (``CUDA_VISIBLE_DEVICES``; 2 on an 8-GPU node = 4 GPUs
    per backbone), see flows/machine.py. 1 = one after the other as ``nproc_per_node`` / ``launcher`` say; 0 = as
    many as the machine holds (``flows.machine.auto_concurrency``: GPUs in equal shares, else a core each). Whenever
    training runs in other processes, the pipeline samples and scores each checkpoint as it is committed."""
    poll_seconds: float = field(default=5.0, metadata=above(0))
    """How often the pipeline looks for newly committed checkpoints while backbones train in other processes."""

    def __post_init__(self) -> None:
        check_declared(self)
        if self.concurrency != 1 and self.nnodes > 1:
            raise ValueError(f"diffusion.concurrency={self.concurrency} shares one machine between jobs, but "
                             f"diffusion.nnodes={self.nnodes}: use concurrency 1 for multi-node runs")
        if not self.backbones:
            raise ValueError("diffusion.backbones must name at least one backbone preset")
        from dcae15.models.plugin import BackboneError, is_import_path, source_fingerprint
        from dcae15.models.registry import OBJECTIVES, PRESETS

        unknown = [b for b in self.backbones if b not in PRESETS and not is_import_path(b)]
        if unknown:
            raise ValueError(f"diffusion.backbones: unknown presets {unknown}; allowed: {', '.join(sorted(PRESETS))} "
                             "or an import path 'package.module:factory' (docs/backbones.md)")
        plugins = [b for b in self.backbones if is_import_path(b)]
        for b in plugins:  # found here, before any stage runs, not after the stages before training
            try:
                source_fingerprint(b)
            except BackboneError as e:
                raise ValueError(f"diffusion.backbones: {e}") from None
        if plugins and self.train.objective is None:
            raise ValueError(f"diffusion.train.objective is required with import-path backbones {plugins}; allowed: "
                             f"{', '.join(OBJECTIVES)} (it then applies to every backbone of the list)")
        self.check_launch("diffusion")
        if plugins and int(self.train.patch_size) != 1:
            raise ValueError(f"diffusion.train.patch_size={self.train.patch_size} applies to every backbone, but the "
                             f"import-path backbones {plugins} take whole latents (patchify inside the module): "
                             "set diffusion.train.patch_size=1")


@dataclass(kw_only=True)
class SampleSection:
    """Sampling from each trained backbone (arguments of ``dcae15.diffusion.sample.sample_to_store``)."""

    num_samples: int = field(default=512, metadata=at_least(1))
    sampler: str | None = None
    """None = the backbone's default (DDPM for epsilon models, Heun for flow models); flow models also take
    ``euler``, ``dopri5`` (DC-Gen's USiT configs) and ``sde`` (Euler–Maruyama with SiT's / REPA-E's last step)."""
    steps: int = field(default=50, metadata=at_least(1))
    atol: float = field(default=1e-5, metadata=above(0))
    """dopri5's absolute tolerance (DC-Gen evaluates USiT with SiT's ``sample_ode`` defaults: atol 1e-6)."""
    rtol: float = field(default=1e-5, metadata=above(0))
    """dopri5's relative tolerance (DC-Gen: 1e-3)."""
    shift: float = 1.0
    """Flow models' timestep shift (LightningDiT's ``timestep_shift``): the sampler's times t become
    shift·t / (1 + (shift - 1)·t) (1 = noise), so shift > 1 spends more steps near the noise; 1 = none."""
    cfg_scale: float = 1.5
    seed: int = 0
    batch_size: int = field(default=64, metadata=at_least(1))
    chunk_size: int = field(default=256, metadata=at_least(1))
    """Images per sample-store unit: the granularity at which a killed sampling job resumes."""
    precision: str = field(default="auto", metadata=one_of("auto", "bf16", "fp32"))
    """Backbone + decoder autocast: ``auto`` (bf16 on a GPU, fp32 on CPU), ``bf16`` or ``fp32``. Sampling runs
    on as many processes as training (``diffusion.nproc_per_node`` / ``nnodes`` / ``launcher``)."""
    guidance_interval: list[float] = field(default_factory=lambda: [0.0, 1.0])
    """CFG applies only for normalised times in [lo, hi] (1 = noise; Kynkäänniemi et al. 2024); [0, 1] = always."""
    labels: str = "uniform"
    """``uniform`` (i.i.d., the FID protocol), ``balanced`` (equal counts) — over ``classes`` when given — or
    ``given``: exactly ``classes`` in order, each over a contiguous block."""
    classes: list[int] | None = None
    """Class ids to sample (e.g. [207, 360, 387]); None = all classes."""
    grid: str | None = None
    """Also write a PNG grid of the samples here (a row per class, up to 16 classes × 8); output only, not part of
    the sample store's identity."""
    png_dir: str | None = None
    """Also write every sample as ``<png_dir>/<index:06d>.png`` + ``labels.txt``; output only."""

    OUTPUT_FIELDS = ("grid", "png_dir")  # written from a finished store; never change which images are drawn

    def spec(self) -> dict[str, Any]:
        """The keyword arguments of ``sample_to_store`` (what decides the images; the outputs left out)."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if k not in self.OUTPUT_FIELDS}
        # fields at sample_to_store's defaults are left out: the sample id of an unchanged config stays the same
        for k, default in (("classes", None), ("labels", "uniform"), ("guidance_interval", [0.0, 1.0]), ("shift", 1.0),
                           ("atol", 1e-5), ("rtol", 1e-5)):
            if out[k] == default:
                del out[k]
        return out

    def __post_init__(self) -> None:
        from dcae15.metrics.labels import LABEL_MODES, check_classes

        check_declared(self)
        if self.labels not in LABEL_MODES:
            raise ValueError(f"sample.labels must be one of {', '.join(LABEL_MODES)}; got {self.labels!r}")
        self.classes = check_classes(self.classes)
        if self.labels == "given" and self.classes is None:
            raise ValueError("sample.labels=given needs sample.classes (e.g. [207, 360, 387])")
        gi = [float(v) for v in self.guidance_interval]
        if len(gi) != 2 or not 0.0 <= gi[0] <= gi[1] <= 1.0:
            raise ValueError(f"sample.guidance_interval must be [lo, hi] with 0 <= lo <= hi <= 1, got "
                             f"{self.guidance_interval!r}")
        self.guidance_interval = gi
        from dcae15.diffusion.samplers import SAMPLERS

        known = [name for names in SAMPLERS.values() for name in names]
        if self.sampler is not None and self.sampler not in known:
            raise ValueError(f"sample.sampler={self.sampler!r}; allowed: {', '.join(known)} or null (the model's "
                             "default); DDPM models take ddpm/ddim, flow models euler/heun/dopri5/sde")
        if not self.shift > 0:
            raise ValueError(f"sample.shift must be > 0 (1 = no timestep shift), got {self.shift}")


@dataclass(kw_only=True)
class EvalOptions:
    """Settings of the metrics (``evaluate.options``)."""

    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    """The proxy classifier and its training (``dcae15.metrics.proxy.ProxyConfig``)."""
    reconstruction: ReconEvalConfig | None = None
    """The autoencoder's reconstruction scores (``dcae15.ae.recon_eval.ReconEvalConfig``); ``resolution``
    defaults to the pipeline's. None: the defaults."""
    generation: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of ``dcae15.metrics.fidelity.generation_metrics`` (metrics, batch_size, kid_subsets, ...)."""
    inception_weights: str | None = None
    """The InceptionV3 weights file (else ``$DCAE15_WEIGHTS`` / the torch hub cache)."""
    reference_stats: dict[str, Any] = field(default_factory=dict)
    """How the train split's reference (``evaluate.reference: train``) is computed: keyword arguments of
    ``dcae15.metrics.reference.reference_stats`` (``max_samples``: None = the whole train
    split, the official protocol; ``num_features``, ``batch_size``, ``num_workers``, ...)."""

    def __post_init__(self) -> None:
        from dcae15.metrics.fidelity import generation_metrics
        from dcae15.metrics.reference import reference_stats

        self.generation = check_kwargs(generation_metrics, self.generation, "evaluate.options.generation",
                                       exclude=("samples", "reference", "extractor", "resolution", "protocol",
                                                "pr_reference", "isc_extractor"))  # evaluate.protocol decides
        self.reference_stats = check_kwargs(reference_stats, self.reference_stats, "evaluate.options.reference_stats",
                                      exclude=("dataset_url", "resolution", "extractor", "storage_options"))


@dataclass(kw_only=True)
class EvalSection:
    """Scoring samples against the real data."""

    extractor: str = "auto"
    """``inception`` (the standard numbers; needs its local weights), ``proxy`` (a small classifier trained on the
    demo data; numbers labelled proxy-*), or ``auto``: inception for real data (``data.source`` set), proxy for
    the generated demo dataset."""
    options: EvalOptions = field(default_factory=EvalOptions)
    """Settings of the metrics: the proxy classifier, the reconstruction scores, the generation metrics."""
    reconstruction: bool = True
    """Also score the autoencoder's reconstructions per c' (rFID / PSNR / SSIM / LPIPS) and draw its figures."""
    reference: str = "train"
    """What samples are compared with: ``train`` (statistics of the dataset's train split, computed once and
    cached), or the path/URL of an ADM reference batch ``.npz`` (``VIRTUAL_imagenet256_labeled.npz``: its own
    mu/sigma/mu_s/sigma_s, its images for precision/recall; needs ``extractor: inception``) — the numbers the
    literature reports. Recorded in every result row's ``reference`` column."""
    checkpoints: str = "all"
    """Which checkpoints of each run the pipeline samples and scores: ``all`` it keeps (``diffusion.train.
    keep_checkpoints``), so the results plot shows curves, or only the ``latest``."""
    protocol: str = "auto"
    """The protocol of a published table the numbers follow (``dcae15.metrics.protocols.PROTOCOLS``; recorded in
    every result row): ``dc-gen`` (the DC-AE / DC-AE 1.5 tables: FID against the train split's statistics, IS over
    10 shuffled splits, precision/recall against ``pr_reference``), ``adm`` (the DiT / SiT / LightningDiT / REPA-E
    tables: everything against the ADM reference batch ``reference``, IS over unshuffled 5 000-image splits, ADM's
    fp16 precision/recall), ``proxy`` (the demo's proxy classifier) or ``torch-fidelity`` (torch-fidelity's formulas
    against the train split: no paper's table). ``auto``: ``proxy`` for the proxy extractor, ``adm`` with an ADM
    reference batch, else ``torch-fidelity``."""
    pr_reference: str | None = None
    """``dc-gen`` only: the ADM reference batch (``VIRTUAL_imagenet256_labeled.npz``) whose 10 000 images
    precision/recall compares with (DC-Gen's ``precision_recall_ref_path``); None: no precision/recall, as DC-Gen
    computes none without it."""
    grid_classes: list[int] | None = None
    """Class indices the sample grid of each run shows (a row each, at most 100); None = all of up to 16 classes,
    else 16 spread over the class list, so a 1000-class figure stays small."""

    def __post_init__(self) -> None:
        if self.extractor not in ("auto", "proxy", "inception"):
            raise ValueError(f"evaluate.extractor must be 'auto', 'proxy' or 'inception', got {self.extractor!r}")
        if self.checkpoints not in ("all", "latest"):
            raise ValueError(f"evaluate.checkpoints must be 'all' or 'latest', got {self.checkpoints!r}")
        if self.grid_classes is not None:
            from dcae15.diffusion.plots import MAX_GRID_CLASSES

            g = self.grid_classes
            if not g or len(g) > MAX_GRID_CLASSES or len(set(g)) != len(g) or min(g) < 0:
                raise ValueError(f"evaluate.grid_classes must be null or 1..{MAX_GRID_CLASSES} distinct class indices "
                                 f">= 0, got {g}")
        if self.reference != "train" and not str(self.reference).endswith(".npz"):
            raise ValueError(f"evaluate.reference must be 'train' or an ADM reference batch (.npz), got "
                             f"{self.reference!r}")
        if self.reference != "train" and self.extractor == "proxy":
            raise ValueError("evaluate.reference: an ADM reference batch holds Inception statistics; set "
                             "evaluate.extractor: inception (or auto with real data)")
        from dcae15.metrics.protocols import PROTOCOLS

        if self.protocol != "auto" and self.protocol not in PROTOCOLS:
            raise ValueError(f"evaluate.protocol must be 'auto' or one of {', '.join(PROTOCOLS)}; got {self.protocol!r}")
        if self.pr_reference is not None and not str(self.pr_reference).endswith(".npz"):
            raise ValueError(f"evaluate.pr_reference must be null or an ADM reference batch (.npz), got "
                             f"{self.pr_reference!r}")

    def resolve_protocol(self) -> None:
        """Turn ``protocol: auto`` into a name (once ``extractor`` is resolved) and check that the protocol's
        reference, feature network and precision/recall reference are what the section names.

        Raises:
            ValueError: naming the field and what the protocol needs.
        """
        from dcae15.metrics.protocols import get_protocol

        npz = self.reference != "train"
        if self.protocol == "auto":
            self.protocol = "proxy" if self.extractor == "proxy" else "adm" if npz else "torch-fidelity"
        proto = get_protocol(self.protocol)
        if proto.extractor != self.extractor:
            raise ValueError(f"evaluate.protocol {proto.name} needs evaluate.extractor: {proto.extractor}, got "
                             f"{self.extractor!r}")
        if (proto.reference == "adm-batch") != npz:
            need = "an ADM reference batch (VIRTUAL_imagenet256_labeled.npz)" if not npz else "train"
            raise ValueError(f"evaluate.protocol {proto.name} needs evaluate.reference: {need}, got {self.reference!r}")
        if self.pr_reference is not None and proto.name != "dc-gen":
            raise ValueError(f"evaluate.pr_reference is DC-Gen's precision/recall batch: set evaluate.protocol: "
                             f"dc-gen, or leave it null (protocol {proto.name} takes precision/recall from "
                             f"{'evaluate.reference' if npz else 'the train split'})")


@dataclass(kw_only=True)
class PipelineConfig:
    """Everything a pipeline run needs; each section feeds one stage."""

    root: str = "./demo_out"
    """Object-storage root URL (local directory, ``s3://bucket/prefix``, ``memory://``)."""
    seed: int = 0
    """The seed of every stage that sets none itself (``diffusion.train.seed``, the AE phases' ``seed``)."""
    resolution: int = 32
    """The image size of the pipeline, set once: the latent store is encoded at it (centre crop), samples are
    scored at it, and it is the default of the single-phase autoencoder's ``resolution``, of the generated
    images' ``data.synthetic.size`` and of ``evaluate.options.reconstruction.resolution``."""
    data: DataSection = field(default_factory=DataSection)
    autoencoder: AESection = field(default_factory=AESection)
    encode: EncodeSection = field(default_factory=EncodeSection)
    diffusion: DiffusionSection = field(default_factory=DiffusionSection)
    sample: SampleSection = field(default_factory=SampleSection)
    evaluate: EvalSection = field(default_factory=EvalSection)
    logging: TrackingConfig = field(default_factory=TrackingConfig)
    """Experiment tracking of every training run and its evaluations (``dcae15.tracking.TrackingConfig``: backend
    ``none | tensorboard | wandb | mlflow``, project, run_name, offline, dir, uri); the default of
    ``diffusion.train.logging`` and of each autoencoder phase's ``logging``. Operational: no run id changes."""

    def __post_init__(self) -> None:
        if self.resolution < 8:
            raise ValueError(f"resolution must be >= 8, got {self.resolution}")
        if self.evaluate.extractor == "auto":  # real data gets the standard extractor; the demo keeps its proxy
            self.evaluate.extractor = "inception" if self.data.source is not None else "proxy"
        self.evaluate.resolve_protocol()
        if self.evaluate.options.reconstruction is None:
            self.evaluate.options.reconstruction = ReconEvalConfig(resolution=self.resolution)
        if self.data.source is None:
            self.data.synthetic.setdefault("size", self.resolution)
        self.autoencoder.phases = _resolve_phases(self)
        if self.logging.backend != "none":  # the section's own settings win where a stage set a backend
            for train in (self.diffusion.train, *self.autoencoder.phases):
                if train.logging.backend == "none":
                    train.logging = dataclasses.replace(self.logging)

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON values (lists, not tuples); :func:`load_config` of it gives this config back."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


def _resolve_phases(cfg: PipelineConfig) -> list[AETrainConfig]:
    """The autoencoder recipe as validated ``AETrainConfig`` phases (preset, seed and resolution filled in)."""
    from dcae15.ae.recipe import phase_configs, resolve_phases

    sec = cfg.autoencoder
    if isinstance(sec.phases, list) and all(isinstance(p, AETrainConfig) for p in sec.phases):
        return sec.phases
    phases = resolve_phases(sec.phases, sec.train, real_data=cfg.data.source is not None)
    single = sec.phases is None and len(phases) == 1  # autoencoder.train is the one phase
    paths = ["autoencoder.train"] if single else [f"autoencoder.phases[{i}]" for i in range(len(phases))]
    # a phase trains at the pipeline's resolution unless it says otherwise (the paper's 512 px latent adaptation)
    phases = [{"resolution": cfg.resolution, **p} for p in phases]
    return phase_configs(phases, preset=sec.preset, seed=cfg.seed, paths=paths)


# Fields that moved: a config that still sets them is told where they went.
_MOVED = {("encode", "resolution"): "the top-level 'resolution' (set once for every stage)"}


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _section(raw: dict[str, Any], *keys: str) -> dict[str, Any]:
    """``raw[k1][k2]...`` as a mapping (created empty when absent) so that defaults can be filled in."""
    node = raw
    for k in keys:
        if node.get(k) is None:
            node[k] = {}
        node = node[k]
        if not isinstance(node, dict):
            raise ValueError(f"{'.'.join(keys)}: expected a mapping of fields, got {node!r}")
    return node


def load_config(config: str | dict[str, Any] | None = None, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Build a :class:`PipelineConfig` from a preset name / YAML path / dict, then apply nested ``overrides``.

    Raises:
        ValueError: an unknown section or field, a value of the wrong type or out of range; the message names the
            field's dotted path (``diffusion.train.lr``) and what is allowed.
    """
    raw = _deep_merge(read_raw_config(config), overrides or {})
    for (sec, key), where in _MOVED.items():
        if isinstance(raw.get(sec), dict) and key in raw[sec]:
            raise ValueError(f"{sec}.{key} is no longer a field: use {where}")
    # defaults one section takes from the top level; a value given in the section wins
    seed = raw.get("seed", 0)
    _section(raw, "diffusion", "train").setdefault("seed", seed)
    if isinstance(raw.get("resolution", 32), int):
        res = raw.get("resolution", 32)
        options = _section(raw, "evaluate", "options")
        if options.get("reconstruction") is not None:
            _section(raw, "evaluate", "options", "reconstruction").setdefault("resolution", res)
    return from_dict(PipelineConfig, raw, "")
