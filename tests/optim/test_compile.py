"""compile: order rule, exact undo, compile-time bookkeeping; numerics against eager on tiny-sd (slow)."""

from __future__ import annotations

import types
import warnings

import numpy as np
import pytest
import torch

from diffspeed import DiffspeedError, Recipe
from diffspeed.core import Accelerated, RunState
from diffspeed.optim.cfg_cutoff import CfgCutoffConfig
from diffspeed.optim.compile import Compile, CompileConfig, repeated_blocks

from .contract import PROMPT, assert_same, run, snapshot


# ------------------------------------------------------------------------------------------------- config
def test_bad_values_name_the_field():
    with pytest.raises(DiffspeedError, match="compile.mode") as err:
        CompileConfig(mode="fastest")
    assert err.value.field == "mode"
    with pytest.raises(DiffspeedError, match="needs backend 'inductor'") as err:
        CompileConfig(backend="eager", mode="max-autotune")
    assert err.value.field == "mode"
    with pytest.raises(DiffspeedError) as err:
        CompileConfig(regional="yes")
    assert err.value.field == "regional"


def test_compile_must_come_last_in_a_recipe():
    late = Recipe.of(CfgCutoffConfig(), CompileConfig(backend="eager"))
    early = Recipe.of(CompileConfig(backend="eager"), CfgCutoffConfig())
    assert late.check() == []
    assert any("compile must be the last" in p for p in early.check())


# ------------------------------------------------------------------------------- undo without any call
@pytest.mark.parametrize("fields", [{}, {"regional": True}, {"vae": True, "mode": "max-autotune"}],
                         ids=["whole", "regional", "vae"])
def test_apply_then_remove_without_a_call_restores_everything(tiny_sd, fields):
    unet, vae = tiny_sd.unet, tiny_sd.vae
    forward, decode = unet.forward, vae.decode
    before = snapshot(tiny_sd)
    opt = Compile(**fields).apply(tiny_sd, RunState())  # torch.compile is lazy: nothing compiles here
    assert "forward" in vars(unet) and ("decode" in vars(vae)) == bool(fields.get("vae"))
    if fields.get("regional"):
        blocks = repeated_blocks(unet)
        assert len(blocks) > 10 and all("forward" in vars(b) for _, b in blocks)
    opt.remove()
    assert_same(before, snapshot(tiny_sd))
    assert "forward" not in vars(unet) and "decode" not in vars(vae)
    assert unet.forward == forward and vae.decode == decode
    assert not any("forward" in vars(m) for m in unet.modules())


def test_regional_finds_the_outermost_repeated_blocks(tiny_sd):
    blocks = repeated_blocks(tiny_sd.unet)
    kinds = {type(b).__name__ for _, b in blocks}
    assert kinds == {"BasicTransformerBlock", "ResnetBlock2D"}
    paths = [p for p, _ in blocks]
    assert not any(q.startswith(p + ".") for p in paths for q in paths)  # none inside another


# -------------------------------------------------------------- bookkeeping on a toy, through dynamo only
class _Block(torch.nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.lin = torch.nn.Linear(n, n)

    def forward(self, x):
        return torch.relu(self.lin(x)) + x


class _Toy(torch.nn.Module):
    _repeated_blocks = ("_Block",)

    def __init__(self, n: int = 5):
        super().__init__()
        self.a, self.b = _Block(n), _Block(n)

    def forward(self, sample, t=None):
        return self.b(self.a(sample))


def _toy_pipe():
    torch.manual_seed(0)
    return types.SimpleNamespace(unet=_Toy().eval().requires_grad_(False))


def _recompile_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "triggers a recompile" in str(w.message)]


