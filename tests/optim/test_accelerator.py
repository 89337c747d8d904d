"""accelerator: step-distilled LoRAs in each method's published file layout, fused exactly and reversibly, with
the method's sampler, steps and guidance; full distilled UNets; the request/recipe rules.

The LoRA files are written here with random weights in the layouts the released files use:
- LCM-LoRA (latent-consistency/lcm-lora-sdv1-5) and Hyper-SD (ByteDance/Hyper-SD*-lora): kohya-style keys with
  diffusers block names, ``lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight`` / ``.lora_up.weight``
  / ``.alpha``;
- TCD (h1t/TCD-SD15, saved by diffusers' training script): ``unet.<module>.lora.down.weight`` / ``.lora.up.weight``;
- SDXL-Lightning's LoRA (ComfyUI/web-UI file): kohya keys with the original (SGM) block names,
  ``lora_unet_input_blocks_1_1_proj_in.lora_down.weight``, ``..._in_layers_2...`` for a ResNet's conv1.
The expected fused weight is computed here independently: W + (up @ down) * alpha / rank * weight.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from diffspeed import DiffspeedError
from diffspeed.core import Accelerated, Recipe
from diffspeed.generate import GenerateRequest, generate, resolve_sampling, sampling_notes
from diffspeed.optim.accelerator import AcceleratorConfig, parse_accelerator, recommended, steps_in_name
from diffspeed.optim.sampler import SamplerConfig

from .contract import assert_same, run, snapshot

PROMPT = "a red circle at top left on a blue background"

# (diffusers module path, SGM name) of tiny-sd's UNet (SD 1.x layout, layers_per_block 2) for a sample of layers
SGM = {
    "down_blocks.0.attentions.0.proj_in": "input_blocks_1_1_proj_in",
    "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q": "input_blocks_2_1_transformer_blocks_0_attn1_to_q",
    "down_blocks.0.resnets.0.conv1": "input_blocks_1_0_in_layers_2",
    "down_blocks.1.resnets.1.conv2": "input_blocks_5_0_out_layers_3",
    "down_blocks.1.resnets.0.time_emb_proj": "input_blocks_4_0_emb_layers_1",
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_k": "middle_block_1_transformer_blocks_0_attn2_to_k",
    "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2": "output_blocks_3_1_transformer_blocks_0_ff_net_2",
    "up_blocks.2.attentions.2.proj_out": "output_blocks_8_1_proj_out",
}
MODULES = list(SGM)


def _pair(module, rank: int, gen: torch.Generator):
    w = module.weight
    if w.dim() == 4:  # conv: down is a k x k conv to `rank` channels, up a 1x1 conv back
        down = torch.randn(rank, w.shape[1], *w.shape[2:], generator=gen) * 0.05
        up = torch.randn(w.shape[0], rank, 1, 1, generator=gen) * 0.05
    else:
        down = torch.randn(rank, w.shape[1], generator=gen) * 0.05
        up = torch.randn(w.shape[0], rank, generator=gen) * 0.05
    return down.half(), up.half()


def write_lora(unet, path, layout: str, rank: int = 4, alpha: float = 2.0, seed: int = 0) -> dict:
    """Write a LoRA for ``MODULES`` in ``layout``; return {module: (down, up, scale)} for the expected weights."""
    gen = torch.Generator().manual_seed(seed)
    sd, expected = {}, {}
    for mod in MODULES:
        down, up = _pair(unet.get_submodule(mod), rank, gen)
        if layout in ("lcm", "hyper-sd"):
            base = "lora_unet_" + mod.replace(".", "_")
            sd |= {f"{base}.lora_down.weight": down, f"{base}.lora_up.weight": up,
                   f"{base}.alpha": torch.tensor(alpha, dtype=torch.float16)}
            scale = alpha / rank
        elif layout == "tcd":
            sd |= {f"unet.{mod}.lora.down.weight": down, f"unet.{mod}.lora.up.weight": up}
            scale = 1.0
        elif layout == "lightning":
            base = "lora_unet_" + SGM[mod]
            sd |= {f"{base}.lora_down.weight": down, f"{base}.lora_up.weight": up,
                   f"{base}.alpha": torch.tensor(alpha, dtype=torch.float16)}
            scale = alpha / rank
        else:
            raise AssertionError(layout)
        expected[mod] = (down.float(), up.float(), scale)
    save_file(sd, str(path))
    return expected


def fused(weight: torch.Tensor, down, up, scale: float, strength: float = 1.0) -> torch.Tensor:
    delta = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape) * scale * strength
    return (weight.float() + delta).to(weight.dtype)


FILES = {"lcm": "lcm-lora-sdv1-5.safetensors", "tcd": "TCD-SD15-LoRA.safetensors",
         "hyper-sd": "Hyper-SD15-8steps-lora.safetensors", "lightning": "sd15_lightning_2step_lora.safetensors"}
SCHEDULERS = {"lcm": "LCMScheduler", "tcd": "TCDScheduler", "hyper-sd": "DDIMScheduler",
              "lightning": "EulerDiscreteScheduler"}
STEPS = {"lcm": 4, "tcd": 4, "hyper-sd": 8, "lightning": 2}


@pytest.mark.parametrize("method", list(FILES))
def test_each_method_loads_its_published_layout_exactly_and_removes_bit_for_bit(tiny_sd, tmp_path, method):
    path = tmp_path / FILES[method]
    expected = write_lora(tiny_sd.unet, path, method)
    originals = {k: v.clone() for k, v in tiny_sd.unet.state_dict().items()}
    before = snapshot(tiny_sd)
    config = AcceleratorConfig(method=method, lora=str(path), weight=0.8)
    with Accelerated(tiny_sd, [config]) as fast:
        changed = {k for k, v in tiny_sd.unet.state_dict().items() if not torch.equal(v, originals[k])}
        assert changed == {f"{m}.weight" for m in MODULES}
        for mod, (down, up, scale) in expected.items():
            want = fused(originals[f"{mod}.weight"], down, up, scale, 0.8)
            torch.testing.assert_close(tiny_sd.unet.get_submodule(mod).weight, want, rtol=0, atol=1e-6)
        assert type(tiny_sd.scheduler).__name__ == SCHEDULERS[method]
        if method in ("hyper-sd", "lightning"):
            assert tiny_sd.scheduler.config.timestep_spacing == "trailing"
        rec = fast.optimizations[0].recommended
        assert rec.steps == STEPS[method]
        assert rec.cfg_scale == (1.0 if method == "lcm" else 0.0)
        assert rec.eta == (0.3 if method == "tcd" else None)
        fast(PROMPT, generator=torch.Generator().manual_seed(0), output_type="np")
        assert fast.stats["denoiser_calls"] == STEPS[method]  # recommended steps, no CFG batch
        assert fast.effects["accelerator"]["tensors changed"] == len(MODULES)
    assert_same(before, snapshot(tiny_sd))


def test_matches_peft_fuse_of_the_same_lora(tiny_sd, tmp_path):
    """The delta diffspeed adds is the one peft fuses (diffusers' own LoRA path) for a peft-layout file."""
    from diffspeed.pipelines.lora import fuse_loras, load_lora, unload_loras

    gen = torch.Generator().manual_seed(3)
    sd = {}
    for mod in MODULES:
        down, up = _pair(tiny_sd.unet.get_submodule(mod), 4, gen)
        sd |= {f"unet.{mod}.lora_A.weight": down, f"unet.{mod}.lora_B.weight": up}
    save_file(sd, str(tmp_path / "peft.safetensors"))
    load_lora(tiny_sd, tmp_path / "peft.safetensors")
    fuse_loras(tiny_sd)
    try:
        ref = {m: tiny_sd.unet.get_submodule(m).get_base_layer().weight.clone() for m in MODULES}
    finally:
        unload_loras(tiny_sd)
    with Accelerated(tiny_sd, [AcceleratorConfig(method="lcm", lora=str(tmp_path / "peft.safetensors"))]):
        for m in MODULES:
            assert torch.equal(tiny_sd.unet.get_submodule(m).weight, ref[m])


def test_user_lora_stays_loaded_on_top(tiny_sd, tmp_path):
    from diffspeed.pipelines.lora import load_lora, unload_loras

    write_lora(tiny_sd.unet, tmp_path / "lcm.safetensors", "lcm")
    load_lora(tiny_sd, "tiny-sd-lora-monochrome", weight=0.5)
    try:
        before = snapshot(tiny_sd)
        with Accelerated(tiny_sd, [AcceleratorConfig(method="lcm", lora=str(tmp_path / "lcm.safetensors"))]) as f:
            f(PROMPT, generator=torch.Generator().manual_seed(0), output_type="np")
        assert_same(before, snapshot(tiny_sd))
    finally:
        unload_loras(tiny_sd)


def test_sdxl_lora_in_lcm_layout(tiny_sdxl, tmp_path):
    unet = tiny_sdxl.unet
    mods = [n for n, m in unet.named_modules() if n.endswith(("attn1.to_q", "conv1")) and hasattr(m, "weight")][:6]
    gen = torch.Generator().manual_seed(0)
    sd = {}
    for mod in mods:
        down, up = _pair(unet.get_submodule(mod), 4, gen)
        base = "lora_unet_" + mod.replace(".", "_")
        sd |= {f"{base}.lora_down.weight": down, f"{base}.lora_up.weight": up, f"{base}.alpha": torch.tensor(4.0)}
    save_file(sd, str(tmp_path / "lcm-lora-sdxl.safetensors"))
    run(tiny_sdxl, steps=1)  # transformers installs its output-recording hooks on a text encoder's first call
    before = snapshot(tiny_sdxl)
    with Accelerated(tiny_sdxl, [AcceleratorConfig(method="lcm", lora=str(tmp_path / "lcm-lora-sdxl.safetensors"))]) \
            as fast:
        assert fast.effects["accelerator"]["tensors changed"] == len(mods)
        fast(PROMPT, generator=torch.Generator().manual_seed(0), output_type="np")
    assert_same(before, snapshot(tiny_sdxl))


def test_full_distilled_unet_checkpoint(tiny_sd, tmp_path):
    state = {k: v.clone() for k, v in tiny_sd.unet.state_dict().items()}
    state["conv_out.weight"] = state["conv_out.weight"] * 1.01
    save_file(state, str(tmp_path / "unet.safetensors"))
    before = snapshot(tiny_sd)
    with Accelerated(tiny_sd, [AcceleratorConfig(method="lightning", unet=str(tmp_path / "unet.safetensors"),
                                                 steps=4)]) as fast:
        assert torch.equal(tiny_sd.unet.conv_out.weight, state["conv_out.weight"])
        assert fast.effects["accelerator"]["tensors changed"] == 1
    assert_same(before, snapshot(tiny_sd))
    del state["conv_out.weight"]
    save_file(state, str(tmp_path / "broken.safetensors"))
    with pytest.raises(DiffspeedError, match="not a UNet of this architecture: 1 weights missing") as err:
        Accelerated(tiny_sd, [AcceleratorConfig(method="lightning", unet=str(tmp_path / "broken.safetensors"))])
    assert err.value.field == "unet"
    assert_same(before, snapshot(tiny_sd))


def test_a_lora_for_another_model_is_refused_by_name(tiny_sd, tiny_sdxl, tmp_path):
    write_lora(tiny_sd.unet, tmp_path / "sd.safetensors", "lcm")
    before = snapshot(tiny_sdxl)
    with pytest.raises(DiffspeedError, match="does not fit this model") as err:
        Accelerated(tiny_sdxl, [AcceleratorConfig(method="lcm", lora=str(tmp_path / "sd.safetensors"))])
    assert err.value.field == "lora"
    assert_same(before, snapshot(tiny_sdxl))
    with pytest.raises(DiffspeedError, match="no lcm LoRA is shipped for tiny-sdxl"):
        Accelerated(tiny_sdxl, [AcceleratorConfig(method="lcm")])


def test_config_checks_and_cli_spec():
    assert steps_in_name("Hyper-SD15-8steps-lora.safetensors") == 8
    assert steps_in_name("sdxl_lightning_4step_lora.safetensors") == 4
    assert steps_in_name("lcm-lora-sdv1-5.safetensors") is None
    assert parse_accelerator("LCM:0.5") == {"name": "accelerator", "method": "lcm", "weight": 0.5}
    for spec, match in (("foo", "unknown method 'foo'"), ("lcm:x", "weight 'x' is not a number"),
                        ("lcm:3", r"weight must be in \[0.0, 2.0\]")):
        with pytest.raises(DiffspeedError, match=match) as err:
            parse_accelerator(spec)
        assert err.value.field == "accelerator"
    with pytest.raises(DiffspeedError, match="give lora or unet, not both"):
        AcceleratorConfig(lora="a", unet="b")
    with pytest.raises(DiffspeedError, match="eta is TCD's gamma"):
        AcceleratorConfig(method="lcm", eta=0.5)
    assert recommended(AcceleratorConfig(method="tcd", eta=0.1)).eta == 0.1
    assert recommended(AcceleratorConfig(method="hyper-sd", lora="x/Hyper-SD15-2steps-lora.safetensors")).steps == 2


def test_recipe_rules(tiny_sd):
    recipe = Recipe.of(AcceleratorConfig(method="lcm", lora="x.safetensors"))
    bare = GenerateRequest(prompt=PROMPT)
    assert resolve_sampling(bare, recipe, tiny_sd) == ("LCM", 4, 1.0, None)
    mine = GenerateRequest(prompt=PROMPT, steps=6, cfg_scale=2.0)
    assert resolve_sampling(mine, recipe, tiny_sd) == ("LCM", 6, 2.0, None)
    notes = sampling_notes(mine, recipe)
    assert len(notes) == 2 and "steps 6 as asked, instead of the recommended 4" in notes[0]
    with pytest.raises(DiffspeedError, match="the recipe's accelerator") as err:
        resolve_sampling(GenerateRequest(prompt=PROMPT, sampler="Euler"), recipe)
    assert err.value.field == "sampler"
    tcd = Recipe.of(AcceleratorConfig(method="tcd", lora="x.safetensors"))
    assert resolve_sampling(bare, tcd).eta == 0.3
    assert resolve_sampling(GenerateRequest(prompt=PROMPT, eta=0.6), tcd).eta == 0.6
    with pytest.raises(DiffspeedError, match="conflict|sampler"):
        Recipe.of(AcceleratorConfig(method="lcm"), SamplerConfig(sampler="Euler")).validate()


def test_generate_with_accelerator_reports_and_overrides(tiny_sd, tmp_path):
    write_lora(tiny_sd.unet, tmp_path / "tcd.safetensors", "tcd")
    before = snapshot(tiny_sd)
    with Accelerated(tiny_sd, [AcceleratorConfig(method="tcd", lora=str(tmp_path / "tcd.safetensors"))],
                     strict=False) as fast:
        result = generate(tiny_sd, GenerateRequest(prompt=PROMPT, seed=1), runner=fast, progress=False)
        assert (result.request.sampler, result.request.steps, result.request.cfg_scale, result.request.eta) == \
            ("TCD", 4, 0.0, 0.3)
        assert result.stats["denoiser_calls"] == 4 and "Sampler: TCD" in result.parameters[0]
        again = generate(tiny_sd, GenerateRequest(prompt=PROMPT, seed=1, steps=3, eta=0.5), runner=fast,
                         progress=False)
        assert again.stats["denoiser_calls"] == 3 and "Eta: 0.5" in again.parameters[0]
        assert any("steps 3 as asked" in e for e in again.events)
        same = generate(tiny_sd, GenerateRequest(prompt=PROMPT, seed=1), runner=fast, progress=False)
        assert np.array_equal(np.asarray(same.images[0]), np.asarray(result.images[0]))
    assert_same(before, snapshot(tiny_sd))
    assert np.asarray(run(tiny_sd)).std() > 0


def test_eta_only_for_samplers_that_read_it():
    with pytest.raises(DiffspeedError, match="reads no eta") as err:
        GenerateRequest(prompt=PROMPT, sampler="Euler", eta=0.5)
    assert err.value.field == "eta"
    assert GenerateRequest(prompt=PROMPT, sampler="DDIM", eta=0.5).eta == 0.5


def test_originals_on_disk_restore_exactly(tiny_sd, tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))  # the spill folder lands here, and is removed again
    write_lora(tiny_sd.unet, tmp_path / "lcm.safetensors", "lcm")
    before = snapshot(tiny_sd)
    with Accelerated(tiny_sd, [AcceleratorConfig(lora=str(tmp_path / "lcm.safetensors"), originals="disk")]):
        assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 1
    assert_same(before, snapshot(tiny_sd))
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]
