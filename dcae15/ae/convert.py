"""Official DC-AE checkpoints in the efficientvit / DC-Gen layout <-> ours (= diffusers' ``AutoencoderDC`` layout).

Every official DC-AE (1.0 in mit-han-lab/efficientvit, 1.5 in dc-ai-projects/DC-Gen) is published as a state dict
of their ``DCAE`` module (keys ``encoder.stages.<i>.op_list.<j>.main.conv1.conv.weight`` ...) besides diffusers'
format. ``StructuredAutoencoder`` holds a diffusers ``AutoencoderDC``, so its state dict *is* diffusers' layout.

Forward (efficientvit -> diffusers) applies the public key map of diffusers (``convert_autoencoder_dc_checkpoint_
to_diffusers`` in ``diffusers/loaders/single_file_utils.py``, the successor of ``scripts/convert_dcae_to_diffusers.py``):
ordered substring renames, then the attention's fused ``qkv`` 1×1 conv split into ``to_q/to_k/to_v`` and the
``proj`` 1×1 conv squeezed into ``to_out``. Backward (diffusers -> efficientvit) rebuilds the efficientvit names
from the architecture (where the ``main.`` residual wrappers and ``op_list.`` sequences are), and
``efficientvit_key_map`` checks on every architecture that the forward map of each rebuilt name gives the diffusers
key back — so the two directions are each other's inverse, bit for bit.
"""

from __future__ import annotations

import io
import re
from typing import Any

import torch

from dcae15.ae.model import AE_PRESETS, AEConfig, StructuredAutoencoder, check_state_dict

__all__ = ["EFFICIENTVIT_NAMES", "efficientvit_key_map", "from_efficientvit", "load_efficientvit_state",
           "save_with_store_scaling", "to_diffusers_state", "to_efficientvit_state"]

# DC-Gen / efficientvit model-zoo names -> our presets (DC-Gen names the 1.5 models "dc-ae-1.5-f32c128")
EFFICIENTVIT_NAMES = {
    "dc-ae-f32c32-in-1.0": "dc-ae-f32c32-in-1.0",
    "dc-ae-1.5-f32c128": "dc-ae-f32c128-1.5",
    "dc-ae-f32c128-1.5": "dc-ae-f32c128-1.5",
    "dc-ae-1.5-f64c128": "dc-ae-f64c128-1.5",
    "dc-ae-f64c128-1.5": "dc-ae-f64c128-1.5",
}

# diffusers' published rename list, in its order (the order matters: e.g. "inverted_conv.conv" before "conv.conv.")
_RENAMES = (
    ("main.", ""), ("op_list.", ""), ("context_module", "attn"), ("local_module", "conv_out"),
    ("aggreg.0.0", "to_qkv_multiscale.0.proj_in"), ("aggreg.0.1", "to_qkv_multiscale.0.proj_out"),
    ("depth_conv.conv", "conv_depth"), ("inverted_conv.conv", "conv_inverted"), ("point_conv.conv", "conv_point"),
    ("point_conv.norm", "norm"), ("conv.conv.", "conv."), ("conv1.conv", "conv1"), ("conv2.conv", "conv2"),
    ("conv2.norm", "norm"), ("proj.norm", "norm_out"),
    ("encoder.project_in.conv", "encoder.conv_in"), ("encoder.project_out.0.conv", "encoder.conv_out"),
    ("encoder.stages", "encoder.down_blocks"),
    ("decoder.project_in.conv", "decoder.conv_in"), ("decoder.project_out.0", "decoder.norm_out"),
    ("decoder.project_out.2.conv", "decoder.conv_out"), ("decoder.stages", "decoder.up_blocks"),
)
# where stage 0 is empty, project_in / project_out are pixel-(un)shuffle convs: one more ``.conv`` level
_PIXEL_SHUFFLE_IO = {"encoder.project_in.conv": "encoder.conv_in.conv",
                     "decoder.project_out.2.conv": "decoder.conv_out.conv"}