@pytest.mark.parametrize("regional", [False, True])
def test_compile_time_is_reported_and_a_new_shape_warns_of_a_recompile(regional):
    """backend='eager': dynamo traces and caches graphs, no code generation, so this is quick."""
    pipe, state = _toy_pipe(), RunState()
    eager = pipe.unet.forward
    # shapes of their own per variant: dynamo's cache is per code object and process-wide
    n = 7 if regional else 3
    x, y = torch.randn(n, 5), torch.randn(n + 1, 5)
    opt = Compile(backend="eager", regional=regional).apply(pipe, state)
    try:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            out = pipe.unet(x)
        assert not _recompile_warnings(record)  # the first shape is no recompile
        assert torch.allclose(out, eager(x))
        assert state.stats["compile_ms"] > 0 and state.stats["compiled_graphs"] >= 1
        assert any("compiled" in e for e in state.events)
        state.reset()
        pipe.unet(x)  # cached: run time only
        assert "compile_ms" not in state.stats and not state.events
        with pytest.warns(UserWarning, match=rf"new unet input shape \({n + 1}, 5\) \(float32\) triggers a "
                                             rf"recompile \(~\d+ s"):
            assert torch.allclose(pipe.unet(y), eager(y))
        assert state.stats["compiled_graphs"] >= 1 and "triggers a recompile" in state.events[0]
    finally:
        opt.remove()
    assert "forward" not in vars(pipe.unet) and not any("forward" in vars(m) for m in pipe.unet.modules())


def test_dynamic_shapes_do_not_warn():
    pipe, state = _toy_pipe(), RunState()
    opt = Compile(backend="eager", dynamic=True).apply(pipe, state)
    try:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            for rows in (11, 12, 13):
                pipe.unet(torch.randn(rows, 5))
    finally:
        opt.remove()
    assert not _recompile_warnings(record)
    assert not any("triggers a recompile" in e for e in state.events)


def test_regional_without_repeated_blocks_fails_clearly():
    pipe = types.SimpleNamespace(unet=torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(DiffspeedError, match="compile.regional") as err:
        Compile(backend="eager", regional=True).apply(pipe, RunState())
    assert err.value.field == "regional" and "forward" not in vars(pipe.unet)


# ---------------------------------------------------------------------------------- real compile (slow)
@pytest.mark.slow
def test_whole_unet_and_vae_compile_match_eager_and_remove_restores(tiny_sd):
    baseline = run(tiny_sd)
    before = snapshot(tiny_sd)
    with Accelerated(tiny_sd, [CompileConfig(vae=True)]) as fast:
        first = run(fast)
        compile_stats = dict(fast.stats)
        second = run(fast)
        assert "compile_ms" not in fast.stats  # the graphs are cached: run time only
        assert compile_stats["denoiser_calls"] == fast.stats["denoiser_calls"]
    assert np.allclose(first, baseline, atol=1e-4) and np.allclose(second, baseline, atol=1e-4)
    # compiled now, or cached by an earlier test of this process (then nothing was compiled)
    assert compile_stats.get("compile_ms", 1) > 0
    assert_same(before, snapshot(tiny_sd))
    assert np.array_equal(run(tiny_sd), baseline)  # eager again, bit for bit


@pytest.mark.slow
def test_regional_compile_matches_eager(tiny_sd):
    baseline = run(tiny_sd)
    before = snapshot(tiny_sd)
    with Accelerated(tiny_sd, [CompileConfig(regional=True, fullgraph=True)]) as fast:
        images = run(fast)
    assert np.allclose(images, baseline, atol=1e-4)
    assert_same(before, snapshot(tiny_sd))


@pytest.mark.slow
def test_a_new_batch_size_warns_of_the_recompile(tiny_sd):
    with Accelerated(tiny_sd, [CompileConfig()]) as fast:
        run(fast, steps=2)  # batch of 4 UNet rows: 2 prompts x CFG
        with pytest.warns(UserWarning, match=r"new unet input shape \(2, 4, 16, 16\).*triggers a recompile"):
            fast(PROMPT, num_inference_steps=2, output_type="np")  # 1 prompt: 2 rows
        assert any("triggers a recompile" in e for e in fast.events)
