"""What only a CUDA device can check: fp16/bf16, TF32, SDPA kernels, offload, inductor compile and quantize on
tiny-sd, each against the same-seed fp32 eager baseline, and each removed without a trace.

Run on a lent GPU by ``tools/gpu_check.sh`` (``pytest -m gpu``); deselected by default and skipped without CUDA.
Every test applies its optimization to one fp32 tiny-sd pipeline on the GPU, checks what it promises (weights
really half, flags really set, weights really off the GPU, compile time really reported), compares the images
with the baseline (SSIM floor where precision is bought, allclose where it is not), and then checks that
``remove()`` gave back the very same pipeline (:func:`~tests.optim.contract.snapshot`) and bit-identical images.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffspeed.core import Accelerated, Recipe
from diffspeed.core.optimization import all_optimizations
from diffspeed.optim.attention import AttentionConfig
from diffspeed.optim.compile import CompileConfig
from diffspeed.optim.offload import OffloadConfig
from diffspeed.optim.precision import PrecisionConfig

from ..optim.contract import assert_same, run, snapshot

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="needs a CUDA device (tools/gpu_check.sh runs these on a lent GPU)")]

STEPS = 10  # enough denoising for rounding differences to compound, a fraction of a second on a GPU
# SSIM floors against the fp32 baseline. Measured on the CPU (tiny-sd, these prompts, 10 PNDM steps): fp16
# everywhere 0.9999, bf16 0.998; a per-channel fake quantization of the UNet's Linear weights: fp8 e4m3 0.91,
# e5m2 0.99 (0.88 with activations too), int8 0.999 (0.997 with activations). Floors leave room for the GPU's
# kernels and the real quantizer's choices; tighten them from the first GPU report.
FLOORS = {"fp16": 0.99, "bf16": 0.97, "tf32": 0.99, "sdpa": 0.99, "compile": 0.99,
          "fp8": 0.8, "fp8_e5m2": 0.75, "int8_weight_only": 0.95, "int8_dynamic": 0.9}
QUANTIZE_METHODS = ("fp8", "fp8_e5m2", "int8_weight_only", "int8_dynamic")


@pytest.fixture(scope="module")
def cuda_sd():
    from diffspeed.pipelines.load import load

    pipe = load("tiny-sd", device="cuda", dtype="fp32")  # fp32: the reference every test compares with
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def baseline(cuda_sd):
    return run(cuda_sd, steps=STEPS)


def min_ssim(a: np.ndarray, b: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    return min(float(structural_similarity(x, y, channel_axis=-1, data_range=1.0)) for x, y in zip(a, b, strict=True))


def assert_restored(pipe, before: dict, baseline: np.ndarray) -> None:
    """remove() left the same objects, values, hooks, processors and flags, and eager images bit for bit."""
    assert_same(before, snapshot(pipe))
    assert np.array_equal(run(pipe, steps=STEPS), baseline)


def components(pipe) -> dict:
    return {n: c for n, c in pipe.components.items() if isinstance(c, torch.nn.Module)}


def float_dtypes(module: torch.nn.Module) -> set:
    return {p.dtype for p in module.parameters() if p.is_floating_point()}


# ------------------------------------------------------------------------------------------------- precision
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_is_really_half_and_close_to_fp32(cuda_sd, baseline, dtype):
    if dtype == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    half = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    before = snapshot(cuda_sd)
    with Accelerated(cuda_sd, [PrecisionConfig(unet=dtype, text_encoder=dtype, vae=dtype)]) as fast:
        for name, module in components(cuda_sd).items():
            assert float_dtypes(module) == {half}, (name, float_dtypes(module))
            assert all(p.device.type == "cuda" for p in module.parameters()), name
        images = run(fast, steps=STEPS)
        redecodes = fast.stats.get("vae_fp32_redecodes", 0)
    assert np.isfinite(images).all()
    assert min_ssim(images, baseline) >= FLOORS[dtype], (dtype, min_ssim(images, baseline), redecodes)
    assert float_dtypes(cuda_sd.unet) == {torch.float32}
    assert_restored(cuda_sd, before, baseline)


def _matmul_error() -> float:
    """Max error of a CUDA fp32 matmul against fp64: about 1e-4 in fp32, 1e-1 with TF32's 10-bit mantissa."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    a, b = (torch.randn(512, 512, device="cuda", generator=gen) for _ in range(2))
    return float(((a @ b).double() - a.double() @ b.double()).abs().max())


def test_tf32_flags_set_while_applied_reach_the_kernels_and_are_restored(cuda_sd, baseline):
    was = torch.backends.cuda.matmul.allow_tf32
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    want = not was  # a flip, so the effect check sees a change whatever this process started with
    before = snapshot(cuda_sd)
    with Accelerated(cuda_sd, [PrecisionConfig(tf32=want)]) as fast:
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (want, want)
        error_during = _matmul_error()
        images = run(fast, steps=STEPS)
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == flags
    error_after = _matmul_error()
    tf32_error, fp32_error = (error_during, error_after) if want else (error_after, error_during)
    assert tf32_error > 10 * fp32_error, (tf32_error, fp32_error)  # the flag changed the matmul kernels
    assert min_ssim(images, baseline) >= FLOORS["tf32"]
    assert_restored(cuda_sd, before, baseline)


