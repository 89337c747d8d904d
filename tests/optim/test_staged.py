"""staged: same images as the plain pipeline, phases in order, weights really freed and restored exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffspeed import DiffspeedError
from diffspeed.bench.memory import MemoryMonitor, peak_memory
from diffspeed.core import Accelerated, Edits, Recipe
from diffspeed.optim import staged as staged_module
from diffspeed.optim.staged import Staged, StagedConfig, _give_back_to_os, _Released

from .contract import assert_same, snapshot

MODELS = ["tiny_sd", "tiny_sdxl"]
PROMPTS = ["a red circle at top left on a blue background", "a green square at bottom right on white",
           "a yellow star at center on a black background"]


def gens(n: int = 3, seed: int = 0):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def generate(pipe, config: StagedConfig | None = None, prompts=PROMPTS, **kw):
    kw = {"num_inference_steps": 3, "generator": gens(len(prompts)), "output_type": "np", **kw}
    if config is None:
        return pipe(prompts, **kw).images
    with Accelerated(pipe, [config]) as fast:
        images = fast(prompts, **kw).images
    generate.last = fast
    return images


def nbytes(*modules) -> int:
    return sum(t.numel() * t.element_size() for m in modules for t in [*m.parameters(), *m.buffers()])


def text_encoders(pipe) -> list:
    return [m for m in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)) if m is not None]


# ---------------------------------------------------------------------------------------------- images
@pytest.mark.parametrize("model", MODELS)
def test_same_images_as_the_plain_pipeline(model, request):
    """Bit for bit when one chunk holds every prompt. Smaller chunks run the UNet at a smaller batch, and CPU
    GEMM kernels round differently at different batch sizes (the time embedding's Linear at M=2 vs 6):
    equal to float rounding then, far below one 8-bit level."""
    pipe = request.getfixturevalue(model)
    plain = generate(pipe)
    for b in (3, 64):
        assert np.array_equal(generate(pipe, StagedConfig(batch_size=b)), plain), b
    for b in (1, 2):
        assert np.abs(generate(pipe, StagedConfig(batch_size=b)) - plain).max() < 1e-4, b


def test_one_shared_generator_gives_the_plain_pipelines_initial_noise(tiny_sd):
    plain = generate(tiny_sd, generator=torch.Generator().manual_seed(7))
    staged = generate(tiny_sd, StagedConfig(batch_size=3), generator=torch.Generator().manual_seed(7))
    assert np.array_equal(staged, plain)
    staged = generate(tiny_sd, StagedConfig(batch_size=1), generator=torch.Generator().manual_seed(7))
    assert np.abs(staged - plain).max() < 1e-4  # noise for all prompts drawn at once, as the pipeline does


def test_stochastic_sampler_with_one_shared_generator_is_reported(tiny_sd):
    from diffusers import EulerAncestralDiscreteScheduler

    original = tiny_sd.scheduler
    tiny_sd.scheduler = EulerAncestralDiscreteScheduler.from_config(original.config)
    try:
        plain = generate(tiny_sd)
        assert np.abs(generate(tiny_sd, StagedConfig(batch_size=1)) - plain).max() < 1e-4  # one per prompt
        assert not any("shared generator" in e for e in generate.last.events)
        generate(tiny_sd, StagedConfig(batch_size=1), generator=torch.Generator().manual_seed(0))
        assert any("shared generator" in e for e in generate.last.events)
    finally:
        tiny_sd.scheduler = original


@pytest.mark.parametrize("model", MODELS)
def test_several_images_per_prompt_and_given_latents(model, request):
    pipe = request.getfixturevalue(model)
    prompts = PROMPTS[:2]
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(3))

    def images(config=None, **kw):
        return generate(pipe, config, prompts=prompts, num_images_per_prompt=2, generator=gens(4), **kw)

    plain = images()
    assert plain.shape[0] == 4
    assert np.array_equal(images(StagedConfig(batch_size=2)), plain)
    assert np.abs(images(StagedConfig(batch_size=1)) - plain).max() < 1e-4
    plain = images(latents=latents)
    assert np.array_equal(images(StagedConfig(batch_size=2), latents=latents), plain)


def test_output_types_and_tuple_return(tiny_sd):
    with Accelerated(tiny_sd, [StagedConfig(batch_size=3)]) as fast:
        for output_type in ("pil", "pt", "latent"):
            kw = dict(num_inference_steps=2, output_type=output_type)
            plain = tiny_sd(PROMPTS, generator=gens(), **kw).images
            staged = fast(PROMPTS, generator=gens(), **kw).images
            if output_type == "pil":
                assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(plain, staged, strict=True))
            else:
                assert torch.equal(plain, staged)
        images, nsfw = fast(PROMPTS, generator=gens(), num_inference_steps=2, return_dict=False)
        assert len(images) == 3 and nsfw is None


def test_a_single_prompt_passes_through(tiny_sd):
    plain = tiny_sd("a red circle", num_inference_steps=2, generator=gens(1), output_type="np").images
    with Accelerated(tiny_sd, [StagedConfig()]) as fast:
        staged = fast("a red circle", num_inference_steps=2, generator=gens(1), output_type="np").images
        # only the effect check's note: it stood aside, by design
        assert [e.split(" (")[0] for e in fast.events] == ["staged: no effect on this call"]
        assert "staged_prompts" not in fast.stats
    assert np.array_equal(staged, plain)


def test_the_decode_call_leaves_nothing_on_the_pipeline(tiny_sd):
    hooks = list(tiny_sd.unet._forward_pre_hooks)
    generate(tiny_sd, StagedConfig(batch_size=2))
    assert "prepare_latents" not in vars(tiny_sd) and tiny_sd.interrupt is False
    assert list(tiny_sd.unet._forward_pre_hooks) == hooks


def test_a_pipeline_that_ignores_the_interrupt_fails_loudly(tiny_sd, monkeypatch):
    """Stands in for a diffusers release whose denoising loop no longer checks ``interrupt``: the decode call
    would denoise the finished latents again, so it must raise instead of returning other images."""
    before, hooks = snapshot(tiny_sd), list(tiny_sd.unet._forward_pre_hooks)
    monkeypatch.setattr(type(tiny_sd), "interrupt", property(lambda self: False))
    for release in (True, False):
        with pytest.raises(DiffspeedError, match="ran its UNet in the decode call"):
            generate(tiny_sd, StagedConfig(batch_size=3, release=release), num_inference_steps=1)
    assert "prepare_latents" not in vars(tiny_sd) and list(tiny_sd.unet._forward_pre_hooks) == hooks
    assert_same(before, snapshot(tiny_sd))


def test_a_pipeline_with_another_guidance_rule_fails_loudly(tiny_sd, monkeypatch):
    """staged encodes the prompts before the pipeline runs, by the pipelines' guidance rule; a diffusers release
    that decides differently must stop the call rather than denoise with the wrong embeddings."""
    monkeypatch.setattr(type(tiny_sd), "do_classifier_free_guidance", property(lambda self: False))
    with pytest.raises(DiffspeedError, match="decides guidance differently"):
        generate(tiny_sd, StagedConfig(batch_size=3, release=False), num_inference_steps=1)


# ------------------------------------------------------------------------------------ phases and stats
@pytest.mark.parametrize("model", MODELS)
def test_phases_run_in_order_and_are_counted(model, request):
    pipe = request.getfixturevalue(model)
    generate(pipe, StagedConfig(batch_size=1))
    fast = generate.last
    phases = [e.split(":")[1].split()[0] for e in fast.events]
    assert phases == ["encoded", "released", "denoised", "denoised", "denoised", "released", "decoded", "restored"]
    assert "text_encoder" in fast.events[1] and ("text_encoder_2" in fast.events[1]) == (model == "tiny_sdxl")
    assert "unet" in fast.events[5] and "text_encoder" not in fast.events[5]
    calls_per_run = fast.stats["denoiser_calls"] // 3
    assert fast.stats["staged_chunks"] == 3 and fast.stats["staged_prompts"] == 3 and calls_per_run >= 3
    assert fast.stats["staged_released_bytes"] == nbytes(*text_encoders(pipe), pipe.unet)


def test_release_false_only_reorders(tiny_sd):
    plain = generate(tiny_sd)
    assert np.array_equal(generate(tiny_sd, StagedConfig(batch_size=3, release=False)), plain)
    assert not any("released" in e for e in generate.last.events)
    assert "staged_released_bytes" not in generate.last.stats


def test_step_counter_restarts_for_every_chunk(tiny_sd):
    seen = []
    with Accelerated(tiny_sd, [StagedConfig(batch_size=2)]) as fast:
        hook = tiny_sd.unet.register_forward_pre_hook(lambda *_: seen.append(fast.state.step))  # after its own
        try:
            fast(PROMPTS, num_inference_steps=3, generator=gens(), output_type="np")
        finally:
            hook.remove()
    per_run = len(seen) // 2
    assert seen == list(range(per_run)) * 2


# ------------------------------------------------------------------------------- release and restore
@pytest.mark.parametrize("model", MODELS)
def test_weights_are_gone_during_their_idle_phase_and_restored_exactly(model, request):
    pipe = request.getfixturevalue(model)
    before = snapshot(pipe)
    seen = {}

    def during_denoise(*_):
        seen.setdefault("te", sum(t.numel() for m in text_encoders(pipe) for t in m.parameters()))
        seen.setdefault("unet", sum(t.numel() for t in pipe.unet.parameters()))

    def during_decode(inner, *a, **k):
        seen["unet_at_decode"] = sum(t.numel() for t in pipe.unet.parameters())
        seen["te_at_decode"] = sum(t.numel() for m in text_encoders(pipe) for t in m.parameters())
        return inner(*a, **k)

    edits = Edits("test")
    edits.forward_pre_hook(pipe.unet, during_denoise)
    edits.wrap_method(pipe.vae, "decode", during_decode)
    try:
        generate(pipe, StagedConfig(batch_size=2))
    finally:
        edits.undo()
    assert seen["te"] == 0 and seen["unet"] > 0  # text encoders out while the UNet runs
    assert seen["unet_at_decode"] == 0 and seen["te_at_decode"] == 0  # UNet out too while the VAE decodes
    assert_same(before, snapshot(pipe))  # same Parameter objects, values, dtypes, strides after the call


def test_restored_even_when_the_call_fails(tiny_sd):
    before = snapshot(tiny_sd)

    def boom(pipe, i, t, kw):
        raise RuntimeError("stop")

    with Accelerated(tiny_sd, [StagedConfig(batch_size=1)]) as fast:
        with pytest.raises(RuntimeError, match="stop"):
            fast(PROMPTS, num_inference_steps=2, callback_on_step_end=boom)
        assert fast.events[-1].startswith("staged: restored")
    assert_same(before, snapshot(tiny_sd))


def test_released_tensors_come_back_bit_for_bit_with_shared_storage(tmp_path):
    """Tied weights, strided views and bf16 survive the spill file; the Parameter objects stay the same."""
    m = torch.nn.Module()
    m.a = torch.nn.Linear(8, 8).to(torch.bfloat16)
    m.b = torch.nn.Linear(8, 8)
    m.b.weight = torch.nn.Parameter(m.b.weight.data.t())  # non-contiguous strides
    m.register_buffer("view", m.b.weight.data[2:5])  # shares the weight's storage
    tensors = [*m.parameters(), *m.buffers()]
    values = [t.data.clone() for t in tensors]
    layout = [(t.data.stride(), t.data.storage_offset(), t.dtype) for t in tensors]
    r = _Released(m, tmp_path)
    assert r.where == "disk" and all(t.numel() == 0 for t in tensors) and any(tmp_path.iterdir())
    r.restore()
    assert [*m.parameters(), *m.buffers()] == tensors
    assert all(torch.equal(t.data, v) for t, v in zip(tensors, values, strict=True))
    assert [(t.data.stride(), t.data.storage_offset(), t.dtype) for t in tensors] == layout
    assert m.view.untyped_storage().data_ptr() == m.b.weight.untyped_storage().data_ptr()
    assert not any(tmp_path.iterdir())


def test_accelerator_weights_wait_in_host_memory(tmp_path, monkeypatch):
    """The path GPU components take (a host copy, no file), exercised with CPU tensors."""
    monkeypatch.setattr(staged_module, "_to_disk", lambda device: False)
    m = torch.nn.Linear(8, 8)
    tensors, values = list(m.parameters()), [t.detach().clone() for t in m.parameters()]
    r = _Released(m, tmp_path)
    assert r.where == "host memory" and not any(tmp_path.iterdir()) and m.weight.numel() == 0
    r.restore()
    assert list(m.parameters()) == tensors and all(torch.equal(t, v) for t, v in zip(tensors, values, strict=True))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_released_components_wait_in_host_memory():
    import diffspeed

    pipe = diffspeed.load("tiny-sd", device="cuda", dtype="fp32")
    pipe.set_progress_bar_config(disable=True)
    before, allocated = snapshot(pipe), []
    hook = pipe.unet.register_forward_pre_hook(lambda *_: allocated.append(torch.cuda.memory_allocated()))
    try:
        plain = generate(pipe)
        first_plain = allocated[0]
        allocated.clear()
        staged = generate(pipe, StagedConfig(batch_size=3))
    finally:
        hook.remove()
    assert np.array_equal(staged, plain)
    assert "host memory" in generate.last.events[1]
    assert first_plain - allocated[0] > 0.9 * nbytes(pipe.text_encoder)
    assert_same(before, snapshot(pipe))


@pytest.mark.parametrize("model", MODELS)
def test_released_memory_is_really_freed(model, request):
    """Peak RSS, plain vs staged, on the same prompts with every component loaded, each measured from the RSS
    at the start of its call (after returning free heap pages to the OS, so both start alike). While the UNet
    runs, the staged call holds less by about the text encoders' bytes; while the VAE decodes, by the text
    encoders' and the UNet's; over the whole call it adds less. (The factor 0.6: the plain call reuses heap
    pages it already holds for activations, while the staged call, having returned them, maps new ones.)"""
    pipe = request.getfixturevalue(model)
    te, unet = nbytes(*text_encoders(pipe)), nbytes(pipe.unet)
    generate(pipe)  # warm up kernels and allocator
    plain, staged = _phase_peaks(pipe, None), _phase_peaks(pipe, StagedConfig(batch_size=1))
    assert plain["denoise"] - staged["denoise"] > 0.6 * te, (plain, staged, te)
    assert plain["decode"] - staged["decode"] > 0.6 * (te + unet), (plain, staged, te, unet)
    _give_back_to_os()
    whole_plain = peak_memory(lambda: generate(pipe))
    _give_back_to_os()
    whole_staged = peak_memory(lambda: generate(pipe, StagedConfig(batch_size=1)))
    assert whole_staged["increase_mb"] < whole_plain["increase_mb"], (whole_plain, whole_staged)


def _phase_peaks(pipe, config) -> dict:
    """Peak RSS of each phase in bytes above the RSS at the start: up to the first UNet call (encode), up to
    the VAE decode (denoise), the decode itself, and what follows it (end: postprocessing, restoring)."""
    edits = Edits("test")

    def first_unet_call(*_):
        if "encode" not in mon.phases:
            mon.mark("encode")

    def decode(inner, *a, **k):
        mon.mark("denoise")
        out = inner(*a, **k)
        mon.mark("decode")
        return out

    edits.forward_pre_hook(pipe.unet, first_unet_call)
    edits.wrap_method(pipe.vae, "decode", decode)
    _give_back_to_os()
    try:
        with MemoryMonitor() as mon:
            generate(pipe, config)
    finally:
        edits.undo()
    return {phase: peak - mon.before for phase, peak in mon.phases.items()}


# ------------------------------------------------------------------------------------- configuration
def test_requirements_refuse_other_pipelines_and_missing_spill_dir(tiny_sd, tmp_path):
    assert Staged.requirements(StagedConfig(), tiny_sd) == []
    assert "not a folder" in Staged.requirements(StagedConfig(spill_dir=str(tmp_path / "nope")))[0]
    with pytest.raises(DiffspeedError, match="Stable Diffusion / SDXL"):
        Recipe.of(StagedConfig()).validate(object())
    assert Staged(spill_dir=str(tmp_path)).config.spill_dir == str(tmp_path)


def test_spill_dir_is_used_and_left_empty(tiny_sd, tmp_path):
    seen = []
    hook = tiny_sd.unet.register_forward_pre_hook(lambda *_: seen.append(sorted(tmp_path.rglob("*.bin"))))
    try:
        generate(tiny_sd, StagedConfig(batch_size=3, spill_dir=str(tmp_path)), num_inference_steps=1)
    finally:
        hook.remove()
    assert seen[0] and not any(tmp_path.iterdir())