def _renames(cfg: AEConfig) -> tuple[tuple[str, str], ...]:
    if cfg.encoder_layers_per_block[0] != cfg.decoder_layers_per_block[0]:
        raise ValueError(f"{cfg.name}: the efficientvit layout needs the same stage-0 depth in encoder and decoder")
    if cfg.encoder_layers_per_block[0] > 0:
        return _RENAMES
    return tuple((a, _PIXEL_SHUFFLE_IO.get(a, b)) for a, b in _RENAMES)


def _forward_key(key: str, renames) -> str:
    for a, b in renames:
        key = key.replace(a, b)
    return key


# ---------------------------------------------------------------- diffusers name -> efficientvit name

_BLOCK = re.compile(r"^(encoder|decoder)\.(down_blocks|up_blocks)\.(\d+)\.(\d+)\.(.+)$")
_RESBLOCK = {"conv1.": "main.conv1.conv.", "conv2.": "main.conv2.conv.", "norm.": "main.conv2.norm."}
_EVIT = (("attn.to_qkv_multiscale.0.proj_in.", "context_module.main.aggreg.0.0."),
         ("attn.to_qkv_multiscale.0.proj_out.", "context_module.main.aggreg.0.1."),
         ("attn.norm_out.", "context_module.main.proj.norm."),
         ("conv_out.conv_inverted.", "local_module.main.inverted_conv.conv."),
         ("conv_out.conv_depth.", "local_module.main.depth_conv.conv."),
         ("conv_out.conv_point.", "local_module.main.point_conv.conv."),
         ("conv_out.norm.", "local_module.main.point_conv.norm."))


def _efficientvit_key(key: str, cfg: AEConfig) -> str:
    """The efficientvit name of one diffusers key (``to_q/k/v`` -> the fused ``qkv``; see ``efficientvit_key_map``)."""
    empty0 = cfg.encoder_layers_per_block[0] == 0
    short = cfg.bottleneck_shortcut  # the latent shortcuts wrap project_out / project_in in a ResidualBlock
    fixed = {
        "encoder.conv_in.": "encoder.project_in.conv.conv." if empty0 else "encoder.project_in.conv.",
        "encoder.conv_out.": "encoder.project_out.main.op_list.0.conv." if short else "encoder.project_out.op_list.0.conv.",
        "decoder.conv_in.": "decoder.project_in.main.conv." if short else "decoder.project_in.conv.",
        "decoder.norm_out.": "decoder.project_out.op_list.0.",
        "decoder.conv_out.": "decoder.project_out.op_list.2.conv.conv." if empty0 else "decoder.project_out.op_list.2.conv.",
    }
    for prefix, new in fixed.items():
        if key.startswith(prefix):
            rest = key[len(prefix):]
            if prefix in ("encoder.conv_in.", "decoder.conv_out.") and empty0:
                rest = rest.removeprefix("conv.")  # DCDownBlock2d / DCUpBlock2d hold their conv as .conv
            return new + rest
    m = _BLOCK.match(key)
    if not m:
        raise ValueError(f"no efficientvit name for diffusers key {key!r}")
    side, _, stage, j, rest = m.groups()
    stage, j = int(stage), int(j)
    head = f"{side}.stages.{stage}.op_list.{j}."
    n = len(cfg.block_out_channels)
    depth = (cfg.encoder_layers_per_block if side == "encoder" else cfg.decoder_layers_per_block)[stage]
    resample = stage < n - 1 and depth > 0 and (j == depth if side == "encoder" else j == 0)
    if resample:  # the down/up-sampling conv, wrapped with its averaging / duplicating shortcut
        return head + "main.conv.conv." + rest.removeprefix("conv.")
    kind = (cfg.encoder_block_types if side == "encoder" else cfg.decoder_block_types)[stage]
    if kind == "ResBlock":
        for a, b in _RESBLOCK.items():
            if rest.startswith(a):
                return head + b + rest[len(a):]
    else:
        for a, b in _EVIT:
            if rest.startswith(a):
                return head + b + rest[len(a):]
        if rest in ("attn.to_q.weight", "attn.to_k.weight", "attn.to_v.weight"):
            return head + "context_module.main.qkv.conv.weight"
        if rest == "attn.to_out.weight":
            return head + "context_module.main.proj.conv.weight"
    raise ValueError(f"no efficientvit name for diffusers key {key!r} ({kind} stage {stage})")


