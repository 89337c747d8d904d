"""ControlNet on the tiny models (SD 1.x and SDXL layouts): the control mask moves the shapes (trained mask
ControlNet), control scale 0 is exactly the plain image, and every bad setting is a clear error."""

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

from diffspeed import DiffspeedError, GenerateRequest, accelerate, generate
from diffspeed.cli import main
from diffspeed.optim.cfg_cutoff import CfgCutoffConfig
from diffspeed.pipelines.load import shipped_path
from diffspeed.pngmeta import parse_parameters, read_parameters
from diffspeed.resolve import Resolver
from diffspeed.tiny.check import foreground

PROMPT = "a red circle at center on a blue background"
SHIPPED = {"sd": "tiny-sd-controlnet-mask", "sdxl": "tiny-sdxl-controlnet-mask"}
MIN_TRAINED_STEPS = 500  # below this the shipped ControlNet is a smoke-test leftover, not a trained one


def disc_mask(cx: int, cy: int, r: int = 10) -> Image.Image:
    im = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(im).ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    return im


TOP_LEFT, BOTTOM_RIGHT = disc_mask(14, 14), disc_mask(50, 50)


def run(pipe, runner=None, resolver=None, **kw):
    kw.setdefault("steps", 8)
    kw.setdefault("prompt", PROMPT)
    kw.setdefault("sampler", "Euler")
    return generate(pipe, GenerateRequest(**kw), progress=False, runner=runner, resolver=resolver)


@pytest.fixture(params=["sd", "sdxl"])
def family(request):
    return request.param


@pytest.fixture
def pipe(family, request):
    return request.getfixturevalue(f"tiny_{family}")


@pytest.fixture(scope="module")
def untrained(tmp_path_factory, tiny_sd, tiny_sdxl):
    """For each family, a ControlNet from ``from_unet`` whose zero convolutions are made non-zero: it changes
    the image (a trained one needs the training leg), so the plumbing -- scale, start/end, every workflow -- can
    be proven on it. Saved as a folder, loaded by path like a user's ControlNet."""
    from diffusers import ControlNetModel

    out = {}
    for family, p in (("sd", tiny_sd), ("sdxl", tiny_sdxl)):
        torch.manual_seed(0)
        cn = ControlNetModel.from_unet(p.unet, conditioning_embedding_out_channels=(16, 32, 64))
        with torch.no_grad():
            for name, prm in cn.named_parameters():
                if name.startswith(("controlnet_down_blocks", "controlnet_mid_block",
                                    "controlnet_cond_embedding.conv_out")):
                    prm.normal_(0.0, 0.05)
        out[family] = tmp_path_factory.mktemp(f"cn-{family}")
        cn.save_pretrained(out[family])
    return out


def max_diff(a, b) -> int:
    return int(np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max())


def test_control_scale_zero_is_the_plain_image_and_one_is_not(pipe, family, untrained):
    plain = run(pipe, seed=1, batch_size=2).images
    zero = run(pipe, seed=1, batch_size=2, controlnet=untrained[family], control_image=TOP_LEFT, control_scale=0.0)
    one = run(pipe, seed=1, batch_size=2, controlnet=untrained[family], control_image=TOP_LEFT, control_scale=1.0)
    assert all(max_diff(a, b) <= 1 for a, b in zip(plain, zero.images))  # zero residuals: the same denoising
    assert all(max_diff(a, b) > 10 for a, b in zip(plain, one.images))


def test_control_image_and_guidance_window_matter(pipe, family, untrained):
    kw = dict(seed=2, controlnet=untrained[family])
    full = run(pipe, **kw, control_image=TOP_LEFT).images[0]
    other = run(pipe, **kw, control_image=BOTTOM_RIGHT).images[0]
    late = run(pipe, **kw, control_image=TOP_LEFT, control_start=0.5).images[0]
    assert max_diff(full, other) > 0 and max_diff(full, late) > 0


def test_controlnet_parameters_in_the_png(tiny_sd, untrained, tmp_path):
    out = run(tiny_sd, seed=3, controlnet=str(untrained["sd"]), control_image=TOP_LEFT, control_scale=0.7,
              control_start=0.1, control_end=0.9)
    entry = parse_parameters(out.parameters[0])["ControlNet 0"]
    assert entry.startswith("Module: none, Model: ") and "Weight: 0.7" in entry
    assert "Guidance Start: 0.1" in entry and "Guidance End: 0.9" in entry
    assert f"{untrained['sd'].name} [" in entry  # name and short hash, as the web UI extension writes them


def test_controlnet_through_an_accelerated_runner(tiny_sd, untrained):
    plain = run(tiny_sd, seed=4, controlnet=untrained["sd"], control_image=TOP_LEFT).images[0]
    with accelerate(tiny_sd, []) as fast:
        out = run(tiny_sd, runner=fast, seed=4, controlnet=untrained["sd"], control_image=TOP_LEFT)
    assert max_diff(plain, out.images[0]) == 0 and out.stats["denoiser_calls"] == 8
    with accelerate(tiny_sd, [CfgCutoffConfig(fraction=0.5)]) as fast:  # halves the batch, residuals included
        out = run(tiny_sd, runner=fast, seed=4, controlnet=untrained["sd"], control_image=TOP_LEFT)
    assert out.stats["unconditional_evals"] == 4 and out.images[0].size == (64, 64)


