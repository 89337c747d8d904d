"""The goal presets: each loads, validates on the tiny models, and keeps its promise relative to the others."""

import dataclasses

import pytest
import torch

import diffspeed.presets
from diffspeed.core import Accelerated
from diffspeed.errors import DiffspeedError
from diffspeed.hardware import HardwareProfile, SlowDtypeWarning
from diffspeed.metrics import psnr
from diffspeed.presets import CLASSES, MEMORY_PRESETS, PRESETS, load_preset, preset_recipe, resolve_preset

PROMPT = "a purple triangle at center on an orange background"
# the four hardware classes, injected: no test needs the hardware (nor probes this machine)
NATIVE_BF16 = HardwareProfile("cpu", "Intel Xeon 8480+", "AVX512", ("avx2", "avx512f", "avx512_bf16", "amx_bf16"),
                              cores=2, source="injected")
AVX2 = HardwareProfile("cpu", "AMD EPYC 7B12", "AVX2", ("avx2", "f16c"), cores=2, source="injected")
SM80 = HardwareProfile("cuda", "A100", "sm80", cuda_capability=(8, 0), source="injected")
SM75 = HardwareProfile("cuda", "T4", "sm75", cuda_capability=(7, 5), source="injected")
PROFILES = {"cpu-bf16": NATIVE_BF16, "cpu-fp32": AVX2, "cuda-bf16": SM80, "cuda-fp16": SM75}


def _compute_dtypes(recipe) -> set:
    return set().union(*(c.compute_dtypes() for c in recipe.optimizations if c.name == "precision"))


def test_every_preset_says_what_it_is_for_and_what_it_was_chosen_on():
    assert PRESETS == ("quality", "balanced", "fastest", "low-vram-8gb", "low-vram-6gb", "low-vram-4gb")
    for name in PRESETS:
        preset = load_preset(name)
        assert len(preset.description) > 80, name
        assert "benchmarks/" in preset.chosen_on["cpu-bf16"] and "benchmarks/" in preset.chosen_on["cpu-fp32"], name
        assert all(preset.uses[c] and preset.chosen_on[c] for c in CLASSES), name
        assert preset.entries["cuda-bf16"] and preset.entries["cpu-bf16"], name


@pytest.mark.parametrize(("cls", "profile"), PROFILES.items())
def test_each_profile_resolves_to_its_class(cls, profile):
    assert diffspeed.presets.profile_class(profile)[0] == cls
    if profile.kind == "cuda" and not torch.cuda.is_available():
        return  # the recipes need the GPU to validate: test_cuda_recipes_only_miss_the_gpu_here
    for name in PRESETS:
        recipe, why = resolve_preset(name, profile)
        assert recipe.name == f"{name} ({cls})" and why.startswith(f"{cls}: {profile.capability}"), why
        assert _compute_dtypes(recipe) <= set(CLASSES[cls][1]), (name, cls)


def test_without_fast_bf16_no_preset_computes_in_half_precision():
    from diffspeed.optim.precision import PrecisionConfig

    for name in PRESETS:
        assert _compute_dtypes(preset_recipe(name, profile=AVX2)) <= {"fp32"}, name
        sm75 = [PrecisionConfig(**{k: v for k, v in t.items() if k != "name"})
                for t in load_preset(name).entries["cuda-fp16"] if t["name"] == "precision"]
        assert sm75 and all("bf16" not in c.compute_dtypes() for c in sm75), name
    assert "no native bf16" in resolve_preset("fastest", AVX2)[1]
    for name in MEMORY_PRESETS:  # they still store the UNet small (bf16, or fp8 via quantize): computed in fp32
        steps = {c.name: c for c in preset_recipe(name, profile=AVX2).optimizations}
        precision, quantize = steps["precision"], steps.get("quantize")
        assert precision.compute == "fp32", name
        if quantize is None:
            assert precision.unet == "bf16", name
        else:  # fp8 layers compute in the dtype the UNet has when quantize applies: fp32, precision leaves it
            assert quantize.method.startswith("fp8") and "unet" in quantize.components and precision.unet is None
        assert "fp32" in load_preset(name).uses["cpu-fp32"] and "slow" in load_preset(name).uses["cpu-fp32"]


def test_a_measured_probe_overrides_the_flags():
    slow = dataclasses.replace(NATIVE_BF16, measured={"bf16": {"matmul": 176.0, "conv": 140.0}}, source="cache")
    recipe, why = resolve_preset("quality", slow)
    assert recipe.name == "quality (cpu-fp32)" and "measured: bf16 matmul 176x slower than fp32" in why
    fast = dataclasses.replace(AVX2, measured={"bf16": {"matmul": 0.2, "conv": 0.8}}, source="cache")
    assert resolve_preset("quality", fast)[0].name == "quality (cpu-bf16)"