def efficientvit_key_map(cfg: AEConfig) -> dict[str, str]:
    """diffusers key -> efficientvit key for the architecture ``cfg``, checked against the published forward map.

    Raises:
        ValueError: a key whose efficientvit name does not map back onto it (the layout is not expressible).
    """
    from diffusers import AutoencoderDC

    with torch.device("meta"):  # names and shapes only: no memory, no init time even for f64c128
        keys = list(AutoencoderDC(**cfg.diffusers_kwargs()).state_dict())
    renames, out = _renames(cfg), {}
    for k in keys:
        ev = _efficientvit_key(k, cfg)
        back = _forward_key(ev, renames)
        if k.endswith(("to_q.weight", "to_k.weight", "to_v.weight")):
            back = back.replace("qkv.conv.weight", k.rsplit(".", 2)[-2] + ".weight")
        elif k.endswith("to_out.weight"):
            back = back.replace("proj.conv.weight", "to_out.weight")
        if back != k:
            raise ValueError(f"{cfg.name}: efficientvit name {ev!r} maps to {back!r}, not {k!r}")
        out[k] = ev
    return out


# ---------------------------------------------------------------- state dicts

def to_diffusers_state(state: dict[str, torch.Tensor], cfg: AEConfig, source: str = "state dict") -> dict[str, torch.Tensor]:
    """An efficientvit / DC-Gen state dict as ours (diffusers' layout), with the published key map.

    Raises:
        ValueError: naming ``source`` and the mismatching keys/shapes when it is not a checkpoint of ``cfg``.
    """
    renames, out = _renames(cfg), {}
    for key, value in state.items():
        new = _forward_key(key, renames)
        if new.endswith(".qkv.conv.weight"):
            parent = new[: -len(".qkv.conv.weight")]
            for name, part in zip(("to_q", "to_k", "to_v"), torch.chunk(value, 3, dim=0)):
                out[f"{parent}.{name}.weight"] = part.flatten(1)  # (d, C, 1, 1) -> (d, C)
        elif new.endswith(".proj.conv.weight"):
            out[new[: -len(".proj.conv.weight")] + ".to_out.weight"] = value.flatten(1)
        else:
            out[new] = value
    from diffusers import AutoencoderDC

    with torch.device("meta"):
        expected = AutoencoderDC(**cfg.diffusers_kwargs()).state_dict()
    check_state_dict(out, expected, source, cfg.name)
    return out


def to_efficientvit_state(state: dict[str, torch.Tensor], cfg: AEConfig) -> dict[str, torch.Tensor]:
    """Ours (diffusers' layout) as an efficientvit / DC-Gen state dict (``to_q/k/v`` fused back into ``qkv``)."""
    key_map = efficientvit_key_map(cfg)
    missing = [k for k in key_map if k not in state]
    if missing:
        raise ValueError(f"state dict lacks {missing[:4]} ({len(missing)} keys) of {cfg.name}")
    out: dict[str, torch.Tensor] = {}
    for k, ev in key_map.items():
        if k.endswith("to_q.weight"):
            parent = k[: -len("to_q.weight")]
            qkv = torch.cat([state[parent + f"to_{x}.weight"] for x in "qkv"], dim=0)
            out[ev] = qkv[:, :, None, None]
        elif k.endswith(("to_k.weight", "to_v.weight")):
            continue  # fused with to_q
        elif k.endswith("to_out.weight"):
            out[ev] = state[k][:, :, None, None]
        else:
            out[ev] = state[k]
    return out