def test_controlnet_with_img2img_inpaint_and_hires(tiny_sd, untrained):
    init = run(tiny_sd, seed=1).images[0]
    cn = dict(controlnet=untrained["sd"], control_image=TOP_LEFT)
    plain = run(tiny_sd, seed=5, init_image=init, denoising_strength=0.6).images[0]
    zero = run(tiny_sd, seed=5, init_image=init, denoising_strength=0.6, control_scale=0.0, **cn).images[0]
    one = run(tiny_sd, seed=5, init_image=init, denoising_strength=0.6, **cn).images[0]
    assert max_diff(plain, zero) <= 1 and max_diff(plain, one) > 10
    mask = np.zeros((64, 64), np.uint8)
    mask[:32, :32] = 255
    out = run(tiny_sd, seed=5, init_image=init, mask_image=mask, denoising_strength=1.0, **cn).images[0]
    assert (np.asarray(out)[40:, 40:] == np.asarray(init)[40:, 40:]).all()  # the overlay still holds
    big = run(tiny_sd, seed=5, hires_scale=2.0, hires_steps=4, denoising_strength=0.5, **cn)
    assert big.images[0].size == (128, 128) and "ControlNet 0" in big.parameters[0]


def _trained(family: str):
    path = shipped_path(SHIPPED[family])
    if not (path / "config.json").is_file():
        pytest.skip(f"{SHIPPED[family]} is not shipped yet: it comes from "
                    f"'tools/train_tiny_extras.py controlnet --family {family}'")
    steps = json.loads((path / "training.json").read_text())["step"]
    if steps < MIN_TRAINED_STEPS:
        pytest.skip(f"{SHIPPED[family]} has {steps} training steps (< {MIN_TRAINED_STEPS}): not trained yet")
    return SHIPPED[family]


def _share(images, mask: Image.Image) -> float:
    """Fraction of the images' shape pixels that lie inside ``mask`` (dilated by a few pixels)."""
    inside = np.asarray(mask.convert("L").resize((64, 64)).filter(ImageFilter.MaxFilter(7))) > 0
    fg = np.stack([foreground(im) for im in images])
    return float(fg[:, inside].sum() / max(1, fg.sum()))


def test_trained_mask_controlnet_moves_the_shape(pipe, family):
    name = _trained(family)
    kw = dict(seed=10, batch_size=4, steps=12, controlnet=name)
    tl = run(pipe, **kw, control_image=TOP_LEFT).images
    br = run(pipe, **kw, control_image=BOTTOM_RIGHT).images
    # the caption says "at center"; the mask wins: shape pixels concentrate where the mask is
    assert _share(tl, TOP_LEFT) > 0.5 and _share(br, BOTTOM_RIGHT) > 0.5
    assert _share(tl, TOP_LEFT) > _share(tl, BOTTOM_RIGHT) + 0.3
    assert _share(br, BOTTOM_RIGHT) > _share(br, TOP_LEFT) + 0.3


@pytest.mark.parametrize("kw, field", [
    (dict(control_image=TOP_LEFT), "control_image"),
    (dict(controlnet="tiny-sd-controlnet-mask"), "controlnet"),
    (dict(controlnet="/no/such/controlnet", control_image=TOP_LEFT), "controlnet"),
    (dict(controlnet="tiny-sd-controlnet-mask", control_image="/no/such/mask.png"), "control_image"),
    (dict(control_scale=2.5), "control_scale"),
    (dict(control_scale=-0.1), "control_scale"),
    (dict(control_start=-0.5), "control_start"),
    (dict(control_end=1.5), "control_end"),
    (dict(control_start=0.6, control_end=0.4), "control_end"),
])
def test_bad_controlnet_settings_name_the_field(kw, field):
    with pytest.raises(DiffspeedError) as err:  # the request's own checks, then the resolver's pre-flight
        Resolver().check(GenerateRequest(prompt=PROMPT, **kw))
    assert err.value.field == field


def test_missing_controlnet_folder_says_what_is_expected():
    with pytest.raises(DiffspeedError, match="ControlNetModel folder.*config.json.*/no/such/controlnet"):
        Resolver().check(GenerateRequest(prompt=PROMPT, controlnet="/no/such/controlnet", control_image=TOP_LEFT))


def test_controlnet_of_another_family_is_refused(tiny_sdxl, untrained):
    with pytest.raises(DiffspeedError, match="does not fit this model") as err:
        run(tiny_sdxl, seed=1, controlnet=untrained["sd"], control_image=TOP_LEFT)
    assert err.value.field == "controlnet"


def test_cli_controlnet(tmp_path, capsys, untrained):
    mask = tmp_path / "mask.png"
    TOP_LEFT.save(mask)
    rc = main(["generate", PROMPT, "--seed", "1", "--steps", "4", "--out", str(tmp_path / "out"),
               "--controlnet", str(untrained["sd"]), "--control-image", str(mask), "--control-scale", "0.5",
               "--control-end", "0.8"])
    assert rc == 0
    meta = read_parameters(next((tmp_path / "out").glob("*.png")))
    assert "Weight: 0.5" in meta["ControlNet 0"] and "Guidance End: 0.8" in meta["ControlNet 0"]
    for args, field in ((["--control-image", str(mask)], "control_image"),
                        (["--controlnet", str(tmp_path / "none"), "--control-image", str(mask)], "controlnet"),
                        (["--controlnet", str(untrained["sd"]), "--control-image", str(mask),
                          "--control-scale", "3"], "control_scale")):
        capsys.readouterr()
        rc = main(["generate", PROMPT, "--out", str(tmp_path / "bad"), *args])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and field in err and "Traceback" not in err
