"""DC-AE / DC-AE 1.5 structured autoencoder on diffusers' AutoencoderDC: presets, masking, fingerprint, save/load."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dcae15.typed_config import at_least, check_declared, from_dict, one_of
from dcae15.weights import MissingWeightsError

__all__ = [
    "AEConfig",
    "AE_PRESETS",
    "StructuredAutoencoder",
    "MissingWeightsError",
    "default_channel_choices",
    "channel_mask",
    "mask_channels",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "check_state_dict",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
_BLOCK_TYPES = ("ResBlock", "EfficientViTBlock")
_NORM_TYPES = ("rms_norm", "batch_norm")
_ACT_FNS = ("silu", "relu", "relu6", "gelu")
# AEConfig fields added after AEs were saved: at these defaults they stay out of the fingerprint (same AE, same id)
_LATER_FIELDS = {"decoder_conv_act_fn": "relu", "adaptive_io": False}


def default_channel_choices(latent_channels: int) -> tuple[int, ...]:
    """The paper's c' list {16, 20, ..., c} for c >= 64; for smaller c (tiny presets) the same shape scaled down:
    {c/4, c/4 + c/8, ..., c} (c32 -> 8, 12, ..., 32)."""
    c = latent_channels
    lo, step = (16, 4) if c >= 64 else (max(1, c // 4), max(1, c // 8))
    values = list(range(lo, c + 1, step))
    if values[-1] != c:
        values.append(c)
    return tuple(values)


@dataclass(kw_only=True)
class AEConfig:
    """Architecture of a DC-AE; every field maps onto an ``AutoencoderDC`` constructor argument.

    Attributes:
        name: preset or run name (recorded in latent-store attrs; not part of the architecture).
        latent_channels: c, the number of latent channels.
        block_out_channels: width per stage (encoder and decoder share it); len - 1 = log2(spatial compression).
        encoder_layers_per_block / decoder_layers_per_block: blocks per stage; stage 0 with 0 blocks means the
            first down/up-sampling is a pixel-(un)shuffle conv, as in all DC-AE releases.
        encoder_block_types / decoder_block_types: "ResBlock" or "EfficientViTBlock" per stage.
        decoder_norm_types / decoder_act_fns: per-stage decoder norm ("rms_norm"/"batch_norm") and activation.
        qkv_multiscales: per-stage multi-scale kernel sizes of EfficientViT blocks (() = none).
        bottleneck_shortcut: the latent-bottleneck shortcuts (encoder channel averaging into z, decoder channel
            duplicating out of z). They mix every latent channel into every feature, so they are incompatible with
            a structured latent space (DC-AE 1.5 presets have none).
        decoder_conv_act_fn: activation before the decoder's output conv (DC-Gen's ``decoder.out_act``): ``relu`` in
            DC-AE 1.0, ``silu`` in DC-AE 1.5.
        adaptive_io: the encoder's output conv and the decoder's input conv are DC-Gen's ``AdaptiveOutputConvLayer``
            / ``AdaptiveInputConvLayer`` (DC-AE 1.5): the same parameters as plain convs, used with their first c'
            output / input channels (``encode(x, channels=c')``, ``decode_truncated``). Recorded so a converted
            checkpoint states what it is; the computation with all c channels is unchanged.
        scaling_factor: s with z_diffusion = s * z (≈ 1 / RMS(z)); None where unpublished (tiny presets, a fresh
            run) — the latent store then uses the 1/RMS it measures at finalize.
        channel_choices: the c' list of the structured latent space; () for an unstructured AE.
    """

    name: str
    latent_channels: int = field(metadata=at_least(1))
    block_out_channels: tuple[int, ...]
    encoder_layers_per_block: tuple[int, ...]
    decoder_layers_per_block: tuple[int, ...]
    encoder_block_types: tuple[str, ...] = field(metadata=one_of(*_BLOCK_TYPES, each=True))
    decoder_block_types: tuple[str, ...] = field(metadata=one_of(*_BLOCK_TYPES, each=True))
    decoder_norm_types: tuple[str, ...] = field(metadata=one_of(*_NORM_TYPES, each=True))
    decoder_act_fns: tuple[str, ...] = field(metadata=one_of(*_ACT_FNS, each=True))
    encoder_qkv_multiscales: tuple[tuple[int, ...], ...] = ()
    decoder_qkv_multiscales: tuple[tuple[int, ...], ...] = ()
    attention_head_dim: int = 32
    downsample_block_type: str = field(default="pixel_unshuffle", metadata=one_of("pixel_unshuffle", "conv"))
    upsample_block_type: str = field(default="pixel_shuffle", metadata=one_of("pixel_shuffle", "interpolate"))
    bottleneck_shortcut: bool = False
    decoder_conv_act_fn: str = field(default="relu", metadata=one_of(*_ACT_FNS))
    adaptive_io: bool = False
    scaling_factor: float | None = None
    channel_choices: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        n = len(self.block_out_channels)
        tupled = lambda v: tuple(tuple(x) if isinstance(x, list) else x for x in v)  # noqa: E731  (JSON gives lists)
        for f in ("block_out_channels", "encoder_layers_per_block", "decoder_layers_per_block", "encoder_block_types",
                  "decoder_block_types", "decoder_norm_types", "decoder_act_fns", "channel_choices"):
            setattr(self, f, tuple(getattr(self, f)))
        self.encoder_qkv_multiscales = tupled(self.encoder_qkv_multiscales) or ((),) * n
        self.decoder_qkv_multiscales = tupled(self.decoder_qkv_multiscales) or ((),) * n
        check_declared(self)  # the ranges and choices declared with the fields
        if n < 2:
            raise ValueError(f"AEConfig.block_out_channels needs >= 2 stages, got {self.block_out_channels}")
        for f in ("encoder_layers_per_block", "decoder_layers_per_block", "encoder_block_types", "decoder_block_types",
                  "decoder_norm_types", "decoder_act_fns", "encoder_qkv_multiscales", "decoder_qkv_multiscales"):
            if len(getattr(self, f)) != n:
                raise ValueError(f"AEConfig.{f} must have one entry per stage ({n} stages), got {getattr(self, f)}")
        if any(d < 1 for d in self.encoder_layers_per_block[1:]) or any(d < 1 for d in self.decoder_layers_per_block[1:]):
            raise ValueError("AEConfig: every stage after the first needs >= 1 block (a 0-block stage skips its resampling)")
        if self.bottleneck_shortcut and self.block_out_channels[-1] % self.latent_channels:
            raise ValueError("AEConfig: bottleneck_shortcut needs block_out_channels[-1] divisible by latent_channels")
        if self.channel_choices:
            if self.bottleneck_shortcut:
                raise ValueError("AEConfig: a structured latent space (channel_choices) needs bottleneck_shortcut=False: "
                                 "the shortcut mixes every latent channel into every decoder feature")
            bad = [c for c in self.channel_choices if not 1 <= c <= self.latent_channels]
            if bad or list(self.channel_choices) != sorted(set(self.channel_choices)):
                raise ValueError(f"AEConfig.channel_choices must be increasing values in 1..{self.latent_channels}, "
                                 f"got {self.channel_choices}")
        if self.adaptive_io and self.bottleneck_shortcut:
            raise ValueError("AEConfig: adaptive_io (DC-AE 1.5's adaptive in/out convs) needs bottleneck_shortcut=False")
        if self.scaling_factor is not None and not self.scaling_factor > 0:
            raise ValueError(f"AEConfig.scaling_factor must be > 0, got {self.scaling_factor}")

    @property
    def spatial_compression(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def structured(self) -> bool:
        return bool(self.channel_choices)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], path: str | None = None) -> "AEConfig":
        return from_dict(cls, d, path)

    def diffusers_kwargs(self) -> dict[str, Any]:
        """Constructor arguments of ``diffusers.AutoencoderDC`` for this architecture."""
        return dict(
            in_channels=3,
            latent_channels=self.latent_channels,
            attention_head_dim=self.attention_head_dim,
            encoder_block_types=list(self.encoder_block_types),
            decoder_block_types=list(self.decoder_block_types),
            encoder_block_out_channels=list(self.block_out_channels),
            decoder_block_out_channels=list(self.block_out_channels),
            encoder_layers_per_block=list(self.encoder_layers_per_block),
            decoder_layers_per_block=list(self.decoder_layers_per_block),
            encoder_qkv_multiscales=[list(m) for m in self.encoder_qkv_multiscales],
            decoder_qkv_multiscales=[list(m) for m in self.decoder_qkv_multiscales],
            upsample_block_type=self.upsample_block_type,
            downsample_block_type=self.downsample_block_type,
            decoder_norm_types=list(self.decoder_norm_types),
            decoder_act_fns=list(self.decoder_act_fns),
            encoder_out_shortcut=self.bottleneck_shortcut,
            decoder_in_shortcut=self.bottleneck_shortcut,
            decoder_conv_act_fn=self.decoder_conv_act_fn,
            scaling_factor=1.0 if self.scaling_factor is None else self.scaling_factor,
        )

    @classmethod
    def from_diffusers_config(cls, cfg: dict[str, Any], *, name: str, structured: bool | None = None) -> "AEConfig":
        """Read an ``AutoencoderDC`` ``config.json`` (official checkpoints); diffusers' defaults fill missing keys."""
        import inspect

        from diffusers import AutoencoderDC

        defaults = {k: p.default for k, p in inspect.signature(AutoencoderDC.__init__).parameters.items() if k != "self"}
        c = {**defaults, **{k: v for k, v in cfg.items() if not k.startswith("_")}}
        enc_w, dec_w = tuple(c["encoder_block_out_channels"]), tuple(c["decoder_block_out_channels"])
        if enc_w != dec_w:
            raise ValueError(f"{name}: encoder/decoder widths differ ({enc_w} vs {dec_w}); dcae15 supports shared widths")
        if c["encoder_out_shortcut"] != c["decoder_in_shortcut"]:
            raise ValueError(f"{name}: encoder_out_shortcut and decoder_in_shortcut differ; dcae15 expects both equal")
        if c.get("decoder_conv_act_fn", "relu") not in _ACT_FNS:
            raise ValueError(f"{name}: decoder_conv_act_fn={c['decoder_conv_act_fn']!r} is not supported; "
                             f"allowed: {_ACT_FNS}")
        n = len(enc_w)
        per_stage = lambda v: tuple(v) if isinstance(v, (list, tuple)) else (v,) * n  # noqa: E731
        shortcut = bool(c["encoder_out_shortcut"])
        structured = (not shortcut) if structured is None else structured
        return cls(
            name=name,
            latent_channels=int(c["latent_channels"]),
            block_out_channels=enc_w,
            encoder_layers_per_block=tuple(c["encoder_layers_per_block"]),
            decoder_layers_per_block=tuple(c["decoder_layers_per_block"]),
            encoder_block_types=per_stage(c["encoder_block_types"]),
            decoder_block_types=per_stage(c["decoder_block_types"]),
            decoder_norm_types=per_stage(c["decoder_norm_types"]),
            decoder_act_fns=per_stage(c["decoder_act_fns"]),
            encoder_qkv_multiscales=tuple(tuple(m) for m in c["encoder_qkv_multiscales"]),
            decoder_qkv_multiscales=tuple(tuple(m) for m in c["decoder_qkv_multiscales"]),
            attention_head_dim=int(c["attention_head_dim"]),
            downsample_block_type=c["downsample_block_type"],
            upsample_block_type=c["upsample_block_type"],
            bottleneck_shortcut=shortcut,
            decoder_conv_act_fn=c.get("decoder_conv_act_fn", "relu"),
            scaling_factor=None if cfg.get("scaling_factor") is None else float(cfg["scaling_factor"]),
            channel_choices=default_channel_choices(int(c["latent_channels"])) if structured else (),
        )


# ---------------------------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------------------------


def _dc_ae_15(name: str, widths: tuple[int, ...], depths: tuple[int, ...], c: int, scaling: float | None,
              official: bool = True) -> AEConfig:
    """DC-AE 1.5: all ResBlock, RMSNorm + SiLU, no bottleneck shortcuts, structured c' list.

    ``official``: DC-Gen's definition (``dc_ai/aecore/models/dc_ae.py``, ``dc_ae_f32_1_5`` / ``dc_ae_f64_1_5`` at
    dc-ai-projects/DC-Gen@562077c): ``decoder.out_act=silu``, ``encoder.out_block_type=AdaptiveOutputConvLayer``,
    ``decoder.in_block_type=AdaptiveInputConvLayer``, ``encoder.out_shortcut=null``, ``decoder.in_shortcut=null``,
    norms ``trms2d`` (RMSNorm) and act ``silu`` everywhere (DC-Gen's defaults). The tiny CPU presets keep the
    ReLU before the output conv they were introduced with (the demo's measured numbers depend on it).
    """
    n = len(widths)
    return AEConfig(
        name=name, latent_channels=c, block_out_channels=widths, encoder_layers_per_block=depths,
        decoder_layers_per_block=depths, encoder_block_types=("ResBlock",) * n, decoder_block_types=("ResBlock",) * n,
        decoder_norm_types=("rms_norm",) * n, decoder_act_fns=("silu",) * n, bottleneck_shortcut=False,
        decoder_conv_act_fn="silu" if official else "relu", adaptive_io=official,
        scaling_factor=scaling, channel_choices=default_channel_choices(c),
    )


AE_PRESETS: dict[str, AEConfig] = {
    # DC-AE 1.0 ImageNet release (mit-han-lab/dc-ae-f32c32-in-1.0): ResBlock x3 then EfficientViT x3, BN+ReLU in the
    # decoder's ResBlock stages, bottleneck shortcuts on; unstructured.
    "dc-ae-f32c32-in-1.0": AEConfig(
        name="dc-ae-f32c32-in-1.0", latent_channels=32, block_out_channels=(128, 256, 512, 512, 1024, 1024),
        encoder_layers_per_block=(0, 4, 8, 2, 2, 2), decoder_layers_per_block=(0, 5, 10, 2, 2, 2),
        encoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
        decoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
        decoder_norm_types=("batch_norm",) * 3 + ("rms_norm",) * 3, decoder_act_fns=("relu",) * 3 + ("silu",) * 3,
        bottleneck_shortcut=True, scaling_factor=0.3189,
    ),
    # DC-AE 1.5 (DC-Gen's dc_ae_f32_1_5 / dc_ae_f64_1_5, see _dc_ae_15). f32c128: no published scaling factor; the
    # latent store measures 1/RMS at finalize.
    "dc-ae-f32c128-1.5": _dc_ae_15("dc-ae-f32c128-1.5", (128, 256, 512, 512, 1024, 1024), (0, 5, 10, 4, 4, 4), 128, None),
    "dc-ae-f64c128-1.5": _dc_ae_15(
        "dc-ae-f64c128-1.5", (128, 256, 512, 512, 1024, 1024, 1024), (0, 5, 10, 4, 4, 4, 4), 128, 0.5935
    ),
    # Tiny CPU presets of the same structure (stage 0 empty, ResBlock, RMSNorm + SiLU, no bottleneck shortcut).
    "tiny-f8c32": _dc_ae_15("tiny-f8c32", (16, 32, 64, 64), (0, 1, 1, 1), 32, None, official=False),
    # f4c8: 32 px -> 8x8x8, the same 512 numbers as f8c32's 4x4x32 but a shape stays 4-6 latent pixels wide,
    # which a tiny AE can reconstruct and a tiny backbone can learn in CPU minutes (the demo's default).
    "tiny-f4c8": _dc_ae_15("tiny-f4c8", (16, 32, 64), (0, 1, 1), 8, None, official=False),
    # f32c128-1.5's structure (six stages, f32, c = 128, the paper's c' list 16..128) at a CPU width: the rehearsal's
    # autoencoder (64 px -> 2x2x128 latents).
    "tiny-f32c128-1.5": _dc_ae_15("tiny-f32c128-1.5", (8, 16, 16, 32, 32, 32), (0, 1, 1, 1, 1, 1), 128, None,
                                  official=False),
    "tiny-f16c64": _dc_ae_15("tiny-f16c64", (16, 32, 64, 64, 128), (0, 1, 1, 1, 1), 64, None, official=False),
}


def check_state_dict(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: str,
                     name: str) -> None:
    """Raise ValueError naming ``source`` and the first mismatches when ``state`` is not a checkpoint of the
    architecture whose state dict is ``expected`` (missing / unexpected keys, other shapes)."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs {name} {tuple(v.shape)}" for k, v in expected.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        cut = lambda xs: f"{xs[:4]}{' ...' if len(xs) > 4 else ''} ({len(xs)})"  # noqa: E731
        raise ValueError(f"{source} is not a checkpoint of {name}: missing keys {cut(missing)}, unexpected keys "
                         f"{cut(unexpected)}, other shapes {cut(shapes)} — another architecture (check the preset / "
                         "config.json) or a truncated file")


# ---------------------------------------------------------------------------------------------------------------
# Eq. 1 masking
# ---------------------------------------------------------------------------------------------------------------


def channel_mask(channels: int | torch.Tensor, latent_channels: int, *, device=None, dtype=None) -> torch.Tensor:
    """mask_{c,c'} of Eq. 1: ones on the first c' channels. ``channels`` is an int (shape [1,C,1,1]) or a
    per-sample LongTensor [B] (shape [B,C,1,1])."""
    idx = torch.arange(latent_channels, device=device)
    if isinstance(channels, torch.Tensor):
        keep = idx[None, :] < channels.to(device)[:, None]  # (B, C)
    else:
        if not 1 <= int(channels) <= latent_channels:
            raise ValueError(f"channels={channels} must be in 1..{latent_channels}")
        keep = (idx < int(channels))[None, :]  # (1, C)
    return keep.to(dtype or torch.float32)[:, :, None, None]


def mask_channels(z: torch.Tensor, channels: int | torch.Tensor | None) -> torch.Tensor:
    """z · mask_{c,c'}: zero the channels >= c' (None keeps all)."""
    if channels is None:
        return z
    return z * channel_mask(channels, z.shape[1], device=z.device, dtype=z.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------


def _fingerprint(config: AEConfig, net: nn.Module, length: int = 16) -> str:
    h = hashlib.sha256()
    arch = {k: v for k, v in config.to_dict().items()
            if k != "name" and not (k in _LATER_FIELDS and v == _LATER_FIELDS[k])}
    h.update(json.dumps(arch, sort_keys=True, default=list).encode())
    for k, v in sorted(net.state_dict().items()):
        t = v.detach().to("cpu").contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}".encode())
        # reshape(-1): a 0-d tensor (BatchNorm's num_batches_tracked) cannot be viewed as bytes; same bytes otherwise
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:length]


class StructuredAutoencoder(nn.Module):
    """A DC-AE whose decoder can reconstruct from the first c' latent channels (DC-AE 1.5, Eq. 1).

    The network is a ``diffusers.AutoencoderDC`` held as ``self.net``, so official diffusers-format checkpoints load
    into it unchanged and our checkpoints load in diffusers. ``encode`` / ``decode`` work in the AE's own latent
    scale; multiply by ``scaling_factor`` for diffusion.
    """

    def __init__(self, config: AEConfig) -> None:
        super().__init__()
        from diffusers import AutoencoderDC

        self.config = config
        self.net = AutoencoderDC(**config.diffusers_kwargs())

    # -- properties --------------------------------------------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    @property
    def spatial_compression(self) -> int:
        return self.config.spatial_compression

    @property
    def scaling_factor(self) -> float | None:
        """The published s (z_diffusion = s·z), or None: then use the latent store's measured 1/RMS."""
        return self.config.scaling_factor

    @property
    def channel_choices(self) -> tuple[int, ...]:
        return self.config.channel_choices

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "StructuredAutoencoder":
        """A randomly initialised AE of a named preset (``overrides`` replace AEConfig fields)."""
        if name not in AE_PRESETS:
            raise ValueError(f"unknown autoencoder preset {name!r}; known: {sorted(AE_PRESETS)}")
        return cls(dataclasses.replace(AE_PRESETS[name], **overrides))

    # -- compute -----------------------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, channels: int | None = None) -> torch.Tensor:
        """Images in [-1, 1] (B,3,H,W) -> latents (B,c,H/f,W/f), unscaled; all channels, or the first ``channels``
        (what DC-AE 1.5's adaptive output conv computes with its first c' filters)."""
        f = self.spatial_compression
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"encode expects (B,3,H,W) with H and W multiples of {f}, got {tuple(x.shape)}")
        if channels is not None and not 1 <= int(channels) <= self.latent_channels:
            raise ValueError(f"encode: channels={channels}, expected 1..{self.latent_channels}")
        z = self.net.encoder(x)
        return z if channels is None else z[:, : int(channels)]

    def decode(self, z: torch.Tensor, channels: int | torch.Tensor | None = None) -> torch.Tensor:
        """Latents (B,c,h,w) -> images (B,3,h·f,w·f); with ``channels=c'`` only the first c' channels are used
        (Eq. 1: the rest are zeroed). ``channels`` may be a LongTensor [B] for per-sample c'."""
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"decode expects (B,{self.latent_channels},h,w), got {tuple(z.shape)}")
        if channels is not None and self.config.bottleneck_shortcut:
            raise ValueError(f"{self.config.name} has bottleneck shortcuts: decoding from partial channels is undefined")
        return self.net.decoder(mask_channels(z, channels))

    def decode_truncated(self, z_first: torch.Tensor) -> torch.Tensor:
        """Decode a latent holding only its first c' channels (B,c',h,w), the official way: slice the decoder's
        input conv to its first c' input channels (its bias is kept). Equals ``decode(pad(z), channels=c')``."""
        if self.config.bottleneck_shortcut:
            raise ValueError(f"{self.config.name} has bottleneck shortcuts: decoding from partial channels is undefined")
        c = z_first.shape[1]
        if not 1 <= c <= self.latent_channels:
            raise ValueError(f"decode_truncated: {c} channels, expected 1..{self.latent_channels}")
        dec = self.net.decoder
        sliced = {"conv_in.weight": dec.conv_in.weight[:, :c]}
        return torch.func.functional_call(dec, sliced, (z_first,), strict=False)

    def forward(self, x: torch.Tensor, channels: int | torch.Tensor | None = None) -> torch.Tensor:
        return self.decode(self.encode(x), channels)

    # -- identity ----------------------------------------------------------------------------------------------
    def fingerprint(self, length: int = 16) -> str:
        """sha256 of the architecture config (without the name) and every weight's name, dtype, shape and bytes."""
        return _fingerprint(self.config, self.net, length)

    # -- persistence -------------------------------------------------------------------------------------------
    def save_pretrained(self, url: str, storage_options: dict | None = None, *,
                        scaling_factor: float | None = None) -> str:
        """Write a diffusers-format directory (loads in ``AutoencoderDC.from_pretrained`` too) plus our AEConfig.

        Args:
            scaling_factor: the factor to record (e.g. the latent store's measured 1/RMS,
                ``dcae15.ae.convert.save_with_store_scaling``); default the config's. diffusers needs a number: an AE
                without any records 1.0 there, and ``_dcae15.scaling_factor: null`` says it was not measured.

        The weights are written first and ``config.json`` last (each write-then-rename), so a directory with a
        config.json is complete.
        """
        from safetensors.torch import save as st_save

        from storage.urls import put_atomic, url_to_fs

        config = self.config
        if scaling_factor is not None:
            config = dataclasses.replace(config, scaling_factor=float(scaling_factor))  # validated (> 0) there
        fs, root = url_to_fs(url, storage_options)
        root = root.rstrip("/")
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.net.state_dict().items()}
        put_atomic(fs, f"{root}/{WEIGHTS_NAME}", st_save(state, metadata={"format": "pt"}))
        cfg = {"_class_name": "AutoencoderDC", **config.diffusers_kwargs(), "_dcae15": config.to_dict(),
               "_dcae15_fingerprint": _fingerprint(config, self.net)}
        put_atomic(fs, f"{root}/{CONFIG_NAME}", json.dumps(cfg, indent=2).encode())
        return url

    @classmethod
    def from_pretrained(cls, url: str, *, name: str | None = None, structured: bool | None = None,
                        storage_options: dict | None = None, map_location: str | torch.device = "cpu"
                        ) -> "StructuredAutoencoder":
        """Load an official diffusers-format directory or one written by ``save_pretrained`` (any fsspec URL).

        Args:
            url: directory holding ``config.json`` and ``diffusion_pytorch_model.safetensors`` (or its index).
            name: name to record for an official checkpoint (default: the directory name).
            structured: for official checkpoints, whether it has a structured latent space (default: it has none
                of the bottleneck shortcuts).

        Raises:
            MissingWeightsError: naming the missing file when the config or the weights are absent.
        """
        from safetensors.torch import load as st_load

        from storage.urls import url_to_fs

        fs, root = url_to_fs(url, storage_options)
        root = root.rstrip("/")
        cfg_path = f"{root}/{CONFIG_NAME}"
        if not fs.exists(cfg_path):
            raise MissingWeightsError(
                f"autoencoder config '{CONFIG_NAME}' not found in {url}: expected a diffusers-format directory "
                f"({CONFIG_NAME} + {WEIGHTS_NAME}) written by save_pretrained or downloaded from an official release")
        raw = json.loads(fs.cat_file(cfg_path))
        if "_dcae15" in raw:
            config = AEConfig.from_dict(raw["_dcae15"])
        else:
            config = AEConfig.from_diffusers_config(raw, name=name or root.rsplit("/", 1)[-1], structured=structured)
        if fs.exists(f"{root}/{WEIGHTS_NAME}"):
            files = [WEIGHTS_NAME]
        elif fs.exists(f"{root}/{WEIGHTS_INDEX_NAME}"):
            files = sorted(set(json.loads(fs.cat_file(f"{root}/{WEIGHTS_INDEX_NAME}"))["weight_map"].values()))
        else:
            raise MissingWeightsError(
                f"autoencoder weights '{WEIGHTS_NAME}' not found in {url} (next to {CONFIG_NAME}). Copy the "
                f"checkpoint's safetensors file there; dcae15 never downloads weights.")
        state: dict[str, torch.Tensor] = {}
        for f in files:
            if not fs.exists(f"{root}/{f}"):
                raise MissingWeightsError(f"autoencoder weight shard '{f}' listed in {WEIGHTS_INDEX_NAME} is missing in {url}")
            try:
                state.update(st_load(fs.cat_file(f"{root}/{f}")))
            except Exception as err:  # safetensors raises its own error type for a cut or foreign file
                raise ValueError(f"autoencoder weights {url}/{f} are truncated or not a safetensors file ({err}): "
                                 "copy the file again") from None
        model = cls(config)
        check_state_dict(state, model.net.state_dict(), f"{url}/{', '.join(files)}", config.name)
        model.net.load_state_dict(state, strict=True)
        return model.to(map_location).eval()

