"""Ranges and choices declared with a config's fields (``dcae15.typed_config``): checked on construction, on
``from_dict`` and on partial overrides, with the dotted path, the value and the allowed range in the message; the
identity marks (``OPERATIONAL`` / ``HORIZON``) merge with them."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from dcae15.typed_config import above, at_least, between, check_declared, check_fields, from_dict, one_of
from storage.rundir import HORIZON, OPERATIONAL, identity


@dataclass(kw_only=True)
class Inner:
    mode: str = field(default="a", metadata=one_of("a", "b"))

    def __post_init__(self) -> None:
        check_declared(self)


@dataclass(kw_only=True)
class Cfg:
    steps: int = field(default=10, metadata={**HORIZON, **at_least(1)})
    workers: int = field(default=0, metadata={**OPERATIONAL, **at_least(0)})
    lr: float = field(default=0.1, metadata=above(0))
    decay: float | None = field(default=None, metadata=between(0, 1, hi_open=True))
    betas: tuple[float, float] = field(default=(0.9, 0.99), metadata=between(0, 1, hi_open=True, each=2))
    kinds: tuple[str, ...] = field(default=("x",), metadata=one_of("x", "y", each=True))
    inner: Inner = field(default_factory=Inner)

    def __post_init__(self) -> None:
        if isinstance(self.inner, dict):
            self.inner = Inner(**self.inner)
        check_declared(self)


@pytest.mark.parametrize("kw, message", [
    ({"steps": 0}, "Cfg.steps=0 must be >= 1"),
    ({"workers": -1}, "Cfg.workers=-1 must be >= 0"),
    ({"lr": 0.0}, "Cfg.lr=0.0 must be > 0"),
    ({"lr": float("nan")}, "Cfg.lr=nan must be > 0"),
    ({"decay": 1.0}, "Cfg.decay=1.0 must be in [0, 1) or None"),
    ({"betas": (0.9, 1.5)}, "Cfg.betas=(0.9, 1.5) must be 2 values, each in [0, 1)"),
    ({"betas": (0.9,)}, "Cfg.betas=(0.9,) must be 2 values, each in [0, 1)"),
    ({"kinds": ("x", "z")}, "Cfg.kinds=('x', 'z'); allowed for each of its values: 'x', 'y'"),
])
def test_a_bad_value_names_the_field_the_value_and_the_range(kw, message):
    with pytest.raises(ValueError) as err:
        Cfg(**kw)
    assert str(err.value) == message
    Cfg(decay=None, betas=(0.0, 0.5), kinds=("y", "x"))  # None where the annotation takes it; the edges in range


def test_from_dict_and_partial_overrides_name_the_dotted_path():
    with pytest.raises(ValueError, match=r"^run\.train\.steps=0 must be >= 1$"):
        from_dict(Cfg, {"steps": 0}, "run.train")
    with pytest.raises(ValueError, match=r"^run\.train\.inner\.mode='c'; allowed: 'a', 'b'$"):
        from_dict(Cfg, {"inner": {"mode": "c"}}, "run.train")
    with pytest.raises(ValueError, match=r"^phases\[1\]\.lr=-1 must be > 0$"):  # an override, before any merge
        check_fields(Cfg, {"lr": -1}, "phases[1]")
    assert check_fields(Cfg, {"decay": None}, "p") == {"decay": None}


def test_declared_checks_leave_the_identity_marks_alone():
    cfg = Cfg()
    assert set(identity(cfg)) == {"lr", "decay", "betas", "kinds", "inner"}  # not workers (operational), not steps
    assert "steps" in identity(cfg, keep_horizon=True)


def test_the_trainers_configs_declare_their_ranges():
    from dcae15.ae.train import AETrainConfig
    from dcae15.diffusion.train import DiffusionTrainConfig

    with pytest.raises(ValueError, match=r"^diffusion\.train\.label_dropout=1\.0 must be in \[0, 1\)$"):
        DiffusionTrainConfig.from_dict({"label_dropout": 1.0}, "diffusion.train")
    with pytest.raises(ValueError, match=r"^autoencoder\.train\.ema_decay=1\.0 must be in \(0, 1\) or None$"):
        AETrainConfig.from_dict({"ema_decay": 1.0}, "autoencoder.train")
    assert AETrainConfig(phase="refinement").betas == (0.5, 0.9)  # None takes the phase default after the checks
