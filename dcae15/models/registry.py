"""Named backbone presets (paper names) -> typed ModelConfig; ``build_model`` instantiates DiT or UViT, or a
backbone given by import path (``package.module:factory``, ``dcae15.models.plugin``)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from dcae15.models.plugin import PLUGIN_ARCH, PluginConfig, build_plugin, is_import_path, source_fingerprint

__all__ = ["ModelConfig", "PluginConfig", "Preset", "PRESETS", "ARCHS", "OBJECTIVES", "preset", "check_backbone_name",
           "model_config", "config_from_dict", "build_model"]

ARCHS = ("dit", "uvit")
OBJECTIVES = ("ddpm-linear", "ddpm-scaled-linear", "flow")


@dataclass(kw_only=True)
class ModelConfig:
    """Architecture of one backbone, with the data shape it runs on."""

    arch: str
    """'dit' (adaLN-Zero) or 'uvit' (prepended tokens + long skips)."""
    hidden: int
    depth: int
    """DiT: number of blocks; UViT: depth//2 in-blocks + 1 mid block + depth//2 out-blocks."""
    heads: int
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    patch_size: int = 1
    in_channels: int = 4
    input_size: tuple[int, int] = (32, 32)
    num_classes: int = 1000
    """Real classes; index ``num_classes`` is the null class for classifier-free guidance."""
    label_embed_std: float | None = None
    """Init std of the class-label embedding; None = the architecture's recipe (DiT: 0.02; U-ViT: torch's
    N(0, 1) default). With 0.02 a tiny DiT trained for a few hundred steps barely conditions on the label
    (measured: 0.65 vs 0.69 error with the right vs a wrong label after 400 steps; 0.40 vs 1.11 with std 1.0),
    so the tiny presets set 1.0."""

    def __post_init__(self) -> None:
        self.input_size = tuple(int(v) for v in self.input_size)  # YAML gives lists
        if self.arch not in ARCHS:
            raise ValueError(f"ModelConfig.arch={self.arch!r}; allowed: {ARCHS}")
        for name in ("hidden", "depth", "heads", "patch_size", "in_channels", "num_classes"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r} must be >= 1")
        if self.hidden % self.heads:
            raise ValueError(f"ModelConfig.hidden={self.hidden} is not divisible by heads={self.heads}")
        if self.arch == "dit" and self.hidden % 4:
            raise ValueError(f"ModelConfig.hidden={self.hidden} must be divisible by 4 for DiT's sin-cos positions")
        if self.label_embed_std is not None and not self.label_embed_std > 0:
            raise ValueError(f"ModelConfig.label_embed_std={self.label_embed_std!r} must be > 0")
        if any(s % self.patch_size for s in self.input_size):
            raise ValueError(f"ModelConfig.input_size={self.input_size} is not divisible by patch_size={self.patch_size}")


@dataclass(frozen=True)
class Preset:
    """A paper model name = network shape + training objective."""

    arch: str
    hidden: int
    depth: int
    heads: int
    objective: str
    qkv_bias: bool
    label_embed_std: float | None = None


def _dit(h: int, d: int, n: int, obj: str, **kw) -> Preset:
    return Preset("dit", h, d, n, obj, qkv_bias=True, **kw)


def _uvit(h: int, d: int, n: int, obj: str, **kw) -> Preset:
    return Preset("uvit", h, d, n, obj, qkv_bias=False, **kw)  # U-ViT / DC-AE setting


_TINY = dict(label_embed_std=1.0)  # see ModelConfig.label_embed_std


PRESETS: dict[str, Preset] = {
    # DiT (linear betas) and SiT (the same network, flow matching).
    "DiT-XL": _dit(1152, 28, 16, "ddpm-linear"),
    "SiT-XL": _dit(1152, 28, 16, "flow"),
    # UViT (scaled-linear betas) and USiT (the same network, flow matching).
    "UViT-H": _uvit(1152, 28, 16, "ddpm-scaled-linear"),
    "USiT-H": _uvit(1152, 28, 16, "flow"),
    "UViT-2B": _uvit(2048, 28, 32, "ddpm-scaled-linear"),
    "USiT-2B": _uvit(2048, 28, 32, "flow"),
    "USiT-3B": _uvit(2048, 56, 32, "flow"),
    # Tiny presets for CPU tests and the demo.
    "DiT-tiny": _dit(96, 4, 4, "ddpm-linear", **_TINY),
    "SiT-tiny": _dit(96, 4, 4, "flow", **_TINY),
    "UViT-tiny": _uvit(96, 4, 4, "ddpm-scaled-linear", **_TINY),
    "USiT-tiny": _uvit(96, 4, 4, "flow", **_TINY),
}


def preset(name: str) -> Preset:
    """Look up a preset by its paper name; unknown names fail with the allowed set."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; allowed: {sorted(PRESETS)}")
    return PRESETS[name]


def check_backbone_name(name: str, where: str = "backbone") -> str:
    """``name`` if it is a preset or spells an import path (``package.module:factory``; not imported here).

    Raises:
        ValueError: neither, naming ``where`` and the allowed presets.
    """
    if name in PRESETS or is_import_path(name):
        return name
    raise ValueError(f"{where}={name!r}: unknown model preset; allowed: {sorted(PRESETS)} or an import path "
                     "'package.module:factory' (docs/backbones.md)")


def model_config(name: str, *, in_channels: int, input_size: tuple[int, int], num_classes: int = 1000,
                 patch_size: int = 1, **overrides) -> ModelConfig | PluginConfig:
    """ModelConfig for preset ``name`` on data of shape (in_channels, *input_size); ``overrides`` any field.

    An import path ``name`` gives a PluginConfig: ``overrides`` become the factory's extra keyword arguments and
    the module's source fingerprint is recorded (``BackboneError`` if it cannot be found).
    """
    if is_import_path(name):
        if int(patch_size) != 1:
            raise ValueError(f"patch_size={patch_size} is a preset field; give a plug-in backbone's patch size in "
                             f"model_overrides (backbone {name!r})")
        return PluginConfig(factory=name, in_channels=in_channels, input_size=tuple(input_size),
                            num_classes=num_classes, kwargs=dict(overrides),
                            source_fingerprint=source_fingerprint(name))
    p = preset(name)
    fields = dict(arch=p.arch, hidden=p.hidden, depth=p.depth, heads=p.heads, qkv_bias=p.qkv_bias,
                  label_embed_std=p.label_embed_std,
                  patch_size=patch_size, in_channels=in_channels, input_size=tuple(input_size),
                  num_classes=num_classes)
    from dcae15.typed_config import check_fields

    fields.update(check_fields(ModelConfig, overrides, "ModelConfig"))
    return ModelConfig(**fields)


def config_from_dict(d: dict) -> ModelConfig | PluginConfig:
    """The model config a run's ``config.yaml`` records under ``model_config`` (a preset's or a plug-in's)."""
    return PluginConfig(**d) if d.get("arch") == PLUGIN_ARCH else ModelConfig(**d)


def build_model(cfg: ModelConfig | PluginConfig) -> nn.Module:
    """Instantiate the backbone for ``cfg`` (respects the default device, e.g. ``torch.device('meta')``)."""
    if isinstance(cfg, PluginConfig):
        return build_plugin(cfg)
    from dcae15.models.dit import DiT
    from dcae15.models.uvit import UViT

    return DiT(cfg) if cfg.arch == "dit" else UViT(cfg)
