"""Backbones given by import path (``package.module:factory``): resolve, fingerprint, build and check them.

The contract (docs/backbones.md): ``factory(in_channels=C, input_size=(H, W), num_classes=K, **model_overrides)``
returns an ``nn.Module`` whose ``forward(x, t, y)`` maps x (B, C, H, W) float32, t (B,) float model time in
[0, 1000] and y (B,) int64 labels in [0, K] (K = the null class of classifier-free guidance) to a float32 tensor
shaped like x. An optional ``blocks_to_shard`` (an iterable of submodules) gives FSDP2 its per-block units.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

__all__ = ["PLUGIN_ARCH", "BackboneError", "PluginConfig", "is_import_path", "resolve_factory", "source_fingerprint",
           "build_plugin", "check_backbone"]

PLUGIN_ARCH = "plugin"
_IMPORT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")


class BackboneError(ValueError):
    """A backbone given by import path cannot be imported, built or used (the message names the entry)."""


def is_import_path(name: str) -> bool:
    """True for ``package.module:factory`` (the spelling of a plug-in backbone), False for a preset name."""
    return isinstance(name, str) and bool(_IMPORT_PATH.match(name))


def _split(path: str) -> tuple[str, str]:
    if not is_import_path(path):
        raise BackboneError(f"backbone {path!r}: expected 'package.module:factory'")
    module, _, attr = path.partition(":")
    return module, attr


def resolve_factory(path: str) -> Callable[..., nn.Module]:
    """The factory named by ``path``.

    Raises:
        BackboneError: the module cannot be imported (its own error is chained), has no such attribute, or the
            attribute is not callable.
    """
    module, attr = _split(path)
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - any failure of the user's module is reported the same way
        raise BackboneError(f"backbone {path!r}: module {module!r} cannot be imported ({type(e).__name__}: {e}); "
                            "put its package on PYTHONPATH (every process that trains or samples needs it)") from e
    if not hasattr(mod, attr):
        raise BackboneError(f"backbone {path!r}: module {module!r} has no attribute {attr!r}")
    factory = getattr(mod, attr)
    if not callable(factory):
        raise BackboneError(f"backbone {path!r}: {attr!r} is a {type(factory).__name__}, expected a callable "
                            "factory(in_channels=..., input_size=..., num_classes=..., **model_overrides)")
    return factory


def source_fingerprint(path: str) -> str:
    """sha256 (16 hex digits) of the source file of ``path``'s module: part of the run's identity, so editing the
    model code starts a new run instead of resuming the old one.

    Raises:
        BackboneError: the module cannot be found or has no source file.
    """
    module, _ = _split(path)
    try:
        spec = importlib.util.find_spec(module)
    except Exception as e:  # noqa: BLE001 - a parent package that fails to import
        raise BackboneError(f"backbone {path!r}: module {module!r} cannot be found ({type(e).__name__}: {e}); "
                            "put its package on PYTHONPATH") from e
    if spec is None or not spec.origin or not spec.has_location:
        raise BackboneError(f"backbone {path!r}: module {module!r} cannot be found (or has no source file); "
                            "put its package on PYTHONPATH")
    with open(spec.origin, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


@dataclass(kw_only=True)
class PluginConfig:
    """A backbone built by an import-path factory, with the data shape it runs on (what ``config.yaml`` records
    under ``model_config``: sampling and export rebuild the model from it)."""

    factory: str
    """``package.module:factory``."""
    in_channels: int
    input_size: tuple[int, int]
    num_classes: int
    """Real classes; label ``num_classes`` is the null class for classifier-free guidance."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments of the factory (``diffusion.train.model_overrides``)."""
    source_fingerprint: str | None = None
    """``source_fingerprint(factory)`` when the run was configured."""
    arch: str = PLUGIN_ARCH
    """Always 'plugin' (tells this config from a preset's ``ModelConfig`` in a config.yaml)."""

    def __post_init__(self) -> None:
        _split(self.factory)
        self.input_size = tuple(int(v) for v in self.input_size)  # YAML gives lists
        if self.arch != PLUGIN_ARCH:
            raise ValueError(f"PluginConfig.arch={self.arch!r}; must be {PLUGIN_ARCH!r}")
        if len(self.input_size) != 2:
            raise ValueError(f"PluginConfig.input_size={self.input_size!r} must be (H, W)")
        for name in ("in_channels", "num_classes"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"PluginConfig.{name}={getattr(self, name)!r} must be >= 1")
        if not isinstance(self.kwargs, dict):
            raise ValueError(f"PluginConfig.kwargs must be a dict (model_overrides), got {self.kwargs!r}")


