"""LoRA: load (diffusers and kohya layouts), weigh, switch without reloading, fuse, unfuse to the exact
baseline, unload -- and the shipped monochrome LoRA shifts the output as trained."""

import copy

import numpy as np
import pytest
import torch

from diffspeed import DiffspeedError, GenerateRequest, generate
from diffspeed.pipelines.load import shipped_path
from diffspeed.pipelines.lora import (
    active_loras,
    fuse_loras,
    load_lora,
    lora_parameters,
    parse_lora_spec,
    resolve_lora_path,
    set_loras,
    unfuse_loras,
    unload_loras,
)
from diffspeed.pngmeta import parse_parameters

PROMPT = "a red circle at center on a blue background"
SHIPPED = shipped_path("tiny-sd-lora-monochrome") / "pytorch_lora_weights.safetensors"


def _random_lora(unet, path, seed: int, kohya: bool = False):
    """A LoRA with random A and B (a strong, arbitrary effect), saved as diffusers or kohya safetensors."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    u = copy.deepcopy(unet)
    u.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False, target_modules=["to_q", "to_v"]))
    with torch.no_grad():
        for name, p in u.named_parameters():
            if "lora_B" in name:
                p.mul_(0.05)
    peft_sd = get_peft_model_state_dict(u)
    if kohya:
        sd = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in peft_sd.items()})
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
    else:
        StableDiffusionPipeline.save_lora_weights(path.parent, unet_lora_layers=convert_state_dict_to_diffusers(
            peft_sd), weight_name=path.name, safe_serialization=True)
    return path


def image(pipe, seed=1):
    out = generate(pipe, GenerateRequest(prompt=PROMPT, seed=seed, steps=6), progress=False)
    return np.asarray(out.images[0]), out


@pytest.fixture
def pipe(tiny_sd):
    yield tiny_sd
    unload_loras(tiny_sd)


@pytest.fixture(scope="module")
def lora_files(tiny_sd, tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    return {"a": _random_lora(tiny_sd.unet, d / "a.safetensors", 1),
            "b": _random_lora(tiny_sd.unet, d / "b.safetensors", 2),
            "a_kohya": _random_lora(tiny_sd.unet, d / "a_kohya.safetensors", 1, kohya=True)}


def test_weight_zero_is_the_baseline_and_unload_restores_it(pipe, lora_files):
    base, _ = image(pipe)
    load_lora(pipe, lora_files["a"], weight=0.0)
    assert np.array_equal(image(pipe)[0], base)
    set_loras(pipe, {"a": 1.0})
    assert not np.array_equal(image(pipe)[0], base)
    unload_loras(pipe)
    assert np.array_equal(image(pipe)[0], base)


def test_kohya_layout_gives_the_same_result_as_diffusers_layout(pipe, lora_files):
    load_lora(pipe, lora_files["a"])
    a, _ = image(pipe)
    unload_loras(pipe)
    load_lora(pipe, lora_files["a_kohya"])
    k, _ = image(pipe)
    assert np.abs(a.astype(int) - k.astype(int)).max() <= 1


def test_switching_loras_without_reloading(pipe, lora_files):
    load_lora(pipe, lora_files["a"])
    only_a, _ = image(pipe)
    load_lora(pipe, lora_files["b"])  # now both active
    set_loras(pipe, {"b": 1.0})
    only_b, _ = image(pipe)
    set_loras(pipe, {"a": 1.0})
    assert np.array_equal(image(pipe)[0], only_a)
    assert not np.array_equal(only_a, only_b)
    assert [i.name for i in active_loras(pipe)] == ["a"]


def test_fuse_matches_unfused_and_unfuse_is_bit_exact(pipe, lora_files):
    weights = {k: v.detach().clone() for k, v in pipe.unet.state_dict().items()}
    load_lora(pipe, lora_files["a"], weight=0.8)
    unfused, _ = image(pipe)
    fuse_loras(pipe)
    fused, _ = image(pipe)
    assert np.abs(fused.astype(int) - unfused.astype(int)).max() <= 2
    with pytest.raises(DiffspeedError):
        set_loras(pipe, {"a": 1.0})  # must unfuse first
    unfuse_loras(pipe)
    unload_loras(pipe)
    after = pipe.unet.state_dict()
    assert after.keys() == weights.keys()
    assert all(torch.equal(after[k], v) for k, v in weights.items())


def test_png_parameters_carry_lora_hashes(pipe, lora_files):
    load_lora(pipe, lora_files["a"], weight=0.5)
    assert "a: " in lora_parameters(pipe)["Lora hashes"]
    _, out = image(pipe)
    meta = parse_parameters(out.parameters[0])
    assert meta["Lora hashes"].startswith("a: ") and len(meta["Lora hashes"]) == len("a: ") + 12


@pytest.mark.parametrize("bad", ["/no/such/lora.safetensors", "lora.ckpt"])
def test_bad_lora_files_are_clear_errors(pipe, tmp_path, bad):
    if bad.endswith(".ckpt"):
        (tmp_path / bad).write_bytes(b"pickle")
        bad = tmp_path / bad
    with pytest.raises(DiffspeedError) as err:
        load_lora(pipe, bad)
    assert err.value.field == "lora"


def test_lora_for_another_architecture_is_refused(pipe, tiny_sdxl, tmp_path):
    path = _random_lora(tiny_sdxl.unet, tmp_path / "xl.safetensors", 3)
    with pytest.raises(DiffspeedError) as err:
        load_lora(pipe, path)
    assert err.value.field == "lora"


def test_parse_lora_spec(tmp_path):
    assert parse_lora_spec("x.safetensors:0.5") == ("x.safetensors", 0.5)
    assert parse_lora_spec("C:/loras/x.safetensors") == ("C:/loras/x.safetensors", 1.0)
    assert parse_lora_spec("C:\\loras\\x.safetensors") == ("C:\\loras\\x.safetensors", 1.0)
    assert parse_lora_spec("C:\\loras\\x.safetensors:-0.5") == ("C:\\loras\\x.safetensors", -0.5)
    assert parse_lora_spec("tiny-sd-lora-monochrome:.8") == ("tiny-sd-lora-monochrome", 0.8)
    odd = tmp_path / "style:v2.safetensors"  # a colon in an existing file's name is part of the path
    odd.write_bytes(b"")
    assert parse_lora_spec(str(odd)) == (str(odd), 1.0)
    with pytest.raises(DiffspeedError):
        parse_lora_spec("x.safetensors:99")


@pytest.mark.parametrize("weight", ["abc", "", "0.8x"])
def test_a_weight_that_is_not_a_number_says_so(weight):
    with pytest.raises(DiffspeedError, match=f"^lora weight '{weight}' is not a number") as err:
        parse_lora_spec(f"tiny-sd-lora-monochrome:{weight}")
    assert err.value.field == "lora"


@pytest.mark.skipif(not SHIPPED.exists(), reason="the monochrome LoRA is trained by tools/train_tiny_lora.py")
def test_loading_the_shipped_lora_prints_no_peft_warning(pipe):
    """peft warns (~5.7 KB) that the target-module names also match modules the LoRA has no weights for; that is
    harmless and filtered where the LoRA loads -- no other warning is."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_lora(pipe, "tiny-sd-lora-monochrome", weight=0.8)
    assert not [w for w in caught if "PEFT" in str(w.message)], [str(w.message)[:200] for w in caught]
    with warnings.catch_warnings(record=True) as caught:  # the filter is gone after the load
        warnings.simplefilter("always")
        warnings.warn("While injecting the PEFT adapters, an inconsistency ... The PEFT config contained these "
                      "additional target modules: ['x']. ", RuntimeWarning, stacklevel=1)
    assert len(caught) == 1


