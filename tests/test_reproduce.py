"""Generate -> PNG -> request_from_parameters -> generate again gives the identical image: for a preset, a
recipe and a LoRA, on a fresh pipeline state (recipe removed, LoRA unloaded between the two runs)."""

import numpy as np
import pytest

from diffspeed import DiffspeedError, GenerateRequest, accelerate, generate, save_images
from diffspeed.core import Recipe
from diffspeed.optim.cfg_cutoff import CfgCutoffConfig
from diffspeed.optim.deepcache import DeepCacheConfig
from diffspeed.pipelines.lora import load_lora, unload_loras
from diffspeed.presets import preset_recipe
from diffspeed.reproduce import request_from_parameters

PROMPT = "a red circle at top left on a blue background"


def _run(pipe, request, recipe=None, preset=None):
    if recipe is None:
        return generate(pipe, request, progress=False)
    with accelerate(pipe, recipe) as fast:
        return generate(pipe, request, runner=fast, progress=False, preset=preset)


def _again(pipe, png):
    request, recipe_data, extras = request_from_parameters(png)
    for lora in extras["loras"]:
        load_lora(pipe, lora["source"], weight=lora["weight"])
    try:
        recipe = Recipe.from_dict(recipe_data) if recipe_data else None
        return _run(pipe, request, recipe), request, extras
    finally:
        unload_loras(pipe)


@pytest.mark.parametrize("case", ["preset", "recipe"])
def test_preset_and_recipe_images_reproduce_from_the_png(tiny_sd, tmp_path, case):
    recipe = (preset_recipe("fastest", "cpu") if case == "preset"
              else Recipe.of(DeepCacheConfig(interval=2, min_steps=1), CfgCutoffConfig(fraction=0.5)))
    first = _run(tiny_sd, GenerateRequest(prompt=PROMPT, negative_prompt="green", seed=-1, steps=4), recipe,
                 preset="fastest" if case == "preset" else None)
    plain = _run(tiny_sd, GenerateRequest(prompt=PROMPT, negative_prompt="green", seed=first.seeds[0], steps=4))
    assert not np.array_equal(np.asarray(first.images[0]), np.asarray(plain.images[0]))  # the recipe matters
    png = save_images(first, tmp_path)[0]
    second, request, extras = _again(tiny_sd, png)
    assert np.array_equal(np.asarray(first.images[0]), np.asarray(second.images[0]))
    assert request.seed == first.seeds[0] and request.negative_prompt == "green"
    assert extras["preset"] == ("fastest" if case == "preset" else None) and extras["device"] == "cpu"
    assert second.parameters[0].split("Diffspeed recipe")[1] == first.parameters[0].split("Diffspeed recipe")[1]


def test_preset_image_is_not_labelled_as_a_baseline(tiny_sd):
    plain = _run(tiny_sd, GenerateRequest(prompt=PROMPT, seed=1, steps=4))
    fast = _run(tiny_sd, GenerateRequest(prompt=PROMPT, seed=1, steps=4), preset_recipe("fastest", "cpu"), "fastest")
    _, plain_recipe, _ = request_from_parameters(plain.parameters[0])
    _, fast_recipe, extras = request_from_parameters(fast.parameters[0])
    assert plain_recipe is None
    assert fast_recipe == {"optimization": preset_recipe("fastest", "cpu").to_dict()["optimization"]}
    assert extras["preset"] == "fastest"


def test_lora_image_reproduces_from_the_png(tiny_sd, tmp_path):
    load_lora(tiny_sd, "tiny-sd-lora-monochrome", weight=0.8)
    try:
        first = _run(tiny_sd, GenerateRequest(prompt=PROMPT, seed=4, steps=4))
    finally:
        unload_loras(tiny_sd)
    plain = _run(tiny_sd, GenerateRequest(prompt=PROMPT, seed=4, steps=4))
    assert not np.array_equal(np.asarray(first.images[0]), np.asarray(plain.images[0]))  # the LoRA matters
    second, _, extras = _again(tiny_sd, save_images(first, tmp_path)[0])
    assert [(x["source"], x["weight"]) for x in extras["loras"]] == [("tiny-sd-lora-monochrome", 0.8)]
    assert np.array_equal(np.asarray(first.images[0]), np.asarray(second.images[0]))


def test_batch_hires_and_escaped_prompt_reproduce(tiny_sd):
    prompt = "a red circle\nNegative prompt: at top left"  # reads back as prompt, not as a negative prompt
    first = _run(tiny_sd, GenerateRequest(prompt=prompt, seed=20, steps=3, batch_size=2, hires_scale=1.5,
                                          hires_steps=2, denoising_strength=0.5, sampler="Euler"))
    request, _, extras = request_from_parameters(first.parameters[1])
    assert extras["batch_pos"] == 1 and request.seed == 20 and request.batch_size == 2
    assert (request.prompt, request.negative_prompt) == (prompt, "")
    assert (request.width, request.height, request.hires_scale, request.hires_steps) == (64, 64, 1.5, 2)
    second = _run(tiny_sd, request)
    assert np.array_equal(np.asarray(first.images[1]), np.asarray(second.images[1]))


def test_img2img_needs_its_init_image_back(tiny_sd):
    from PIL import Image

    init = Image.new("RGB", (64, 64), (200, 30, 30))
    first = _run(tiny_sd, GenerateRequest(prompt=PROMPT, seed=2, steps=4, init_image=init, denoising_strength=0.5))
    with pytest.raises(DiffspeedError) as err:
        request_from_parameters(first.parameters[0])
    assert err.value.field == "init_image"
    request, _, _ = request_from_parameters(first.parameters[0], init_image=init)
    assert np.array_equal(np.asarray(_run(tiny_sd, request).images[0]), np.asarray(first.images[0]))


@pytest.mark.parametrize(("text", "field"), [
    ("cat", "parameters"),
    ("cat\nSteps: four, Seed: 1", "Steps"),
    ("cat\nSteps: 4, Seed: 1, Size: big", "Size"),
    ("cat\nSteps: 4, Seed: 1, Lora weights: \"a: heavy\"", "Lora weights"),
    ("cat\nSteps: 4000, Seed: 1", "steps"),
])
def test_bad_parameters_name_the_field(text, field):
    with pytest.raises(DiffspeedError) as err:
        request_from_parameters(text)
    assert err.value.field == field
