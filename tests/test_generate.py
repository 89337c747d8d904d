import json
import warnings

import numpy as np
import pytest
import torch

from diffspeed import DiffspeedError, GenerateRequest, accelerate, generate, save_images
from diffspeed.core import Recipe
from diffspeed.errors import DiffspeedRuntimeError
from diffspeed.generate import resolve_sampling
from diffspeed.optim.sampler import SamplerConfig
from diffspeed.pipelines.samplers import SAMPLERS
from diffspeed.pngmeta import parse_parameters, read_parameters

PROMPT = "a red circle at top left on a blue background"


def run(pipe, **kw):
    kw.setdefault("steps", 4)
    kw.setdefault("prompt", PROMPT)
    return generate(pipe, GenerateRequest(**kw), progress=False)


def read_meta(result):
    return parse_parameters(result.parameters[0])


def test_same_seed_same_image_and_different_seed_differs(tiny_sd):
    a, b, c = (run(tiny_sd, seed=s).images[0] for s in (5, 5, 6))
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_batch_uses_consecutive_seeds(tiny_sd):
    batch = run(tiny_sd, seed=10, batch_size=2)
    assert batch.seeds == [10, 11]
    single = run(tiny_sd, seed=11).images[0]
    diff = np.abs(np.asarray(batch.images[1], dtype=int) - np.asarray(single, dtype=int))
    assert diff.max() <= 2  # same latents; batched matmuls may round differently


def test_native_size_and_explicit_size(tiny_sd):
    assert run(tiny_sd, seed=1).images[0].size == (64, 64)
    assert run(tiny_sd, seed=1, width=96, height=64).images[0].size == (96, 64)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_runs_and_scheduler_is_restored(tiny_sd, name):
    before = type(tiny_sd.scheduler)
    out = run(tiny_sd, seed=3, steps=3, sampler=name)
    assert np.isfinite(np.asarray(out.images[0], dtype=float)).all()
    assert type(tiny_sd.scheduler) is before
    assert f"Sampler: {name}," in out.parameters[0]


def test_random_seed_is_reported(tiny_sd):
    out = run(tiny_sd, seed=-1)
    assert 0 <= out.seeds[0] < 2**32
    again = run(tiny_sd, seed=out.seeds[0])
    assert np.array_equal(np.asarray(out.images[0]), np.asarray(again.images[0]))


@pytest.mark.parametrize(("field", "value"), [
    ("steps", 0), ("steps", -3), ("steps", 1001), ("cfg_scale", -1.0), ("cfg_scale", 51.0), ("width", 63),
    ("width", 100), ("height", 4096), ("height", 30), ("batch_size", 0), ("seed", -2), ("seed", 2**33),
    ("sampler", "Euler b"), ("steps", 2.5),
])
def test_bad_request_names_the_field(field, value):
    with pytest.raises(DiffspeedError) as err:
        GenerateRequest(prompt=PROMPT, **{field: value})
    assert err.value.field == field
    assert field in str(err.value)


def test_saved_png_carries_parameters_and_never_overwrites(tiny_sd, tmp_path):
    out = run(tiny_sd, seed=7, negative_prompt="green")
    first = save_images(out, tmp_path)
    second = save_images(out, tmp_path)
    assert first[0] != second[0] and len(list(tmp_path.glob("*.png"))) == 2
    meta = read_parameters(first[0])
    assert meta["prompt"] == PROMPT and meta["negative_prompt"] == "green"
    assert meta["Seed"] == "7" and meta["Steps"] == "4" and meta["Size"] == "64x64"
    assert meta["Model"] == "tiny-sd" and len(meta["Model hash"]) == 10


# ---------------------------------------------------------------------------- one rule for sampling settings
def _card_cfg():
    from diffspeed.pipelines.load import shipped_path

    return json.loads((shipped_path("tiny-sd") / "training.json").read_text())["final_check"]["recommended_cfg"]


def test_resolve_sampling_rule(tiny_sd):
    recipe = Recipe.of(SamplerConfig(sampler="Euler a", steps=3))
    bare = GenerateRequest(prompt=PROMPT)
    assert resolve_sampling(bare) == ("DPM++ 2M", 20, 7.0, None)
    assert resolve_sampling(bare, pipe=tiny_sd).cfg_scale == _card_cfg()
    assert resolve_sampling(bare, recipe) == ("Euler a", 3, 7.0, None)
    same = GenerateRequest(prompt=PROMPT, sampler="euler A", steps=3, cfg_scale=5.0)
    assert resolve_sampling(same, recipe, tiny_sd) == ("Euler a", 3, 5.0, None)
    assert resolve_sampling(GenerateRequest(prompt=PROMPT, steps=9), Recipe.of(SamplerConfig(sampler="Euler"))) \
        == ("Euler", 9, 7.0, None)
    assert resolve_sampling(GenerateRequest(prompt=PROMPT, sampler="DDIM")).eta == 0.0  # DDIM reads eta


