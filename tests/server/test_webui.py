"""The web UI's API as data: request models, plan_request's mapping and refusals, response shapes, info JSON.

No model is loaded: every test is pure data. webuiapi (the MIT client) is driven with its network call replaced,
so its real default payloads are what is checked, and its own reader parses the info JSON.
"""

from __future__ import annotations

import base64
import io
import json
import types

import pytest
from PIL import Image
from pydantic import ValidationError

from diffspeed.server import webui
from diffspeed.server.webui import (
    Img2ImgRequest,
    PlanError,
    Txt2ImgRequest,
    api_field,
    control_resize_problem,
    info_json,
    plan_request,
    strip_hash,
)


def _png(size=(64, 64)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


IMG = _png()
UNIT = {"image": IMG, "model": "tiny-sd-controlnet-mask [0123abcd]", "module": "none", "weight": 0.8,
        "guidance_start": 0.1, "guidance_end": 0.9}


def plan(kind=Txt2ImgRequest, **fields):
    return plan_request(kind(**fields))


def problems(kind=Txt2ImgRequest, **fields) -> dict[str, str]:
    with pytest.raises(PlanError) as info:
        plan(kind, **fields)
    return dict(info.value.problems)


def inpaint(**fields):
    return {"init_images": [IMG], "mask": IMG, "inpaint_full_res": False, "inpainting_fill": 1, **fields}


# ------------------------------------------------------------------------------------------------ models
def test_defaults_are_the_web_uis():
    t, i = Txt2ImgRequest(), Img2ImgRequest()
    assert (t.prompt, t.seed, t.steps, t.cfg_scale, t.width, t.height) == ("", -1, 50, 7.0, 512, 512)
    assert (t.sampler_name, t.sampler_index, t.scheduler, t.batch_size, t.n_iter) == (None, "Euler", None, 1, 1)
    assert (t.enable_hr, t.hr_scale, t.hr_upscaler, t.denoising_strength, t.hr_prompt) == (False, 2.0, None, 0.75, "")
    assert (t.send_images, t.save_images, t.alwayson_scripts, t.script_args) == (True, False, {}, [])
    assert (i.init_images, i.mask, i.resize_mode, i.denoising_strength, i.mask_blur_x, i.mask_blur) == \
        (None, None, 0, 0.75, 4, None)
    assert (i.inpainting_fill, i.inpaint_full_res, i.inpainting_mask_invert, i.include_init_images) == \
        (0, True, 0, False)


def test_unknown_keys_are_ignored_and_null_means_default():
    t = Txt2ImgRequest(prompt="a", hr_additional_modules=["x"], whatever=1, steps=None, styles=None)
    assert t.steps == 50 and t.styles is None and not hasattr(t, "whatever")


@pytest.mark.parametrize("field, value", [("steps", "many"), ("width", 512.5), ("prompt", 5), ("seed", [1]),
                                          ("restore_faces", "perhaps"), ("init_images", "not-a-list"),
                                          ("batch_size", 0), ("alwayson_scripts", [])])
def test_wrong_types_name_the_field(field, value):
    with pytest.raises(ValidationError) as info:
        Img2ImgRequest(**{field: value})
    assert {e["loc"][0] for e in info.value.errors()} == {field}


def test_every_model_has_a_json_schema():
    for model in (Txt2ImgRequest, Img2ImgRequest, webui.ImageResponse, webui.ProgressResponse, webui.SamplerItem,
                  webui.SchedulerItem, webui.SDModelItem, webui.LoraItem, webui.UpscalerItem,
                  webui.LatentUpscaleModeItem, webui.ScriptsList, webui.PNGInfoRequest, webui.PNGInfoResponse,
                  webui.MemoryResponse):
        json.dumps(model.model_json_schema())
    assert "description" in Txt2ImgRequest.model_json_schema()["properties"]["hr_scale"]


# ------------------------------------------------------------------------------------------------ mapping
def test_default_txt2img_plan():
    p = plan(prompt="a cat")
    assert p.kind == "txt2img"
    assert p.request_fields == {"prompt": "a cat", "negative_prompt": "", "seed": -1, "steps": 50, "cfg_scale": 7.0,
                                "width": 512, "height": 512, "batch_size": 1, "sampler": "Euler"}
    assert (p.model, p.preset, p.recipe, p.loras, p.send_images, p.save_images, p.n_images) == \
        (None, None, None, (), True, False, 1)
    assert p.echo == Txt2ImgRequest(prompt="a cat").model_dump(mode="json")


def test_n_iter_becomes_one_batch_with_consecutive_seeds():
    p = plan(prompt="a", batch_size=2, n_iter=3, seed=10)
    assert (p.request_fields["batch_size"], p.request_fields["seed"], p.n_images) == (6, 10, 6)
    assert p.echo["batch_size"] == 2 and p.echo["n_iter"] == 3


@pytest.mark.parametrize("fields, sampler", [
    ({"sampler_name": "DPM++ 2M", "scheduler": "Karras"}, "DPM++ 2M Karras"),
    ({"sampler_name": "DPM++ 2M Karras", "scheduler": "Automatic"}, "DPM++ 2M Karras"),
    ({"sampler_name": "DPM++ 2M Karras", "scheduler": "karras"}, "DPM++ 2M Karras"),
    ({"sampler_name": "Euler a", "scheduler": "automatic"}, "Euler a"),
    ({"sampler_name": "euler a", "scheduler": ""}, "Euler a"),
    ({"sampler_name": "DPM++ SDE", "scheduler": "Karras"}, "DPM++ SDE Karras"),
    ({"sampler_name": "LMS", "scheduler": "Karras"}, "LMS Karras"),
    ({"sampler_name": "k_dpmpp_2m"}, "DPM++ 2M"),
    ({"sampler_index": "UniPC"}, "UniPC"),
    ({"sampler_name": "DDIM", "sampler_index": "Euler a"}, "DDIM"),
    ({}, "Euler"),
])
def test_sampler_and_scheduler_map_to_a_diffspeed_sampler(fields, sampler):
    assert plan(**fields).request_fields["sampler"] == sampler


def test_default_sampler_is_the_servers_choice():
    assert "sampler" not in plan_request(Txt2ImgRequest(), default_sampler=None).request_fields
    assert plan_request(Txt2ImgRequest(), default_sampler="DDIM").request_fields["sampler"] == "DDIM"
    # an explicit sampler_index is the client's choice, even when it equals the default value
    assert plan_request(Txt2ImgRequest(sampler_index="Euler"), default_sampler=None).request_fields["sampler"] == \
        "Euler"


@pytest.mark.parametrize("fields, field", [
    ({"sampler_name": "Euler", "scheduler": "Karras"}, "scheduler"),
    ({"sampler_name": "DPM++ 2M", "scheduler": "Exponential"}, "scheduler"),
    ({"sampler_name": "DPM++ 2M Karras", "scheduler": "Exponential"}, "scheduler"),
    ({"sampler_name": "DPM++ 2S a"}, "sampler_name"),
    ({"sampler_name": "DPM++ SDE"}, "sampler_name"),
    ({"sampler_index": "Restart"}, "sampler_index"),
])
def test_unknown_sampler_combinations_name_the_field(fields, field):
    assert field in problems(**fields)


def test_model_from_override_settings():
    p = plan(override_settings={"sd_model_checkpoint": "tiny-sd [0123abcd]", "samples_save": False})
    assert p.model == "tiny-sd"
    assert plan(override_settings={"sd_model_checkpoint": "tiny-sd"}).model == "tiny-sd"
    assert strip_hash("v1-5.safetensors [6ce0161689]") == "v1-5.safetensors"
    assert "override_settings.sd_model_checkpoint" in problems(override_settings={"sd_model_checkpoint": 3})


def test_lora_tags_leave_the_prompt():
    p = plan(prompt="a cat, <lora:mono:0.5> on a mat <lora:detail> <lyco:other:1.5>")
    assert p.request_fields["prompt"] == "a cat, on a mat"  # each tag goes with one space before it
    assert p.loras == (("mono", 0.5), ("detail", 1.0), ("other", 1.5))
    assert p.echo["prompt"].startswith("a cat, <lora:mono:0.5>")
    assert plan(prompt="<lora:a:0.7:0.7> x").loras == (("a", 0.7),)
    assert plan(prompt="<lora:a:1> <lora:a:1>").loras == (("a", 1.0),)


def test_disable_extra_networks_removes_the_tags_without_loading():
    p = plan(prompt="x <lora:mono:0.5>", disable_extra_networks=True)
    assert (p.request_fields["prompt"], p.loras) == ("x", ())


@pytest.mark.parametrize("prompt", ["<lora:a:heavy>", "<lora:a:1:0.5>", "<lora:a:te=1>", "<lora:../x:1>",
                                    "<lora:dir/x>", "<hypernet:h:1>", "<lora:a:1> <lora:a:0.5>"])
def test_bad_lora_tags_are_refused(prompt):
    assert "prompt" in problems(prompt=prompt)


@pytest.mark.parametrize("field, text", [("prompt", "a (cat:1.2)"), ("prompt", "a [cat]"), ("prompt", "[a:b:0.5]"),
                                         ("prompt", "a AND b"), ("negative_prompt", "x BREAK y"),
                                         ("negative_prompt", "(blurry)"), ("prompt", "a \\\\(cat)")])
def test_web_ui_prompt_syntax_is_refused(field, text):
    assert field in problems(**{field: text})


def test_escaped_brackets_are_plain_characters():
    p = plan(prompt="a \\(cat\\) \\[1\\]")
    assert p.request_fields["prompt"] == "a (cat) [1]"
    assert "negative_prompt" in problems(negative_prompt="AND (x")
    assert plan(negative_prompt="dogs AND cats").request_fields["negative_prompt"] == "dogs AND cats"


@pytest.mark.parametrize("script", [
    {"diffspeed": {"args": ["fastest"]}}, {"diffspeed": {"args": [{"preset": "fastest"}]}},
    {"Diffspeed": {"args": ["fastest"]}}, {"diffspeed": {"preset": "fastest"}},
])
def test_diffspeed_preset_from_the_alwayson_script(script):
    p = plan(alwayson_scripts=script)
    assert (p.preset, p.recipe) == ("fastest", None)


def test_diffspeed_recipe_and_script_name():
    toml = 'name = "x"\n[[optimization]]\nname = "cfg_cutoff"\nfraction = 0.5\n'
    assert plan(alwayson_scripts={"diffspeed": {"args": [{"recipe": toml}]}}).recipe == toml
    recipe = {"optimization": [{"name": "deepcache", "interval": 3}]}
    assert plan(alwayson_scripts={"diffspeed": {"args": [{"recipe": recipe}]}}).recipe == recipe
    p = plan(script_name="diffspeed", script_args=[{"preset": "quality"}])
    assert (p.preset, p.recipe) == ("quality", None)
    assert plan(alwayson_scripts={"diffspeed": {"args": []}}).preset is None


@pytest.mark.parametrize("fields, field", [
    ({"alwayson_scripts": {"diffspeed": {"args": ["warp-speed"]}}}, "alwayson_scripts.diffspeed"),
    ({"alwayson_scripts": {"diffspeed": {"args": [{"preset": "fastest", "recipe": "x"}]}}},
     "alwayson_scripts.diffspeed"),
    ({"alwayson_scripts": {"diffspeed": {"args": [{"recipe": 5}]}}}, "alwayson_scripts.diffspeed"),
    ({"alwayson_scripts": {"diffspeed": {"args": ["fastest", "quality"]}}}, "alwayson_scripts.diffspeed"),
    ({"alwayson_scripts": {"diffspeed": {"args": [{"presets": "fastest"}]}}}, "alwayson_scripts.diffspeed"),
    ({"script_name": "diffspeed", "script_args": ["fastest"], "alwayson_scripts": {"diffspeed": {"args": ["x"]}}},
     "script_name"),
    ({"script_name": "X/Y/Z plot"}, "script_name"),
    ({"alwayson_scripts": {"ADetailer": {"args": [True, {"ad_model": "face"}]}}}, "alwayson_scripts.ADetailer"),
])
def test_bad_scripts_are_refused(fields, field):
    assert field in problems(**fields)


def test_disabled_unknown_scripts_pass():
    p = plan(alwayson_scripts={"ADetailer": {"args": [False]}, "animatediff": {"args": [False]}, "x": {"args": []}})
    assert "controlnet" not in p.request_fields


def test_hires_fix():
    p = plan(prompt="a", width=256, height=384, enable_hr=True, hr_second_pass_steps=5, denoising_strength=0.5)
    f = p.request_fields
    assert (f["hires_scale"], f["hires_steps"], f["hires_upscaler"], f["denoising_strength"]) == (2.0, 5, "Latent", 0.5)
    assert plan(enable_hr=True, hr_upscaler="latent (bicubic)").request_fields["hires_upscaler"] == "Latent (bicubic)"
    assert plan(enable_hr=True, hr_upscaler="Lanczos", hr_scale=1.5).request_fields["hires_scale"] == 1.5


def test_hires_resize_keeps_the_aspect_ratio():
    assert plan(width=512, height=768, enable_hr=True, hr_resize_x=1024).request_fields["hires_scale"] == 2.0
    assert plan(width=512, height=768, enable_hr=True, hr_resize_y=1152).request_fields["hires_scale"] == 1.5
    assert plan(width=512, height=512, enable_hr=True, hr_resize_x=768, hr_resize_y=768).request_fields[
        "hires_scale"] == 1.5
    assert "hr_resize_x" in problems(width=512, height=512, enable_hr=True, hr_resize_x=1024, hr_resize_y=768)


def test_hires_sizes_must_match_the_web_uis():
    assert "hr_scale" in problems(width=504, height=504, enable_hr=True, hr_scale=1.25)  # 624 there, 632 here


def test_firstphase_sets_the_first_pass():
    f = plan(width=1024, height=1024, firstphase_width=512, firstphase_height=256, enable_hr=True).request_fields
    assert (f["width"], f["height"], f["hires_scale"]) == (512, 256, 2.0)
    assert "firstphase_width" in problems(firstphase_width=512)


@pytest.mark.parametrize("fields, field", [
    ({"hr_scale": 1.0}, "hr_scale"),
    ({"hr_upscaler": "R-ESRGAN 4x+"}, "hr_upscaler"),
    ({"hr_upscaler": "None"}, "hr_upscaler"),
    ({"hr_checkpoint_name": "other [12345678]"}, "hr_checkpoint_name"),
    ({"hr_sampler_name": "DDIM"}, "hr_sampler_name"),
    ({"sampler_name": "DPM++ 2M", "scheduler": "Karras", "hr_scheduler": "Automatic"}, "hr_scheduler"),
    ({"hr_prompt": "another"}, "hr_prompt"),
    ({"hr_negative_prompt": "another"}, "hr_negative_prompt"),
])
def test_hires_refusals(fields, field):
    assert field in problems(prompt="a", enable_hr=True, **fields)


def test_hires_fields_that_repeat_the_first_pass_pass():
    plan(prompt="a", negative_prompt="b", enable_hr=True, hr_prompt="a", hr_negative_prompt="b",
         hr_sampler_name="Euler", hr_checkpoint_name="Use same checkpoint", hr_scheduler="Use same scheduler")
    plan(sampler_name="DPM++ 2M", scheduler="Karras", enable_hr=True, hr_sampler_name="DPM++ 2M Karras")
    # without enable_hr the web UI ignores the hires fields, and so does diffspeed
    assert "hires_scale" not in plan(hr_scale=3.3, hr_upscaler="ESRGAN", hr_prompt="x").request_fields


def test_refiner():
    p = plan(prompt="a", refiner_checkpoint="tiny-sdxl-refiner [0123abcd]", refiner_switch_at=0.7)
    assert (p.request_fields["refiner"], p.request_fields["refiner_switch_at"]) == ("tiny-sdxl-refiner", 0.7)
    assert "refiner" not in plan(refiner_checkpoint="None", refiner_switch_at=0.7).request_fields
    assert "refiner_switch_at" in problems(refiner_checkpoint="r")
    assert "refiner_checkpoint" in problems(Img2ImgRequest, init_images=[IMG], refiner_checkpoint="r",
                                            refiner_switch_at=0.8)


def test_img2img():
    p = plan(Img2ImgRequest, prompt="a", init_images=[IMG], denoising_strength=0.4, width=64, height=64)
    f = p.request_fields
    assert (p.kind, f["init_image"], f["denoising_strength"]) == ("img2img", IMG, 0.4)
    assert "mask_image" not in f and "mask_invert" not in f
    assert p.echo["init_images"] is None and p.echo["mask"] is None
    kept = plan(Img2ImgRequest, init_images=[IMG], include_init_images=True)
    assert kept.echo["init_images"] == [IMG]


def test_inpaint():
    f = plan(Img2ImgRequest, **inpaint(mask_blur_x=6, mask_blur_y=6, inpainting_mask_invert=1)).request_fields
    assert (f["mask_image"], f["mask_blur"], f["mask_invert"]) == (IMG, 6, True)
    f = plan(Img2ImgRequest, **inpaint(mask_blur=0, mask_blur_x=3)).request_fields
    assert (f["mask_blur"], f["mask_invert"]) == (0, False)


@pytest.mark.parametrize("fields, field", [
    ({"init_images": None}, "init_images"),
    ({"init_images": []}, "init_images"),
    ({"init_images": [IMG, IMG]}, "init_images"),
    ({"resize_mode": 1}, "resize_mode"),
    ({"initial_noise_multiplier": 1.2}, "initial_noise_multiplier"),
    ({"latent_mask": IMG}, "latent_mask"),
    ({**inpaint(), "inpaint_full_res": True}, "inpaint_full_res"),
    ({**inpaint(), "inpainting_fill": 0}, "inpainting_fill"),
    ({**inpaint(), "inpainting_fill": 2}, "inpainting_fill"),
    ({**inpaint(), "mask_blur_x": 4, "mask_blur_y": 8}, "mask_blur_x"),
    ({**inpaint(), "mask_round": False}, "mask_round"),
    ({**inpaint(), "inpainting_mask_invert": 2}, "inpainting_mask_invert"),
])
def test_img2img_refusals(fields, field):
    assert field in problems(Img2ImgRequest, **{"init_images": [IMG], **fields})


def test_inpaint_fields_without_a_mask_change_nothing():
    plan(Img2ImgRequest, init_images=[IMG], inpaint_full_res=True, inpainting_fill=3, mask_blur_x=1, mask_blur_y=9)


def test_controlnet_unit():
    off = {**UNIT, "enabled": False, "module": "canny"}
    p = plan(alwayson_scripts={"ControlNet": {"args": [off, UNIT]}})
    f = p.request_fields
    assert (f["controlnet"], f["control_image"], f["control_scale"], f["control_start"], f["control_end"]) == \
        ("tiny-sd-controlnet-mask", IMG, 0.8, 0.1, 0.9)
    assert p.control_resize_mode == "Crop and Resize"
    image_dict = {**UNIT, "image": {"image": IMG, "mask": None}, "resize_mode": 0}
    assert plan(alwayson_scripts={"controlnet": {"args": [image_dict]}}).control_resize_mode == "Just Resize"
    legacy = {**UNIT, "image": None, "input_image": IMG, "resize_mode": "Inner Fit (Scale to Fit)"}
    assert plan(alwayson_scripts={"controlnet": {"args": [legacy]}}).request_fields["control_image"] == IMG
    assert "controlnet" not in plan(alwayson_scripts={"ControlNet": {"args": []}}).request_fields


def test_controlnet_in_img2img_reads_the_init_image_without_its_own():
    p = plan(Img2ImgRequest, init_images=[IMG], alwayson_scripts={"controlnet": {"args": [{**UNIT, "image": ""}]}})
    assert p.request_fields["control_image"] == IMG and p.notes


@pytest.mark.parametrize("unit, field", [
    ({**UNIT, "module": "canny"}, "alwayson_scripts.controlnet.args[0].module"),
    ({**UNIT, "model": "None"}, "alwayson_scripts.controlnet.args[0].model"),
    ({**UNIT, "image": ""}, "alwayson_scripts.controlnet.args[0].image"),
    ({**UNIT, "mask": IMG}, "alwayson_scripts.controlnet.args[0].mask"),
    ({**UNIT, "image": {"image": IMG, "mask": IMG}}, "alwayson_scripts.controlnet.args[0].mask"),
    ({**UNIT, "control_mode": "ControlNet is more important"}, "alwayson_scripts.controlnet.args[0].control_mode"),
    ({**UNIT, "weight": "strong"}, "alwayson_scripts.controlnet.args[0].weight"),
    ({**UNIT, "resize_mode": "Stretch"}, "alwayson_scripts.controlnet.args[0].resize_mode"),
    ("unit", "alwayson_scripts.controlnet.args[0]"),
])
def test_controlnet_refusals(unit, field):
    found = problems(alwayson_scripts={"controlnet": {"args": [unit]}})
    assert field in found
    if field.endswith("module"):
        assert "diffspeed runs no preprocessors; send the control image" in found[field]


def test_one_controlnet_unit_at_most():
    assert "alwayson_scripts.controlnet" in problems(alwayson_scripts={"controlnet": {"args": [UNIT, UNIT]}})


def test_controlnet_hr_option_with_hires():
    assert "alwayson_scripts.controlnet.args[0].hr_option" in problems(
        enable_hr=True, alwayson_scripts={"controlnet": {"args": [{**UNIT, "hr_option": "Low res only"}]}})


def test_control_resize_problem():
    assert control_resize_problem("Just Resize", (100, 50), (64, 64)) is None
    assert control_resize_problem("Crop and Resize", (128, 64), (64, 32)) is None
    assert "aspect ratio" in control_resize_problem("Resize and Fill", (100, 50), (64, 64))


@pytest.mark.parametrize("fields, field", [
    ({"restore_faces": True}, "restore_faces"),
    ({"tiling": True}, "tiling"),
    ({"subseed_strength": 0.3}, "subseed_strength"),
    ({"styles": ["cinematic"]}, "styles"),
    ({"seed_resize_from_w": 256, "seed_resize_from_h": 256}, "seed_resize_from_w"),
    ({"sampler_name": "Euler a", "eta": 0.5}, "eta"),
    ({"s_churn": 0.5}, "s_churn"),
    ({"sampler_name": "Euler a", "s_noise": 0.9}, "s_noise"),
    ({"s_min_uncond": 1.0}, "s_min_uncond"),
    ({"override_settings": {"CLIP_stop_at_last_layers": 2}}, "override_settings.CLIP_stop_at_last_layers"),
    ({"override_settings": {"eta_ancestral": True}}, "override_settings.eta_ancestral"),
    ({"override_settings": {"sd_vae": "other.vae.pt"}}, "override_settings.sd_vae"),
    ({"override_settings": {"some_new_setting": 1}}, "override_settings.some_new_setting"),
    ({"firstpass_image": IMG}, "firstpass_image"),
    ({"infotext": "a cat\nSteps: 20"}, "infotext"),
])
def test_fields_diffspeed_cannot_honour_are_refused(fields, field):
    assert field in problems(**fields)


def test_values_that_change_nothing_pass():
    plan(restore_faces=False, tiling=False, subseed=123, subseed_strength=0, styles=[], seed_resize_from_w=512,
         seed_resize_from_h=512, sampler_name="Euler a", eta=1.0, s_churn=0, s_tmin=0, s_tmax=0, s_noise=1,
         s_min_uncond=0, comments={"x": 1}, do_not_save_grid=True, override_settings_restore_afterwards=False,
         override_settings={"CLIP_stop_at_last_layers": 1, "sd_vae": "Automatic", "samples_save": True})
    plan(sampler_name="DDIM", eta=0.0)


def test_eta_reaches_the_samplers_that_read_it():
    assert plan(sampler_name="DDIM", eta=1.0).request_fields["eta"] == 1.0
    assert plan(sampler_name="TCD", eta=0.5).request_fields["eta"] == 0.5
    assert "eta" not in plan(sampler_name="DPM++ 2M", eta=0.3).request_fields
    plan(sampler_name="DPM++ 2M", eta=0.3, s_noise=0.5)  # a deterministic sampler reads neither


def test_every_problem_is_reported_at_once():
    with pytest.raises(PlanError) as info:
        plan(Img2ImgRequest, restore_faces=True, tiling=True, sampler_name="nope", resize_mode=2, prompt="(x)")
    fields = [f for f, _ in info.value.problems]
    assert {"restore_faces", "tiling", "sampler_name", "resize_mode", "prompt", "init_images"} <= set(fields)
    assert info.value.field == fields[0] and str(info.value).startswith(f"{len(fields)} problems: ")


def test_api_field_names_the_web_ui_field():
    assert [api_field(f) for f in ("init_image", "mask_image", "sampler", "hires_scale", "seed")] == \
        ["init_images", "mask", "sampler_name", "hr_scale", "seed"]


# ------------------------------------------------------------------------------------------------ webuiapi
@pytest.fixture
def client(monkeypatch):
    """webuiapi's client with its network call replaced by one that records the JSON it would send."""
    webuiapi = pytest.importorskip("webuiapi")
    monkeypatch.setattr(webuiapi.WebUIApi, "check_extensions", lambda self: None)
    api = webuiapi.WebUIApi()
    sent = {}

    def post(url, json_payload, use_async):
        sent[url.rsplit("/", 1)[1]] = json.loads(json.dumps(json_payload))  # exactly what would go over the wire

    api.post_and_get_api_result = post
    api.sent = sent
    return api


@pytest.mark.parametrize("has_controlnet", [False, True])
def test_webuiapi_default_payloads_pass(client, has_controlnet):
    client.has_controlnet = has_controlnet
    client.txt2img(prompt="a cat", alwayson_scripts={})
    client.img2img(images=[Image.new("RGB", (64, 64))], prompt="a cat", alwayson_scripts={})
    t = plan_request(Txt2ImgRequest(**client.sent["txt2img"]))
    i = plan_request(Img2ImgRequest(**client.sent["img2img"]))
    assert t.request_fields["sampler"] == i.request_fields["sampler"] == "Euler a"
    assert t.request_fields["steps"] == 20 and "hires_scale" not in t.request_fields
    assert i.request_fields["init_image"].startswith("data:image/png;base64,")


def test_webuiapi_hires_inpaint_and_controlnet_payloads(client):
    webuiapi = pytest.importorskip("webuiapi")
    image = Image.new("RGB", (64, 64))
    client.txt2img(prompt="a", enable_hr=True, hr_scale=1.5, sampler_name="DPM++ 2M", scheduler="Karras",
                   alwayson_scripts={},
                   controlnet_units=[webuiapi.ControlNetUnit(image=image, model="tiny-sd-controlnet-mask [0a1b2c3d]")])
    client.img2img(images=[image], mask_image=image, inpaint_full_res=False, inpainting_fill=1, alwayson_scripts={})
    t = plan_request(Txt2ImgRequest(**client.sent["txt2img"]))
    i = plan_request(Img2ImgRequest(**client.sent["img2img"]))
    assert (t.request_fields["sampler"], t.request_fields["hires_scale"]) == ("DPM++ 2M Karras", 1.5)
    assert (t.request_fields["controlnet"], t.control_resize_mode) == ("tiny-sd-controlnet-mask", "Resize and Fill")
    assert i.request_fields["mask_image"].startswith("data:image/png;base64,")


def _result(seeds, **kw):
    request = types.SimpleNamespace(sampler="Euler a", steps=20, cfg_scale=7.0, width=64, height=64)
    return types.SimpleNamespace(images=[Image.new("RGB", (64, 64))] * len(seeds), seeds=seeds,
                                 parameters=[f"a cat\nSteps: 20, Seed: {s}" for s in seeds], seconds=2.0,
                                 steps_per_second=10.0, stats={"unet_calls": 20, "note": "x"}, events=["e"],
                                 request=request, **kw)


def test_info_json_is_read_by_webuiapi(client):
    webuiapi = pytest.importorskip("webuiapi")
    p = plan(prompt="a cat <lora:mono:0.5>", batch_size=2, n_iter=2, seed=7, subseed=3,
             alwayson_scripts={"diffspeed": {"args": ["fastest"]}})
    info = info_json(p, [_result([7, 8]), _result([9, 10])], model_name="tiny-sd", model_hash="0123abcd",
                     version="diffspeed 1.0", job_timestamp="20250101120000", batched_with=1)
    body = {"images": [_png()], "parameters": p.echo, "info": info}
    response = types.SimpleNamespace(status_code=200, json=lambda: body, text=json.dumps(body))
    result = client._to_api_result(response)
    assert isinstance(result, webuiapi.WebUIApiResult) and result.parameters == p.echo
    data = result.info
    assert (data["seed"], data["all_seeds"], data["all_subseeds"]) == (7, [7, 8, 9, 10], [3, 4, 5, 6])
    assert data["prompt"] == "a cat <lora:mono:0.5>" and len(data["all_prompts"]) == 4
    assert (data["sampler_name"], data["steps"], data["batch_size"], data["sd_model_name"]) == \
        ("Euler a", 20, 2, "tiny-sd")
    assert data["infotexts"][3].endswith("Seed: 10") and data["job_timestamp"] == "20250101120000"
    assert data["extra_generation_params"]["Lora"] == "mono: 0.5"
    ds = data["diffspeed"]
    assert (ds["seconds"], ds["seconds_per_image"], ds["steps_per_second"]) == (4.0, 1.0, 10.0)
    assert (ds["stats"], ds["events"], ds["preset"], ds["batched_with"]) == \
        ({"unet_calls": 40, "note": "x"}, ["e", "e"], "fastest", 1)
    for key in ("negative_prompt", "all_negative_prompts", "subseed", "subseed_strength", "width", "height",
                "cfg_scale", "restore_faces", "face_restoration_model", "sd_model_hash", "sd_vae_name",
                "sd_vae_hash", "seed_resize_from_w", "seed_resize_from_h", "denoising_strength",
                "index_of_first_image", "styles", "clip_skip", "is_using_inpainting_conditioning", "version"):
        assert key in data


def test_info_json_for_hires_and_no_results():
    p = plan(prompt="a", enable_hr=True, hr_second_pass_steps=4, refiner_checkpoint=None, subseed=-1)
    data = json.loads(info_json(p, [], model_name=None, model_hash=None, version="v"))
    assert data["extra_generation_params"] == {"Hires upscale": 2.0, "Hires upscaler": "Latent", "Hires steps": 4}
    assert (data["all_seeds"], data["all_subseeds"], data["diffspeed"]["seconds_per_image"]) == ([], [-1], None)


# ------------------------------------------------------------------------------------------------ listings
def test_listings_come_from_diffspeeds_tables():
    from diffspeed.pipelines.samplers import SAMPLERS
    from diffspeed.pipelines.workflows import HIRES_UPSCALERS

    samplers = webui.sampler_items(available_only=False)
    assert [s.name for s in samplers] == list(SAMPLERS)
    karras = next(s for s in samplers if s.name == "DPM++ 2M Karras")
    assert karras.options == {"scheduler": "karras"} and karras.aliases == ["k_dpmpp_2m_ka"]
    assert {s.name for s in webui.sampler_items()} <= set(SAMPLERS)
    assert [(s.name, s.label) for s in webui.scheduler_items()] == [("automatic", "Automatic"), ("karras", "Karras")]
    latent = [m.name for m in webui.latent_upscale_modes()]
    images = [u.name for u in webui.upscaler_items()]
    assert sorted(latent + images) == sorted(HIRES_UPSCALERS) and "Latent" in latent and "Lanczos" in images
    assert "diffspeed" in webui.scripts_list().txt2img
    # every listed name is one plan_request takes
    for item in samplers:
        plan(sampler_name=item.name)
        for alias in item.aliases:
            assert plan(sampler_name=alias).request_fields["sampler"] == item.name
    for name in latent + images:
        plan(enable_hr=True, hr_upscaler=name)


def test_response_shapes():
    state = webui.ProgressState()
    progress = webui.ProgressResponse(progress=0.5, eta_relative=1.0, state=state, queue={"pending": 2})
    assert set(progress.model_dump()) == {"progress", "eta_relative", "state", "current_image", "textinfo",
                                          "current_task", "queue"}
    assert set(state.model_dump()) == {"skipped", "interrupted", "stopping_generation", "job", "job_count",
                                       "job_timestamp", "job_no", "sampling_step", "sampling_steps"}
    assert webui.ImageResponse(parameters={}, info="{}").images is None
    assert set(webui.SDModelItem(title="t [h]", model_name="t", filename="t").model_dump()) == \
        {"title", "model_name", "hash", "sha256", "filename", "config"}


def test_importing_the_module_loads_no_torch():
    import subprocess
    import sys

    code = "import sys, diffspeed.server.webui; print('torch' in sys.modules, 'diffusers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