def _checkpoint_file(url: str, storage_options: dict | None) -> str:
    """The checkpoint file itself: ``url``, or ``<url>/model.safetensors`` for a directory (the Hub mixin's name)."""
    from storage.urls import join, url_to_fs

    fs, path = url_to_fs(url, storage_options)
    return join(str(url), "model.safetensors") if fs.isdir(path.rstrip("/")) else str(url)


def load_efficientvit_state(url: str, storage_options: dict | None = None) -> dict[str, torch.Tensor]:
    """The state dict of an official efficientvit / DC-Gen checkpoint: a ``.safetensors`` file, a directory with
    ``model.safetensors`` (the Hub mixin's layout), or a ``.pt``/``.pth`` file (``{"state_dict": ...}``, loaded with
    ``weights_only=True``).

    Raises:
        MissingWeightsError: the file is not there (named). ValueError: truncated or not a checkpoint (named).
    """
    from safetensors.torch import load as st_load

    from dcae15.weights import MissingWeightsError
    from storage.urls import url_to_fs

    fs, path = url_to_fs(_checkpoint_file(url, storage_options), storage_options)
    if not fs.exists(path):
        raise MissingWeightsError(f"official DC-AE checkpoint {path} not found: copy the release's model.safetensors "
                                  "(or .pt) there; dcae15 never downloads weights")
    blob = fs.cat_file(path)
    try:
        if path.endswith(".safetensors"):
            state: Any = st_load(blob)
        else:
            state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path} is truncated or not a checkpoint ({type(err).__name__}: {err})") from None
    for wrapper in ("model", "module", "state_dict", "ema"):  # the trainers' wrappers (diffusers strips the same)
        if isinstance(state, dict) and wrapper in state and isinstance(state[wrapper], dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path} holds no state dict of tensors")
    return state


def from_efficientvit(url: str, preset: str | AEConfig, *, storage_options: dict | None = None) -> StructuredAutoencoder:
    """Load an official efficientvit / DC-Gen DC-AE checkpoint into a ``StructuredAutoencoder``.

    Args:
        preset: our preset name, a DC-Gen/efficientvit model name (``EFFICIENTVIT_NAMES``) or an ``AEConfig``.

    Raises:
        ValueError: the checkpoint is of another architecture (names the file and the mismatching keys/shapes).
    """
    if isinstance(preset, str):
        name = EFFICIENTVIT_NAMES.get(preset, preset)
        if name not in AE_PRESETS:
            raise ValueError(f"unknown DC-AE {preset!r}: known {sorted(set(EFFICIENTVIT_NAMES) | set(AE_PRESETS))}")
        cfg = AE_PRESETS[name]
    else:
        cfg = preset
    state = to_diffusers_state(load_efficientvit_state(url, storage_options), cfg,
                               source=_checkpoint_file(url, storage_options))
    model = StructuredAutoencoder(cfg)
    model.net.load_state_dict(state, strict=True)
    return model.eval()


def save_with_store_scaling(ae_url: str, store_url: str, out_url: str, storage_options: dict | None = None) -> float:
    """Save the autoencoder at ``ae_url`` to ``out_url`` with the scaling factor its latent store measured (1/RMS,
    or the AE's own when it has one) in ``config.json``; returns that factor.

    Raises:
        ValueError: the store was not written with this autoencoder (names both fingerprints).
    """
    from storage.latent_store import LatentStore

    ae = StructuredAutoencoder.from_pretrained(ae_url, storage_options=storage_options)
    store = LatentStore.open(store_url, storage_options=storage_options, read_only=True)
    if store.attrs.get("ae_fingerprint") != ae.fingerprint():
        raise ValueError(f"latent store {store_url} was encoded with AE {store.attrs.get('ae_fingerprint')}, not "
                         f"{ae_url} ({ae.fingerprint()})")
    factor = float(store.scaling_factor)
    ae.save_pretrained(out_url, storage_options, scaling_factor=factor)
    return factor