@pytest.mark.parametrize(("field", "value", "mine"), [("sampler", "DPM++ 2M", "'Euler a'"), ("steps", 2, "3")])
def test_request_and_recipe_disagreeing_is_an_error_naming_both(field, value, mine):
    recipe = Recipe.of(SamplerConfig(sampler="Euler a", steps=3))
    with pytest.raises(DiffspeedError) as err:
        resolve_sampling(GenerateRequest(prompt=PROMPT, **{field: value}), recipe)
    assert err.value.field == field
    assert repr(value) in str(err.value) and mine in str(err.value) and "recipe" in str(err.value)


def test_recipe_sampler_runs_and_is_not_swapped_over(tiny_sd):
    recipe = Recipe.of(SamplerConfig(sampler="Euler a", steps=3))
    with accelerate(tiny_sd, recipe) as fast:
        out = generate(tiny_sd, GenerateRequest(prompt=PROMPT, seed=2), runner=fast, progress=False)
        with pytest.raises(DiffspeedError, match="steps"):
            generate(tiny_sd, GenerateRequest(prompt=PROMPT, seed=2, steps=2), runner=fast, progress=False)
    assert out.stats["denoiser_calls"] == 3
    assert (out.request.sampler, out.request.steps) == ("Euler a", 3)
    assert "Steps: 3, Sampler: Euler a," in out.parameters[0]
    plain = run(tiny_sd, seed=2, steps=3, sampler="Euler a")  # Euler a is stochastic: any other sampler differs
    assert np.array_equal(np.asarray(out.images[0]), np.asarray(plain.images[0]))


def test_default_cfg_is_the_model_cards(tiny_sd):
    out = run(tiny_sd, seed=3)
    assert out.request.cfg_scale == _card_cfg() and f"CFG scale: {float(_card_cfg())}," in out.parameters[0]
    same = run(tiny_sd, seed=3, cfg_scale=float(_card_cfg()))
    assert np.array_equal(np.asarray(out.images[0]), np.asarray(same.images[0]))


# ------------------------------------------------------------------------------------- what the infotext says
def test_long_prompt_is_reported_in_result_and_infotext(tiny_sd):
    long = ", ".join(["a red circle at top left on a blue background"] * 12)
    n = len(tiny_sd.tokenizer(long).input_ids)
    assert n > 77
    out = run(tiny_sd, seed=1, steps=2, prompt=long)
    assert any(f"prompt is {n} tokens" in e and "first 77" in e for e in out.events)
    assert read_meta(out)["Prompt truncated"] == f"{n} tokens"
    short = run(tiny_sd, seed=1, steps=2)
    assert "Prompt truncated" not in read_meta(short) and not short.events


def test_infotext_records_device_dtype_and_lora_weights(tiny_sd):
    from diffspeed.pipelines.lora import load_lora, unload_loras

    load_lora(tiny_sd, "tiny-sd-lora-monochrome", weight=0.8)
    try:
        meta = read_meta(run(tiny_sd, seed=1, steps=2))
    finally:
        unload_loras(tiny_sd)
    assert meta["Device"] == "cpu" and meta["Dtype"] == "fp32"
    name = meta["Lora hashes"].split(": ")[0]
    assert meta["Lora weights"] == f"{name}: 0.8"


# ----------------------------------------------------------------------------------------- numerical failure
def test_nan_from_the_vae_is_an_error_not_a_black_success(tiny_sd, monkeypatch):
    decoder = tiny_sd.vae.decoder
    monkeypatch.setattr(decoder, "forward", lambda z, *a, **k: torch.full(
        (z.shape[0], 3, z.shape[2] * 8, z.shape[3] * 8), float("nan")))
    # diffusers' post-processing casts the NaN images to uint8 (and numpy says so) before the check sees them
    with pytest.raises(DiffspeedRuntimeError, match="NaN") as err, warnings.catch_warnings():
        warnings.filterwarnings("ignore", "invalid value encountered in cast", RuntimeWarning)
        run(tiny_sd, seed=1, steps=2)
    assert err.value.exit_code == 1 and "fp32" in str(err.value)
    assert not decoder._forward_hooks  # the watch leaves no hook behind


def test_precision_nan_guard_rerun_stays_a_success(tiny_sd, monkeypatch):
    from diffspeed.hardware import SlowDtypeWarning
    from diffspeed.optim.precision import PrecisionConfig

    decoder = tiny_sd.vae.decoder
    real = decoder.forward

    def overflow_in_half(z, *a, **k):  # what an fp16 SD VAE does on large activations
        out = real(z, *a, **k)
        return out * float("nan") if z.dtype == torch.float16 else out

    monkeypatch.setattr(decoder, "forward", overflow_in_half)
    with warnings.catch_warnings():  # fp16 on this CPU may be measured slow: that warning is not under test
        warnings.simplefilter("ignore", SlowDtypeWarning)
        fast = accelerate(tiny_sd, [PrecisionConfig(vae="fp16")])
    with fast:
        out = generate(tiny_sd, GenerateRequest(prompt=PROMPT, seed=1, steps=2), runner=fast, progress=False)
    assert out.stats["vae_fp32_redecodes"] == 1 and out.images[0].getbbox() is not None