@pytest.mark.skipif(not SHIPPED.exists(), reason="the monochrome LoRA is trained by tools/train_tiny_lora.py")
def test_shipped_monochrome_lora_removes_colour_and_unfusing_restores_the_baseline(pipe):
    """Loaded by its shipped name, at tiny-sd's guidance (CFG 3): colour saturation falls as the weight rises (as
    trained; the model card has the numbers), the fused LoRA
    gives the unfused image, and unfuse + unload bring back the exact baseline images and weights."""
    from diffspeed.tiny.check import saturation

    prompts = ["a red circle at center on a blue background", "a yellow star at top left on a green background",
               "a green square at bottom right on an orange background"]

    def images():
        return [np.asarray(generate(pipe, GenerateRequest(prompt=p, seed=i, steps=16, cfg_scale=3.0),
                                    progress=False).images[0]) for i, p in enumerate(prompts)]

    def plain_weights():  # by module name, whether or not peft's wrappers (".base_layer") are still in place
        return {k.replace(".base_layer", ""): v.detach().clone() for k, v in pipe.unet.state_dict().items()
                if "lora_" not in k}

    weights = plain_weights()
    base = images()
    load_lora(pipe, "tiny-sd-lora-monochrome", weight=0.5)
    half = images()
    set_loras(pipe, {"tiny_sd_lora_monochrome": 1.0})
    full = images()
    assert saturation(full) < saturation(half) < saturation(base) and saturation(full) < 0.6 * saturation(base)
    fuse_loras(pipe)
    assert all(np.abs(a.astype(int) - b.astype(int)).max() <= 3 for a, b in zip(images(), full))
    unfuse_loras(pipe)
    unload_loras(pipe)
    assert all(np.array_equal(a, b) for a, b in zip(images(), base))
    after = plain_weights()
    assert after.keys() == weights.keys() and all(torch.equal(after[k], v) for k, v in weights.items())


