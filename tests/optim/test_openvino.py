"""openvino: the UNet (whole or by blocks), VAE decode and text encoder on OpenVINO, cached by shape and on
disk, composing with deepcache through regional export, removed exactly."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from diffspeed import DiffspeedError
from diffspeed.core import Accelerated, Recipe, RecipeError
from diffspeed.optim.openvino import OpenVINO, OpenVINOConfig, fingerprint

from .contract import assert_same, snapshot

pytestmark = pytest.mark.skipif(importlib.util.find_spec("openvino") is None,
                                reason="openvino is not installed (pip install 'diffspeed[openvino]')")
PROMPT = "a red circle at top left on a blue background"


def run(pipe, size=64, steps=4, seed=0):
    return pipe([PROMPT], num_inference_steps=steps, guidance_scale=3.0, width=size, height=size,
                generator=[torch.Generator().manual_seed(seed)], output_type="np").images[0]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("openvino-cache"))


def test_whole_unet_matches_pytorch_and_removes_exactly(tiny_sd, cache):
    base = run(tiny_sd)
    before = snapshot(tiny_sd)
    latent = 64 // tiny_sd.vae_scale_factor
    config = OpenVINOConfig(precision="f32", cache_dir=cache, vae=True, text_encoder=True)
    with Accelerated(tiny_sd, [config]) as fast:
        first = run(fast)
        assert fast.stats["compiled_graphs"] == 3 and fast.stats["compile_ms"] > 0  # unet, vae decode, encoder
        wanted = f"openvino: unet exported and compiled for input (2, 4, {latent}, {latent})"
        assert any(wanted in e for e in fast.events), fast.events
        assert any("precision f32" in e for e in fast.events)
        again = run(fast)
        assert fast.stats.get("compiled_graphs", 0) == 0, "the same shapes compiled again"
        assert fast.effects["openvino"]["methods wrapped"] == 3
    np.testing.assert_allclose(first, base, atol=2e-3)
    assert np.array_equal(first, again)
    assert_same(before, snapshot(tiny_sd))
    assert np.array_equal(run(tiny_sd), base)


def test_new_size_compiles_another_model_and_disk_cache_serves_a_second_instance(tiny_sd, cache):
    config = OpenVINOConfig(precision="f32", cache_dir=cache)
    with Accelerated(tiny_sd, [config]) as fast:
        run(fast, size=64)  # exported by the first test (same weights, shape and versions): on disk
        assert any("loaded from the disk cache" in e for e in fast.events)
        run(fast, size=96)
        assert fast.stats["compiled_graphs"] == 1
        side = 96 // tiny_sd.vae_scale_factor
        assert any(f"exported and compiled for input (2, 4, {side}, {side})" in e for e in fast.events)


def test_fingerprint_follows_the_weights(tiny_sd):
    block = tiny_sd.unet.conv_out
    before = fingerprint(block)
    saved = block.weight.detach().clone()
    with torch.no_grad():
        block.weight[0, 0, 0, 0] += 1e-3
    try:
        assert fingerprint(block) != before
    finally:
        with torch.no_grad():
            block.weight.copy_(saved)


def test_a_call_with_hooks_added_since_runs_in_pytorch(tiny_sd, cache):
    """deepcache counts the MACs of one full call with forward hooks: they must see the modules run."""
    seen = []
    with Accelerated(tiny_sd, [OpenVINOConfig(precision="f32", cache_dir=cache)]) as fast:
        run(fast)
        handle = tiny_sd.unet.conv_out.register_forward_hook(lambda *a: seen.append(1))
        try:
            run(fast)
        finally:
            handle.remove()
        assert seen, "the hook never ran: the call went to OpenVINO"


def test_unsupported_argument_runs_in_pytorch_with_a_note(tiny_sd, cache):
    opt = OpenVINO(precision="f32", cache_dir=cache)
    from diffspeed.core import RunState

    state = RunState()
    opt.apply(tiny_sd, state)
    try:
        x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 77, tiny_sd.unet.config.cross_attention_dim)
        ref = opt.engines[0].fn(x, torch.tensor(10), ctx, cross_attention_kwargs={"scale": 1.0}).sample
        out = tiny_sd.unet(x, torch.tensor(10), ctx, cross_attention_kwargs={"scale": object()}).sample
        assert torch.equal(out, ref)
        assert any("runs in PyTorch for calls with" in e for e in state.events)
    finally:
        opt.remove()


@pytest.mark.parametrize("other", ["openvino", "compile"])
def test_whole_graph_clashes_with_deepcache_by_field(tiny_sd, other):
    with pytest.raises(RecipeError, match=f"set {other}.regional=true"):
        Recipe.from_dict({"optimization": [{"name": "deepcache"}, {"name": other}]}).validate(tiny_sd)
    Recipe.from_dict({"optimization": [{"name": "deepcache"}, {"name": other, "regional": True}]}).validate(tiny_sd)


def test_requirements_name_what_is_wrong(tiny_sd, monkeypatch):
    bf16 = type("P", (), {"unet": torch.nn.Linear(2, 2).to(torch.bfloat16), "vae": None})()
    assert any("bfloat16" in p for p in OpenVINO.requirements(OpenVINOConfig(), bf16))
    assert any("openvino.vae needs" in p for p in OpenVINO.requirements(OpenVINOConfig(vae=True), bf16))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "openvino" else real(n, *a))
    assert OpenVINO.requirements(OpenVINOConfig()) == ["needs the openvino package (pip install "
                                                        "'diffspeed[openvino]')"]


@pytest.mark.parametrize("field,value", [("precision", "fp8"), ("device", "C P U")])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(DiffspeedError) as info:
        OpenVINOConfig(**{field: value})
    assert info.value.field == field


def test_unwritable_cache_dir_names_the_field(tiny_sd, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    before = snapshot(tiny_sd)
    with pytest.raises(DiffspeedError, match="openvino.cache_dir") as info:
        Accelerated(tiny_sd, [OpenVINOConfig(cache_dir=str(blocker / "sub"))])
    assert info.value.field == "cache_dir"
    assert_same(before, snapshot(tiny_sd))


@pytest.mark.slow
def test_regional_under_deepcache_runs_compiled_shallow_blocks(tiny_sd, cache):
    """A cached call runs the shallow blocks on OpenVINO; the images follow deepcache alone's closely (f32)."""
    from diffspeed.optim.deepcache import DeepCacheConfig

    dc = DeepCacheConfig(interval=3, min_steps=1)
    with Accelerated(tiny_sd, [dc]) as fast:
        alone = run(fast, steps=8)
    before = snapshot(tiny_sd)
    with Accelerated(tiny_sd, [dc, OpenVINOConfig(regional=True, precision="f32", cache_dir=cache)]) as fast:
        run(fast, steps=8)  # exports; its first full call runs in PyTorch (deepcache counts MACs with hooks)
        both = run(fast, steps=8)
        assert fast.stats["deepcache_cached_calls"] > 0 and fast.stats["deepcache_skipped_macs"] > 0
    np.testing.assert_allclose(both, alone, atol=5e-3)
    assert_same(before, snapshot(tiny_sd))


def test_changed_weights_are_exported_again_not_served_stale(tiny_sd, cache):
    with Accelerated(tiny_sd, [OpenVINOConfig(precision="f32", cache_dir=cache)]) as fast:
        first = run(fast)
        weight = tiny_sd.unet.conv_out.bias
        saved = weight.detach().clone()
        with torch.no_grad():
            weight += 0.05  # in place, as a fused LoRA changes weights
        try:
            changed = run(fast)
            assert any("weights or LoRA scales changed" in e for e in fast.events)
            assert fast.stats["compiled_graphs"] == 1
        finally:
            with torch.no_grad():
                weight.copy_(saved)
    assert not np.allclose(first, changed, atol=1e-3)
