"""deepcache: exact at interval 1, the schedule in denoiser calls (Heun included), composition with CFG
cut-off, ControlNet, batches, img2img and hires fix, no leaks between calls, few-step safety, and fidelity
floors on the trained tiny models (numbers from tools/measure_fidelity.py style runs, see the closing note)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from diffspeed import DiffspeedError, GenerateRequest, accelerate, generate
from diffspeed.core import Accelerated, Recipe, RecipeError
from diffspeed.core.unet_units import n_branches
from diffspeed.metrics import psnr, ssim
from diffspeed.optim.cfg_cutoff import CfgCutoffConfig
from diffspeed.optim.deepcache import DeepCacheConfig, full_calls
from diffspeed.resolve import Resolver

from ..pipelines.test_controlnet import TOP_LEFT, untrained  # noqa: F401  (fixture)

PROMPTS = ["a red circle at top left and a yellow star at center on a blue background",
           "a green square at bottom right on a white background",
           "a purple triangle at top on a yellow background",
           "a white star at left on a black background"]


def images(pipe, steps=20, n=4, **kw):
    kw.setdefault("guidance_scale", 7.5)
    return pipe(PROMPTS[:n], num_inference_steps=steps, output_type="np",
                generator=[torch.Generator().manual_seed(i) for i in range(n)], **kw).images


def euler(pipe):
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler.from_config(pipe.scheduler.config)


@pytest.fixture(autouse=True)
def euler_sd(tiny_sd):
    """Euler (one call per step) instead of the shipped PNDM, whose PLMS warm-up adds a call."""
    old = tiny_sd.scheduler
    tiny_sd.scheduler = euler(tiny_sd)
    yield
    tiny_sd.scheduler = old


@pytest.fixture(params=["tiny_sd", "tiny_sdxl"])
def pipe(request):
    p = request.getfixturevalue(request.param)
    old = p.scheduler
    p.scheduler = euler(p)
    yield p
    p.scheduler = old


def test_interval_one_is_exact(pipe):
    base = images(pipe, steps=12, n=2)
    with Accelerated(pipe, [DeepCacheConfig(interval=1)], strict=False) as fast:  # caches nothing: noted
        assert np.array_equal(images(fast, steps=12, n=2), base)
        assert fast.stats.get("deepcache_cached_calls", 0) == 0 and fast.stats["deepcache_full_calls"] == 12
        assert fast.stats["no_effect:deepcache"] == 1


def test_schedule_counts_denoiser_calls_with_heun(tiny_sd):
    from diffusers import HeunDiscreteScheduler

    old = tiny_sd.scheduler
    tiny_sd.scheduler = HeunDiscreteScheduler.from_config(old.config)
    try:
        with Accelerated(tiny_sd, [DeepCacheConfig(interval=3)]) as fast:
            images(fast, steps=10, n=1)
            stats = dict(fast.stats)
    finally:
        tiny_sd.scheduler = old
    assert stats["denoiser_calls"] == 19  # Heun: two UNet calls per step but the last
    assert stats["deepcache_full_calls"] == 7 and stats.get("deepcache_cached_calls", 0) == 12  # calls 0, 3, ..., 18


def test_uniform_and_non_uniform_schedules():
    c = DeepCacheConfig(interval=3)
    assert full_calls(20, c) == {0, 3, 6, 9, 12, 15, 18}
    assert full_calls(20, DeepCacheConfig(interval=3, start=0.25, end=0.75)) == set(range(5)) | {5, 8, 11, 14} | set(
        range(15, 20))
    nu = sorted(full_calls(50, DeepCacheConfig(interval=3, schedule="non-uniform", center=0.5, power=2.0)))
    assert nu[0] == 0 and len(nu) >= 14
    gaps = np.diff(nu)
    mid = [g for a, g in zip(nu, gaps) if 15 <= a <= 35]
    ends = [g for a, g in zip(nu, gaps) if a < 10 or a > 40]
    assert max(mid) < max(ends)  # denser around the centre


def test_state_does_not_leak_between_calls(tiny_sd):
    with Accelerated(tiny_sd, [DeepCacheConfig(interval=3)]) as fast:
        first = images(fast, steps=12, n=2)
        stats = dict(fast.stats)
        second = images(fast, steps=12, n=2)
        assert np.array_equal(first, second) and fast.stats == stats
        third = images(fast, steps=15, n=1)  # another length and batch: a fresh schedule and cache
        assert third.shape[0] == 1 and fast.stats["denoiser_calls"] == len(tiny_sd.scheduler.timesteps)


def test_few_steps_leave_the_run_alone_unless_forced(tiny_sd):
    base = images(tiny_sd, steps=6, n=2)
    with Accelerated(tiny_sd, [DeepCacheConfig(interval=3)]) as fast:
        assert np.array_equal(images(fast, steps=6, n=2), base)
        assert fast.stats.get("deepcache_cached_calls", 0) == 0 and any("min_steps" in e for e in fast.events)
    with Accelerated(tiny_sd, [DeepCacheConfig(interval=3, force=True)]) as fast:
        images(fast, steps=6, n=2)
        assert fast.stats.get("deepcache_cached_calls", 0) > 0


def test_max_timestep_jump_refreshes(tiny_sd):  # Euler: no repeated timesteps
    with Accelerated(tiny_sd, [DeepCacheConfig(interval=4, max_timestep_jump=1)], strict=False) as fast:
        images(fast, steps=12, n=1)  # every step moves t by ~80: every call refreshes
        assert fast.stats.get("deepcache_cached_calls", 0) == 0
        assert fast.stats["no_effect:deepcache"] == 1  # a cache never hit: the effect check's case


def test_macs_are_reported_and_match_the_skipped_share(tiny_sd):
    with Accelerated(tiny_sd, [DeepCacheConfig(interval=2, branch=0)]) as fast:
        images(fast, steps=12, n=1)
        s = fast.stats
    assert s["deepcache_total_macs"] > 0 and 0 < s["deepcache_skipped_macs"] < s["deepcache_total_macs"]
    per_call = s["deepcache_total_macs"] / 12
    share = s["deepcache_skipped_macs"] / (per_call * s["deepcache_cached_calls"])
    assert 0.5 < share < 1.0  # branch 0 skips most of the UNet on a cached call


def test_mac_counters_live_for_one_full_call_per_shape(tiny_sd):
    """The MAC counting hooks are on for the first full call of each input shape only (issue 18: per-call
    overhead): later calls and later generations of that shape reuse the count, and report the same MACs."""
    unet = tiny_sd.unet
    hooks_seen = []  # forward hooks on conv_out (a counted conv) at each UNet call
    probe = unet.conv_out.register_forward_pre_hook(lambda m, a: hooks_seen.append(len(m._forward_hooks)))
    try:
        with Accelerated(tiny_sd, [DeepCacheConfig(interval=3, branch=0)]) as fast:
            images(fast, steps=12, n=1)
            first = dict(fast.stats)
            assert hooks_seen == [1] + [0] * 11
            images(fast, steps=12, n=1)
            assert hooks_seen[12:] == [0] * 12 and fast.stats == first
            images(fast, steps=12, n=2)  # another batch: another shape, counted once more
            assert hooks_seen[24:] == [1] + [0] * 11
            assert fast.stats["deepcache_total_macs"] == 2 * first["deepcache_total_macs"]
    finally:
        probe.remove()
    assert len(unet.conv_out._forward_hooks) == 0


def test_composes_with_cfg_cutoff(tiny_sd):
    recipe = [CfgCutoffConfig(fraction=0.5), DeepCacheConfig(interval=3)]
    with Accelerated(tiny_sd, [CfgCutoffConfig(fraction=0.5)]) as fast:
        ref = images(fast, steps=12)
    with Accelerated(tiny_sd, recipe) as fast:
        out = images(fast, steps=12)
        s = fast.stats
    assert s["cfg_skipped_calls"] == 6 and s["deepcache_full_calls"] == 4 and s["deepcache_cached_calls"] == 8
    assert psnr(out, ref) > 19  # measured 21.0 dB (DeepCache alone vs the baseline at 12 steps: 24.3 dB)


def test_cache_follows_the_batch_when_cfg_is_cut(tiny_sd):
    """A feature cached with CFG (batch 2B) serves the calls after the cut-off (batch B) with its conditional
    half -- the layout is [unconditional, conditional]."""
    with Accelerated(tiny_sd, [CfgCutoffConfig(step=1), DeepCacheConfig(interval=4)]) as fast:
        point = fast.optimizations[-1]._plan.cache_point
        seen = []
        handle = point.register_forward_hook(lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out))
        try:
            images(fast, steps=12, n=2)
        finally:
            handle.remove()
        assert fast.stats["deepcache_cached_calls"] == 9
    assert seen[0].shape[0] == 4 and seen[1].shape[0] == 2
    assert torch.equal(seen[1], seen[0][2:]) and not torch.equal(seen[1], seen[0][:2])


def test_cfg_cut_from_the_start_equals_no_guidance(tiny_sd):
    """With CFG cut at call 0 every cache is conditional-only: identical to a run without guidance."""
    with Accelerated(tiny_sd, [DeepCacheConfig(interval=3)]) as fast:
        no_cfg = images(fast, steps=12, n=2, guidance_scale=1.0)
    with Accelerated(tiny_sd, [CfgCutoffConfig(fraction=0.0), DeepCacheConfig(interval=3)]) as fast:
        cut = images(fast, steps=12, n=2)
    assert np.allclose(no_cfg, cut, atol=1e-5)


def test_batch_of_four_and_fidelity(pipe):
    base = images(pipe, steps=20)
    with Accelerated(pipe, [DeepCacheConfig(interval=3)]) as fast:
        out = images(fast, steps=20)
        assert fast.stats.get("deepcache_cached_calls", 0) == 13
    # floors from measurement (test_caching_fidelity.py, diffspeed.metrics): tiny-sd 21.6 dB / 0.793, tiny-sdxl
    # (branch 3) 39.4 dB / 0.997
    floor = {"sd1": (18.5, 0.74), "sdxl": (36.0, 0.98)}
    from diffspeed.adapters import adapter_for

    p_floor, s_floor = floor[adapter_for(pipe).family]
    assert psnr(out, base) > p_floor and ssim(out, base) > s_floor


def test_deeper_branch_is_closer_to_the_baseline(tiny_sd):
    base = images(tiny_sd, steps=20, n=2)
    scores = []
    for branch in (0, 3, n_branches(tiny_sd.unet) - 1):
        with Accelerated(tiny_sd, [DeepCacheConfig(interval=3, branch=branch)]) as fast:
            scores.append(psnr(images(fast, steps=20, n=2), base))
    assert scores[0] < scores[1] < scores[2]


def test_controlnet_deep_half_is_skipped_on_cached_calls(tiny_sd, untrained):  # noqa: F811
    from diffusers import ControlNetModel

    cn = ControlNetModel.from_pretrained(untrained["sd"])
    calls = {"mid": 0}
    # inside the mid block: a skipped module is still called (its hooks fire), its insides are not
    cn.mid_block.resnets[0].register_forward_pre_hook(lambda *_: calls.update(mid=calls["mid"] + 1))
    req = dict(prompt=PROMPTS[0], seed=1, steps=12, sampler="Euler", controlnet="cn", control_image=TOP_LEFT)
    resolver = Resolver()
    resolver.add("cn", cn)
    with accelerate(tiny_sd, []) as fast:
        ref = generate(tiny_sd, GenerateRequest(**req), runner=fast, progress=False, resolver=resolver).images[0]
    calls["mid"] = 0
    with accelerate(tiny_sd, [DeepCacheConfig(interval=3)]) as fast:
        out = generate(tiny_sd, GenerateRequest(**req), runner=fast, progress=False, resolver=resolver)
    assert out.stats["deepcache_full_calls"] == 4 and calls["mid"] == 4  # ControlNet mid block: full calls only
    assert psnr(out.images[0], ref) > 16  # measured 18.7 dB
    with accelerate(tiny_sd, [CfgCutoffConfig(fraction=0.5), DeepCacheConfig(interval=3)]) as fast:
        out = generate(tiny_sd, GenerateRequest(**req), runner=fast, progress=False, resolver=resolver)
    assert out.stats.get("cfg_skipped_calls", 0) == 6 and out.images[0].size == (64, 64)


def test_img2img_and_hires(tiny_sd):
    init = Image.new("RGB", (64, 64), (30, 70, 220))
    with accelerate(tiny_sd, [DeepCacheConfig(interval=3)]) as fast:
        out = generate(tiny_sd, GenerateRequest(prompt=PROMPTS[0], seed=2, steps=20, init_image=init,
                                                denoising_strength=0.6), runner=fast, progress=False)
        assert out.stats["denoiser_calls"] == 12 and out.stats["deepcache_full_calls"] == 4  # 0, 3, 6, 9
        out = generate(tiny_sd, GenerateRequest(prompt=PROMPTS[0], seed=2, steps=12, hires_scale=1.5,
                                                denoising_strength=0.5), runner=fast, progress=False)
        assert out.images[0].size == (96, 96)
        assert out.stats["deepcache_full_calls"] + out.stats.get("deepcache_cached_calls", 0) == 12 + 6


def test_bad_settings_name_the_field(tiny_sd):
    with pytest.raises(DiffspeedError) as err:
        DeepCacheConfig(interval=0)
    assert err.value.field == "interval"
    with pytest.raises(DiffspeedError) as err:
        DeepCacheConfig(start=0.8, end=0.5)
    assert err.value.field == "end"
    with pytest.raises(RecipeError, match="branch 40 is outside 0..8"):
        Accelerated(tiny_sd, [DeepCacheConfig(branch=40)])
    with pytest.raises(RecipeError, match="compile"):
        Recipe.from_dict({"optimization": [{"name": "deepcache"}, {"name": "compile"}]}).validate(tiny_sd)


@pytest.mark.parametrize("branch", [0, 4])
def test_same_images_as_the_deepcache_package(tiny_sd, branch):
    """The authors' DeepCacheSDHelper at the same interval and branch (with Euler, whose timesteps do not
    repeat, so its timestep lookup counts right) makes the same images."""
    pytest.importorskip("DeepCache")
    from diffspeed.bench.peers import deepcache_package

    disable = deepcache_package(3, branch).enable(tiny_sd)
    try:
        theirs = images(tiny_sd, steps=12, n=2)
    finally:
        disable()
    with Accelerated(tiny_sd, [DeepCacheConfig(interval=3, branch=branch)]) as fast:
        ours = images(fast, steps=12, n=2)
    assert np.allclose(ours, theirs, atol=1e-6)


def test_hires_reuse_starts_the_second_pass_from_the_first(tiny_sd):
    req = GenerateRequest(prompt=PROMPTS[0], seed=2, steps=12, sampler="Euler", hires_scale=2.0,
                          denoising_strength=0.5)
    with accelerate(tiny_sd, [DeepCacheConfig(interval=3)]) as fast:
        plain = generate(tiny_sd, req, runner=fast, progress=False)
    with accelerate(tiny_sd, [DeepCacheConfig(interval=3, hires_reuse=True)]) as fast:
        reuse = generate(tiny_sd, req, runner=fast, progress=False)
    p, r = plain.stats, reuse.stats
    assert r["deepcache_hires_reused"] == 1 and "deepcache_hires_reused" not in p
    # first pass 12 calls (4 full), second 6 calls: 2 full without reuse, 1 with (its first call is cached)
    assert p["deepcache_full_calls"] == 6 and r["deepcache_full_calls"] == 5
    a, b = plain.images[0], reuse.images[0]
    assert reuse.images[0].size == (128, 128) and 0 < psnr(a, b) < math.inf
    assert psnr(a, b) > 15  # measured 17.9 dB


def test_few_step_sampler_is_left_alone(tiny_sd):
    from diffusers import LCMScheduler

    old = tiny_sd.scheduler
    tiny_sd.scheduler = LCMScheduler.from_config(old.config)
    try:
        base = images(tiny_sd, steps=12, n=1)
        with Accelerated(tiny_sd, [DeepCacheConfig(interval=3)]) as fast:
            assert np.array_equal(images(fast, steps=12, n=1), base)
            assert any("LCMScheduler is a few-step sampler" in e for e in fast.events)
    finally:
        tiny_sd.scheduler = old