# ------------------------------------------------------------------------------------------------- attention
@pytest.mark.parametrize(("dtype", "kernel"), [("fp32", None), ("fp32", "efficient"), ("fp16", "flash")])
def test_sdpa_processors_set_and_restored(cuda_sd, baseline, dtype, kernel):
    """From the plain math processors to SDPA (optionally one CUDA kernel; flash needs half precision)."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    models = [m for m in (cuda_sd.unet, cuda_sd.vae) if m.attn_processors]
    loaded = [dict(m.attn_processors) for m in models]
    for m in models:
        m.set_attn_processor(AttnProcessor())
    try:
        before = snapshot(cuda_sd)
        recipe = [PrecisionConfig(unet=dtype, text_encoder=dtype, vae=dtype)] if dtype != "fp32" else []
        recipe.append(AttentionConfig(backend="sdpa", sdpa_kernel=kernel))
        with Accelerated(cuda_sd, recipe) as fast:
            for m in models:
                assert all(type(p) is AttnProcessor2_0 for p in m.attn_processors.values())
            images = run(fast, steps=STEPS)
        assert all(type(p) is AttnProcessor for m in models for p in m.attn_processors.values())
        assert min_ssim(images, baseline) >= FLOORS["fp16" if dtype == "fp16" else "sdpa"]
        assert_same(before, snapshot(cuda_sd))  # the very processor objects that were there before
    finally:
        for m, procs in zip(models, loaded, strict=True):
            m.set_attn_processor(procs)
    assert np.array_equal(run(cuda_sd, steps=STEPS), baseline)


# --------------------------------------------------------------------------------------------------- offload
def _cuda_peak_mb(fn) -> tuple:
    from diffspeed.bench.memory import peak_memory

    torch.cuda.empty_cache()
    result = peak_memory(fn, device="cuda")
    return result["result"], result["peak_mb"]


def _on_gpu(pipe) -> list[str]:
    return [n for n, c in components(pipe).items() if any(p.device.type == "cuda" for p in c.parameters())]


@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_offload_keeps_weights_on_the_cpu_between_calls_with_a_lower_peak(cuda_sd, baseline, mode):
    images_before, base_peak = _cuda_peak_mb(lambda: run(cuda_sd, steps=STEPS))
    assert np.array_equal(images_before, baseline)
    before = snapshot(cuda_sd)
    with Accelerated(cuda_sd, [OffloadConfig(mode=mode)]) as fast:
        assert _on_gpu(cuda_sd) == []  # offloaded as soon as applied
        images, peak = _cuda_peak_mb(lambda: run(fast, steps=STEPS))
        assert _on_gpu(cuda_sd) == []  # and back on the CPU after the call
    assert peak < base_peak, (mode, peak, base_peak)
    assert np.allclose(images, baseline, atol=1e-4), np.abs(images - baseline).max()
    assert sorted(_on_gpu(cuda_sd)) == sorted(components(cuda_sd))
    assert_restored(cuda_sd, before, baseline)


# --------------------------------------------------------------------------------------------------- compile
def test_inductor_compile_is_close_to_eager_and_reports_its_compile_time(cuda_sd, baseline):
    before = snapshot(cuda_sd)
    with Accelerated(cuda_sd, [CompileConfig(mode="default", backend="inductor")]) as fast:
        first = run(fast, steps=STEPS)
        first_stats = dict(fast.stats)
        second = run(fast, steps=STEPS)
        assert "compile_ms" not in fast.stats  # the second call ran the cached graphs: no compile time
    assert first_stats.get("compile_ms", 0) > 0 and first_stats.get("compiled_graphs", 0) >= 1, first_stats
    for images in (first, second):
        assert min_ssim(images, baseline) >= FLOORS["compile"]
        assert np.abs(images - baseline).mean() < 5e-3
    assert_restored(cuda_sd, before, baseline)


# -------------------------------------------------------------------------------------------------- quantize
@pytest.mark.parametrize("method", QUANTIZE_METHODS)
def test_quantize_is_close_and_removed(cuda_sd, baseline, method):
    if "quantize" not in all_optimizations():
        pytest.skip("the quantize optimization is not registered (diffspeed.optim.quantize) yet")
    recipe = Recipe.from_dict({"optimization": [{"name": "quantize", "method": method}]}, source="test")
    problems = recipe.check(cuda_sd)
    if problems:  # a package or a compute capability this machine lacks: reported, not failed
        pytest.skip(f"quantize {method} cannot run here: {'; '.join(problems)}")
    before = snapshot(cuda_sd)
    with Accelerated(cuda_sd, recipe) as fast:  # strict: a quantizer that changed nothing raises here
        assert fast.effects["quantize"], fast.effects
        images = run(fast, steps=STEPS)
    assert np.isfinite(images).all()
    assert min_ssim(images, baseline) >= FLOORS[method], (method, min_ssim(images, baseline))
    assert_restored(cuda_sd, before, baseline)
