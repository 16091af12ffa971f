"""The EMA and the learning-rate schedule both trainers share (dcae15.ema, dcae15.lr_schedule)."""

import math

import pytest
import torch
from torch import nn

from dcae15.ema import EMA, decay_at
from dcae15.lr_schedule import lr_at


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))


def test_ema_with_buffers_is_the_per_tensor_average_of_the_state_dict():
    """What the AE trainer keeps: parameters and BatchNorm running statistics averaged, the batch counter copied,
    every entry fp32 and keyed like ``state_dict()`` (the checkpoint format)."""
    net = _net().train()
    ema = EMA(net, buffers=True)
    assert list(ema.state_dict()) == list(net.state_dict())
    assert all(t.dtype == torch.float32 for t in ema.state_dict().values())
    ref = {k: v.detach().float().clone() for k, v in net.state_dict().items()}
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for decay in (0.5, 0.9, 0.99):
        net(torch.randn(2, 3, 8, 8)).square().mean().backward()  # also moves the running statistics
        opt.step()
        opt.zero_grad()
        ema.update(decay)
        for k, v in net.state_dict().items():
            ref[k] = ref[k].lerp(v.float(), 1 - decay) if v.is_floating_point() else v.float()
    for k, v in ema.state_dict().items():
        torch.testing.assert_close(v, ref[k], rtol=0, atol=0)
    assert float(ema.state_dict()["1.num_batches_tracked"]) == 3.0
    assert not torch.equal(ema.state_dict()["1.running_mean"], net.state_dict()["1.running_mean"])


def test_ema_state_round_trips_and_refuses_another_model():
    net = _net()
    ema = EMA(net, buffers=True)
    saved = {k: v.clone() + 1 for k, v in ema.state_dict().items()}
    again = EMA(_net(), buffers=True)
    again.load_state_dict(saved)
    assert all(torch.equal(again.state_dict()[k], saved[k]) for k in saved)
    again.update(0.5)  # the update still works on the loaded (in-place) shadow
    assert not torch.equal(again.state_dict()["0.weight"], saved["0.weight"])
    params_only = EMA(_net())
    assert set(params_only.state_dict()) == {n for n, _ in net.named_parameters()}
    with pytest.raises(ValueError, match="does not match"):
        params_only.load_state_dict(saved)
    with pytest.raises(ValueError, match="fp32"):
        EMA(_net().to(torch.bfloat16))


def test_ema_decay_warmup():
    assert decay_at(0.9999, 0) == 0.9999
    assert decay_at(0.9999, 0, warmup=True) == pytest.approx(0.1)
    assert decay_at(0.9999, 90, warmup=True) == pytest.approx(0.91)
    assert decay_at(0.9, 10**6, warmup=True) == 0.9


def test_lr_schedule_warmup_constant_cosine():
    assert [lr_at(s, 1.0, warmup_steps=4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_at(0, 2.0) == 2.0
    cos = [lr_at(s, 1.0, warmup_steps=2, schedule="cosine", total_steps=12) for s in range(14)]
    assert cos[:2] == [0.5, 1.0] and cos[2] == 1.0
    assert cos[7] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert cos[12] == pytest.approx(0.0, abs=1e-12) and cos[13] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(cos[2:], cos[3:]))
    with pytest.raises(ValueError, match="allowed"):
        lr_at(0, 1.0, schedule="linear")
    with pytest.raises(ValueError, match="total_steps"):
        lr_at(5, 1.0, schedule="cosine")


def test_exponential_ema_warmup_is_efficientvits_and_keeps_other_run_ids():
    """``ema_warmup_steps`` T: decay_t = decay (1 - exp(-t / T)) with t the step the update produces
    (efficientvit's ``EMA.step``, DC-Gen's USiT); unset, run ids are what they were before the field existed."""
    import math

    from dcae15.diffusion.train import DiffusionTrainConfig
    from dcae15.ema import decay_at

    assert decay_at(0.9999, 0, warmup_steps=2000) == pytest.approx(0.9999 * (1 - math.exp(-1 / 2000)), rel=1e-12)
    assert decay_at(0.9999, 1999, warmup=True, warmup_steps=2000) == pytest.approx(0.9999 * (1 - math.exp(-1)))
    assert decay_at(0.9999, 10**6, warmup_steps=2000) == pytest.approx(0.9999, abs=1e-12)
    plain = DiffusionTrainConfig()
    assert "ema_warmup_steps" not in plain.identity() and "ema_warmup" in plain.identity()
    exp = DiffusionTrainConfig(ema_warmup_steps=2000)
    assert exp.identity()["ema_warmup_steps"] == 2000 and "ema_warmup" not in exp.identity()
    with pytest.raises(ValueError, match="ema_warmup_steps"):
        DiffusionTrainConfig(ema_warmup_steps=0)
