"""tgate: cross-attention is computed until the gate and served from the cache after it (counted), never
when the gate is past the end; it follows a CFG cut-off; few steps are left alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffspeed.core import Accelerated
from diffspeed.metrics import psnr
from diffspeed.optim.cfg_cutoff import CfgCutoffConfig
from diffspeed.optim.tgate import TgateConfig


@pytest.fixture(autouse=True)
def euler_sd(tiny_sd):
    """Euler (one call per step) instead of the shipped PNDM, whose PLMS warm-up adds a call."""
    from diffusers import EulerDiscreteScheduler

    old = tiny_sd.scheduler
    tiny_sd.scheduler = EulerDiscreteScheduler.from_config(old.config)
    yield
    tiny_sd.scheduler = old


def images(pipe, steps=12, **kw):
    return pipe(["a red circle at top left on a blue background"] * 2, num_inference_steps=steps,
                output_type="np", generator=[torch.Generator().manual_seed(i) for i in range(2)], **kw).images


def n_cross(pipe) -> int:
    return sum(1 for n, m in pipe.unet.named_modules() if n.endswith(".attn2"))


def test_gate_counts_and_fidelity(tiny_sd):
    base = images(tiny_sd)
    attn2_calls = {"n": 0}
    first = next(m for n, m in tiny_sd.unet.named_modules() if n.endswith(".attn2"))
    handle = first.to_q.register_forward_hook(lambda *_: attn2_calls.update(n=attn2_calls["n"] + 1))
    try:
        with Accelerated(tiny_sd, [TgateConfig(gate_step=5)]) as fast:
            out = images(fast)
            assert fast.stats["tgate_cached_calls"] == 7 * n_cross(tiny_sd)
    finally:
        handle.remove()
    assert attn2_calls["n"] == 5  # that layer attended on calls 0-4 only
    assert psnr(out, base) > 28  # measured 33.9 dB at gate 0.4 of 20 steps


def test_gate_past_the_end_is_exact(tiny_sd):
    base = images(tiny_sd)
    with Accelerated(tiny_sd, [TgateConfig(gate_fraction=1.0)], strict=False) as fast:  # never gates: noted
        assert np.array_equal(images(fast), base) and "tgate_cached_calls" not in fast.stats
        assert fast.stats["no_effect:tgate"] == 1


def test_follows_cfg_cutoff_and_averages(tiny_sd):
    with Accelerated(tiny_sd, [CfgCutoffConfig(fraction=0.75), TgateConfig(gate_step=4)]) as fast:
        out = images(fast)
        assert fast.stats["cfg_skipped_calls"] == 3 and fast.stats["tgate_cached_calls"] == 8 * n_cross(tiny_sd)
    with Accelerated(tiny_sd, [TgateConfig(gate_step=4, average=True)]) as fast:
        avg = images(fast)
    assert np.isfinite(out).all() and not np.array_equal(out, avg)


def test_few_steps_left_alone(tiny_sd):
    base = images(tiny_sd, steps=6)
    with Accelerated(tiny_sd, [TgateConfig()]) as fast:
        assert np.array_equal(images(fast, steps=6), base) and any("min_steps" in e for e in fast.events)
