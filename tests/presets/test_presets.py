"""The goal presets: each loads, validates on the tiny models, and keeps its promise relative to the others."""

import numpy as np
import pytest
import torch

from diffspeed.core import Accelerated
from diffspeed.errors import DiffspeedError
from diffspeed.presets import PRESETS, load_preset, preset_recipe

PROMPT = "a purple triangle at center on an orange background"


def test_every_preset_says_what_it_is_for_and_what_it_was_chosen_on():
    assert PRESETS == ("quality", "balanced", "fastest", "low-vram-8gb", "low-vram-6gb", "low-vram-4gb")
    for name in PRESETS:
        preset = load_preset(name)
        assert len(preset.description) > 80 and "benchmarks/" in preset.chosen_on, name
        assert preset.entries["cuda"] and preset.entries["cpu"], name


@pytest.mark.parametrize("name", PRESETS)
def test_cpu_recipes_validate_on_both_tiny_models(name, tiny_sd, tiny_sdxl):
    recipe = preset_recipe(name, "cpu")
    assert recipe.check(tiny_sd) == [] and recipe.check(tiny_sdxl) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-machine refusal")
@pytest.mark.parametrize("name", PRESETS)
def test_cuda_recipes_only_miss_the_gpu_here(name):
    try:
        preset_recipe(name, "cuda")
    except DiffspeedError as err:
        assert all("needs a CUDA device" in p for p in err.problems), err.problems


@pytest.mark.gpu
@pytest.mark.parametrize("name", PRESETS)
def test_cuda_recipes_validate_on_a_gpu(name, tiny_sd):
    assert preset_recipe(name, "cuda").check(tiny_sd.to("cuda")) == []


def test_unknown_preset_names_the_field():
    with pytest.raises(DiffspeedError) as err:
        load_preset("turbo")
    assert err.value.field == "preset" and "quality, balanced, fastest" in str(err.value)


def _image(pipe, recipe, steps=12):
    with Accelerated(pipe, recipe) as fast:
        out = fast([PROMPT], num_inference_steps=steps, guidance_scale=5.0, output_type="np",
                   generator=[torch.Generator().manual_seed(11)])
        return out.images[0], dict(fast.stats)


def _psnr(a, b):
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1 / mse)


@pytest.fixture
def dpm(tiny_sd):
    """The sampler diffspeed generate and bench default to (DeepCache suits it better than PNDM)."""
    from diffspeed.pipelines.samplers import get_sampler

    original = tiny_sd.scheduler
    tiny_sd.scheduler = get_sampler("DPM++ 2M").build(original.config)
    yield tiny_sd
    tiny_sd.scheduler = original


def test_presets_trade_fidelity_for_work_in_order(dpm):
    tiny_sd = dpm
    base, _ = _image(tiny_sd, [])
    results = {n: _image(tiny_sd, preset_recipe(n, "cpu")) for n in ("quality", "balanced", "fastest")}
    psnr = {n: _psnr(img, base) for n, (img, _) in results.items()}
    full = {n: stats.get("deepcache_full_calls", stats["denoiser_calls"]) for n, (_, stats) in results.items()}
    assert psnr["quality"] > 35  # bf16 rounding only
    assert psnr["quality"] > psnr["balanced"] > psnr["fastest"] > 15
    assert full["fastest"] < full["balanced"] < full["quality"] == results["quality"][1]["denoiser_calls"]
    assert results["fastest"][1]["cfg_skipped_calls"] > 0


def test_low_vram_cpu_presets_keep_the_image(tiny_sd):
    base, _ = _image(tiny_sd, [], steps=6)
    for name in ("low-vram-8gb", "low-vram-6gb", "low-vram-4gb"):
        image, stats = _image(tiny_sd, preset_recipe(name, "cpu"), steps=6)
        assert _psnr(image, base) > 25, name  # bf16 weights and tiled decode: rounding-level changes
    assert stats["staged_released_bytes"] > 0