def build_plugin(cfg: PluginConfig) -> nn.Module:
    """Call the factory of ``cfg`` (on the default device, e.g. under ``torch.device('meta')``).

    A source file that changed since the run was configured gives a warning (the weights may not fit the code).

    Raises:
        BackboneError: not importable / not callable / the factory failed / it returned no ``nn.Module``.
    """
    factory = resolve_factory(cfg.factory)
    if cfg.source_fingerprint is not None:
        now = source_fingerprint(cfg.factory)
        if now != cfg.source_fingerprint:
            warnings.warn(f"backbone {cfg.factory!r}: its source file changed since the run was configured "
                          f"(fingerprint {cfg.source_fingerprint} then, {now} now)", stacklevel=2)
    kw = dict(in_channels=int(cfg.in_channels), input_size=tuple(cfg.input_size), num_classes=int(cfg.num_classes),
              **cfg.kwargs)
    try:
        model = factory(**kw)
    except Exception as e:  # noqa: BLE001 - name the entry and the arguments it got
        raise BackboneError(f"backbone {cfg.factory!r}: the factory failed when called with {kw} "
                            f"({type(e).__name__}: {e})") from e
    if not isinstance(model, nn.Module):
        raise BackboneError(f"backbone {cfg.factory!r}: the factory returned a {type(model).__name__}, expected a "
                            "torch.nn.Module")
    return model


@torch.no_grad()
def check_backbone(model: nn.Module, cfg: PluginConfig) -> None:
    """One forward on a tiny batch, before training starts: output a float32 tensor shaped like x, finite, and
    dependent on the label.

    The batch holds one (x, t) twice with labels 0 and the null class; equal outputs mean ``forward`` ignores
    ``y``. A zero-initialised output layer (adaLN-Zero) also gives equal outputs, so they are compared again with
    every parameter perturbed (a copy, the model is left as it was): a network that uses ``y`` anywhere shows it
    then. ``blocks_to_shard``, when present, must list submodules of the model.

    Raises:
        BackboneError: naming the entry and what was expected.
    """
    name = cfg.factory
    blocks = getattr(model, "blocks_to_shard", None)
    if blocks is not None:
        mods = {id(m) for m in model.modules()}
        try:
            listed = list(blocks)
        except TypeError:
            listed = None
        if listed is None or not all(isinstance(b, nn.Module) and id(b) in mods for b in listed):
            raise BackboneError(f"backbone {name!r}: blocks_to_shard must be an iterable of the model's own "
                                f"submodules, got {type(blocks).__name__}")
    c, (h, w), k = cfg.in_channels, cfg.input_size, cfg.num_classes
    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, c, h, w, generator=gen).expand(2, c, h, w).contiguous().to(device)
    t = torch.full((2,), 500.0, device=device)
    y = torch.tensor([0, k], dtype=torch.long, device=device)  # a real class and the null class
    was_training = model.training
    model.eval()  # dropout would make the two rows differ by chance
    try:
        try:
            out = model(x, t, y)
        except Exception as e:  # noqa: BLE001
            raise BackboneError(f"backbone {name!r}: forward(x, t, y) failed on x {tuple(x.shape)} float32, t (2,) "
                                f"float32, y (2,) int64 ({type(e).__name__}: {e})") from e
        if not isinstance(out, torch.Tensor):
            raise BackboneError(f"backbone {name!r}: forward returned a {type(out).__name__}, expected a tensor "
                                f"shaped like x {tuple(x.shape)}")
        if tuple(out.shape) != tuple(x.shape):
            raise BackboneError(f"backbone {name!r}: forward returned shape {tuple(out.shape)}, expected the shape "
                                f"of x {tuple(x.shape)} (in_channels={c}, input_size={(h, w)})")
        if out.dtype != x.dtype:
            raise BackboneError(f"backbone {name!r}: forward returned dtype {out.dtype}, expected {x.dtype} like x "
                                "(mixed precision is the trainer's job: autocast / FSDP2's policy)")
        if not torch.isfinite(out).all():
            raise BackboneError(f"backbone {name!r}: forward returned non-finite values at initialisation")
        if torch.equal(out[0], out[1]) and torch.equal(*_perturbed_rows(model, x, t, y)):
            raise BackboneError(f"backbone {name!r}: forward ignores y: labels 0 and {k} (the null class) gave equal "
                                "outputs for the same x and t, even with perturbed weights; expected a "
                                "class-conditional model (classifier-free guidance needs the null class)")
    finally:
        model.train(was_training)


def _perturbed_rows(model: nn.Module, x, t, y) -> tuple[torch.Tensor, torch.Tensor]:
    from torch.func import functional_call

    gen = torch.Generator(device=x.device).manual_seed(1)
    state = {n: p + 0.1 * torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype)
             for n, p in model.named_parameters() if p.is_floating_point()}
    out = functional_call(model, state, (x, t, y))
    return out[0], out[1]
