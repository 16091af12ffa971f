"""The independent judge's option (issue 32): ``ProxyConfig.rotate`` turns the 90-degree rotations off, and the
classifiers cached before the option existed keep their cache keys."""

from __future__ import annotations

import dataclasses

import torch


def test_rotate_off_is_a_new_cache_key_and_the_default_keeps_the_old_one():
    from dcae15.metrics.proxy import ProxyConfig, _key_fields
    from storage.fingerprint import fingerprint

    old = {k: v for k, v in dataclasses.asdict(ProxyConfig()).items() if k != "rotate"}  # the pre-option config
    assert fingerprint(_key_fields(ProxyConfig()), length=8) == fingerprint(old, length=8)
    judge = ProxyConfig(blur=0.0, noise=0.0, rotate=False)
    rotating = dataclasses.replace(judge, rotate=True)
    assert fingerprint(_key_fields(judge), length=8) != fingerprint(_key_fields(rotating), length=8)


def test_augment_without_rotation_blur_noise_only_flips():
    from dcae15.metrics.proxy import ProxyConfig, _augment

    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    cfg = ProxyConfig(blur=0.0, noise=0.0, rotate=False)
    gen = torch.Generator().manual_seed(0)
    for _ in range(8):
        y = _augment(x, cfg, gen)
        assert torch.equal(y, x) or torch.equal(y, x.flip(-1))
