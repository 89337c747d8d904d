"""Every optimization on every workflow: it runs (or is rejected up front, with its reason), the output has
the workflow's size and is finite, and removing it leaves the pipeline exactly as it was.

The matrix itself (docs/compatibility.md) is generated from the optimizations' declarations; a test keeps the
committed file equal to what the code says.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffspeed import GenerateRequest, accelerate, generate
from diffspeed.core import RecipeError, all_optimizations
from diffspeed.core.optimization import compatibility, compatibility_matrix
from diffspeed.pipelines.lora import load_lora, unload_loras

from .contract import assert_same, snapshot

OPTS = all_optimizations()
RUNNABLE = [n for n, cls in OPTS.items() if not cls.requirements(cls.Config(**cls.example))]
PROMPT = "a red circle at center on a blue background"
MATRIX_DOC = Path(__file__).resolve().parents[2] / "docs" / "compatibility.md"
CPU_WORKFLOWS = ["txt2img", "img2img", "inpaint", "hires", "lora"]


def _marked(names):
    return [pytest.param(n, marks=pytest.mark.slow) if getattr(OPTS[n], "contract_slow", False) else n
            for n in names]


def _request(workflow: str, steps: int | None = 4) -> tuple[GenerateRequest, tuple[int, int]]:
    """``steps`` None: the recipe's sampler optimization sets them (a request may not contradict it)."""
    init = Image.new("RGB", (64, 64), (30, 70, 220))
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    kw = dict(prompt=PROMPT, seed=3, steps=steps)
    if workflow == "img2img":
        return GenerateRequest(**kw, init_image=init, denoising_strength=0.5), (64, 64)
    if workflow == "inpaint":
        return GenerateRequest(**kw, init_image=init, mask_image=mask, denoising_strength=0.75), (64, 64)
    if workflow == "hires":
        return GenerateRequest(**kw, hires_scale=1.5, denoising_strength=0.5), (96, 96)
    return GenerateRequest(**kw, batch_size=2), (64, 64)


@pytest.fixture(scope="module")
def lora_file(tiny_sd, tmp_path_factory):
    from ..pipelines.test_lora import _random_lora

    return _random_lora(tiny_sd.unet, tmp_path_factory.mktemp("lora") / "m.safetensors", 5)


@pytest.mark.parametrize("workflow", CPU_WORKFLOWS)
@pytest.mark.parametrize("name", _marked(RUNNABLE))
def test_optimization_on_workflow(tiny_sd, lora_file, name, workflow):
    cls = OPTS[name]
    if workflow == "lora":
        load_lora(tiny_sd, lora_file, weight=0.7)
    try:
        before = snapshot(tiny_sd)
        request, size = _request("txt2img" if workflow == "lora" else workflow,
                                 None if "steps" in cls.example else 4)
        verdict, reason = compatibility(cls, workflow)
        with accelerate(tiny_sd, [cls.Config(**cls.example)]) as fast:
            if verdict == "rejected":
                with pytest.raises(RecipeError, match=workflow):
                    generate(tiny_sd, request, runner=fast, progress=False)
                return
            out = generate(tiny_sd, request, runner=fast, progress=False)
        assert all(im.size == size for im in out.images)
        assert all(np.isfinite(np.asarray(im, dtype=float)).all() for im in out.images)
        assert out.stats["denoiser_calls"] > 0
        if verdict == "no effect":
            assert any(name in e and "no effect" in e for e in out.events)
        assert_same(before, snapshot(tiny_sd))
    finally:
        unload_loras(tiny_sd)


def test_compatibility_doc_is_generated_from_the_code():
    expected = compatibility_matrix(document=True)
    assert MATRIX_DOC.read_text() == expected, "regenerate: diffspeed optimizations --matrix > docs/compatibility.md"