def test_shipped_lora_name_is_a_clear_error_when_missing(monkeypatch, tmp_path):
    import diffspeed.pipelines.load as load_mod

    monkeypatch.setattr(load_mod, "installed_models_dir", lambda: tmp_path)
    with pytest.raises(DiffspeedError, match="tiny-sd-lora-monochrome is not shipped") as err:
        resolve_lora_path("tiny-sd-lora-monochrome")
    assert err.value.field == "lora"


@pytest.mark.skipif(not SHIPPED.exists(), reason="the monochrome LoRA is trained by tools/train_tiny_lora.py")
def test_a_file_mixing_two_key_layouts_loads_every_layer(pipe):
    """The shipped file keeps its attention layers in diffusers' older ``lora.down/lora.up`` keys and the rest in
    peft's ``lora_A/lora_B``; diffusers picks one layout from the first key and skipped the others silently.
    Every layer must load: fused, each weight is the one the accelerator's independent merge gives."""
    from safetensors.torch import load_file

    from diffspeed.core import Accelerated
    from diffspeed.optim.accelerator import AcceleratorConfig

    keys = list(load_file(SHIPPED))
    assert any(".lora.down." in k for k in keys) and any(".lora_A." in k for k in keys)  # the mixed file
    with Accelerated(pipe, [AcceleratorConfig(lora=str(SHIPPED))]):
        merged = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    base = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    load_lora(pipe, "tiny-sd-lora-monochrome")
    fuse_loras(pipe)
    try:
        fused = {k.replace(".base_layer", ""): v.clone() for k, v in pipe.unet.state_dict().items() if "lora_" not in k}
    finally:
        unload_loras(pipe)
    changed = [k for k in base if not torch.equal(fused[k], base[k])]
    assert len(changed) == len(keys) // 2 == 166  # every (down, up) pair changed its layer
    assert all(torch.allclose(fused[k], merged[k], atol=1e-6) for k in changed)
