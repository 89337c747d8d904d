"""The shipped tiny-sd-lcm-lora: 4 LCM steps without guidance still draw the prompt.

Its card's numbers (60 held-out prompts, tiny-sd's recommended 20-step setting vs 4 LCM steps, end to end) are
re-measured by the slow test; the fast one checks a handful of held-out prompts against the same LoRA switched
off, so a LoRA that stopped loading (or loaded half) fails it.
"""

from __future__ import annotations

import pytest
import torch

from diffspeed.core import Accelerated
from diffspeed.optim.accelerator import AcceleratorConfig
from diffspeed.pipelines.lora import resolve_lora_path
from diffspeed.tiny.check import few_step_check, run_colour_check
from diffspeed.tiny.data import held_out_scenes


def test_shipped_file_is_in_the_released_lcm_lora_layout():
    from safetensors.torch import load_file

    sd = load_file(resolve_lora_path("tiny-sd-lcm-lora"))
    assert all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))
               for k in sd)
    assert {v.dtype for v in sd.values()} == {torch.float16}


def test_four_lcm_steps_draw_the_prompt(tiny_sd):
    """12 held-out prompts, 4 LCM steps, CFG 1. Measured: with the LoRA background 9/12, shape 11/12; the same
    sampler without it 7/12 and 10/12 (the card's 60-prompt numbers: 75 % / 82 % vs 62 % / 75 %)."""
    scenes = held_out_scenes()[:12]
    with Accelerated(tiny_sd, [AcceleratorConfig(method="lcm")]) as fast:
        assert type(tiny_sd.scheduler).__name__ == "LCMScheduler"
        distilled = run_colour_check(fast, scenes, steps=4, guidance_scale=1.0, seed=0)
        assert fast.stats["denoiser_calls"] == 4  # one batched call of 12 prompts, no CFG batch
        lcm_scheduler = tiny_sd.scheduler
    original = tiny_sd.scheduler
    tiny_sd.scheduler = lcm_scheduler  # the same sampler, LoRA off
    try:
        plain = run_colour_check(tiny_sd, scenes, steps=4, guidance_scale=1.0, seed=0)
    finally:
        tiny_sd.scheduler = original
    assert distilled.background_accuracy >= 0.75 and distilled.shape_accuracy >= 0.75, distilled
    assert distilled.background_accuracy + distilled.shape_accuracy > plain.background_accuracy + \
        plain.shape_accuracy, (distilled, plain)


@pytest.mark.slow
def test_card_numbers_hold():
    """The issue's bar on the 60 held-out prompts: 4 LCM steps within 10 points of tiny-sd's recommended 20-step
    setting in background and shape accuracy, and >= 4x faster end to end in the same run."""
    base, lcm, *_ = few_step_check("tiny-sd", prompts=60, rounds=1)
    assert (base.steps, base.cfg_scale, lcm.steps, lcm.cfg_scale, lcm.sampler) == (20, 3.0, 4, 1.0, "LCM")
    assert base.background_accuracy - lcm.background_accuracy <= 0.10 + 1e-9, (base, lcm)
    assert base.shape_accuracy - lcm.shape_accuracy <= 0.10 + 1e-9, (base, lcm)
    assert base.seconds_per_image / lcm.seconds_per_image >= 4.0, (base, lcm)  # measured 6.1x: a wide margin