def test_a_preset_file_that_breaks_the_rules_names_the_preset(monkeypatch, tmp_path):
    presets = diffspeed.presets
    text = (presets.FOLDER / "fastest.toml").read_text()
    monkeypatch.setattr(presets, "FOLDER", tmp_path)
    bad = text.replace('[[cpu-fp32.optimization]]\nname = "deepcache"',
                       '[[cpu-fp32.optimization]]\nname = "precision"\nunet = "bf16"\n\n'
                       '[[cpu-fp32.optimization]]\nname = "deepcache"', 1)
    assert bad != text
    (tmp_path / "fastest.toml").write_text(bad)
    with pytest.raises(DiffspeedError, match=r"preset fastest: \[cpu-fp32\] computes in bf16") as err:
        load_preset("fastest")
    assert err.value.field == "preset"
    (tmp_path / "fastest.toml").write_text(text.replace("[cuda-fp16]", "[cuda-fp8]"))
    with pytest.raises(DiffspeedError, match="unknown keys: cuda-fp8"):
        load_preset("fastest")


@pytest.mark.parametrize("cls", ["cpu-bf16", "cpu-fp32"])
@pytest.mark.parametrize("name", PRESETS)
def test_cpu_recipes_validate_on_both_tiny_models(name, cls, tiny_sd, tiny_sdxl):
    recipe = preset_recipe(name, profile=PROFILES[cls])
    assert recipe.check(tiny_sd) == [] and recipe.check(tiny_sdxl) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-machine refusal")
@pytest.mark.parametrize("cls", ["cuda-bf16", "cuda-fp16"])
@pytest.mark.parametrize("name", PRESETS)
def test_cuda_recipes_only_miss_the_gpu_here(name, cls):
    try:
        recipe = preset_recipe(name, profile=PROFILES[cls])
    except DiffspeedError as err:
        assert all("needs a CUDA device" in p for p in err.problems), err.problems
    else:
        assert recipe.name == f"{name} ({cls})"


@pytest.mark.gpu
@pytest.mark.parametrize("name", PRESETS)
def test_cuda_recipes_validate_on_a_gpu(name, tiny_sd):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here")
    try:
        assert preset_recipe(name, "cuda").check(tiny_sd.to("cuda")) == []
    finally:
        tiny_sd.to("cpu")  # the fixture is shared by the session


def test_unknown_preset_names_the_field():
    with pytest.raises(DiffspeedError) as err:
        load_preset("turbo")
    assert err.value.field == "preset" and "quality, balanced, fastest" in str(err.value)


def _image(pipe, recipe, steps=12):
    with Accelerated(pipe, recipe) as fast:
        out = fast([PROMPT], num_inference_steps=steps, guidance_scale=5.0, output_type="np",
                   generator=[torch.Generator().manual_seed(11)])
        return out.images[0], dict(fast.stats)


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
    results = {n: _image(tiny_sd, preset_recipe(n, profile=NATIVE_BF16)) for n in ("quality", "balanced", "fastest")}
    db = {n: psnr(img, base) for n, (img, _) in results.items()}
    full = {n: stats.get("deepcache_full_calls", stats["denoiser_calls"]) for n, (_, stats) in results.items()}
    assert db["quality"] > 35  # bf16 rounding only
    assert db["quality"] > db["balanced"] > db["fastest"] > 15
    assert full["fastest"] < full["balanced"] < full["quality"] == results["quality"][1]["denoiser_calls"]
    assert results["fastest"][1]["cfg_skipped_calls"] > 0


def test_low_vram_cpu_presets_keep_the_image(tiny_sd):
    base, _ = _image(tiny_sd, [], steps=6)
    for name in ("low-vram-8gb", "low-vram-6gb", "low-vram-4gb"):
        image, stats = _image(tiny_sd, preset_recipe(name, profile=NATIVE_BF16), steps=6)
        assert psnr(image, base) > 25, name  # bf16 weights and tiled decode: rounding-level changes
    assert stats["staged_released_bytes"] > 0


def test_fp32_cpu_presets_keep_the_image_and_never_warn(tiny_sd, monkeypatch):
    """On the AVX2 profile the speed presets compute in fp32 and the memory presets store bf16 (low-vram-4gb:
    fp8) weights computed in fp32: no slow-dtype warning, the weights really are small while generating, and the
    image stays close."""
    import warnings

    from diffspeed import hardware

    monkeypatch.setattr(hardware, "detect", lambda device="cpu": AVX2)
    base, _ = _image(tiny_sd, [], steps=6)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SlowDtypeWarning)
        for name in PRESETS:
            recipe = preset_recipe(name, profile=AVX2)
            with Accelerated(tiny_sd, recipe) as fast:
                stored = max(tiny_sd.unet.parameters(), key=lambda p: p.numel()).dtype
                image = fast([PROMPT], num_inference_steps=6, guidance_scale=5.0, output_type="np",
                             generator=[torch.Generator().manual_seed(11)]).images[0]
            small = torch.float8_e4m3fn if name == "low-vram-4gb" else torch.bfloat16  # fp8: quantize
            assert stored == (small if name in MEMORY_PRESETS else torch.float32), name
            floor = 35 if name in MEMORY_PRESETS or name == "quality" else 15  # caching presets: their own cost
            assert psnr(image, base) > floor, name
    assert tiny_sd.unet.dtype == torch.float32
