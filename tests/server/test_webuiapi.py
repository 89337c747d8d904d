"""The real ``webuiapi`` client (the MIT-licensed client many web-UI tools use) drives ``diffspeed serve``
unchanged, over loopback: txt2img, img2img, inpainting, ControlNet, model switching, PNG info and the listings.
The returned PNGs are also read back by ``sd_parsers``, and one image is redone through the Python API.

webuiapi's ``alwayson_scripts={}`` default is one dict shared by every call, which it mutates (it adds the
ControlNet units to it), so every call here passes a fresh one.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import numpy as np
import pytest

webuiapi = pytest.importorskip("webuiapi", reason="the webuiapi client is not installed")
sd_parsers = pytest.importorskip("sd_parsers", reason="sd-parsers is not installed")
Image = pytest.importorskip("PIL.Image")

PROMPT = "a red circle on a blue background"
BASE = {"prompt": PROMPT, "negative_prompt": "blurry", "width": 64, "height": 64, "steps": 4, "seed": 1234,
        "sampler_name": "Euler", "cfg_scale": 3.0}
CONTROLNET = "tiny-sd-controlnet-mask"


@pytest.fixture(scope="module")
def api(live_server):
    host, port = live_server.removeprefix("http://").rsplit(":", 1)
    return webuiapi.WebUIApi(host=host, port=int(port))


def txt2img(api, **fields):
    return api.txt2img(**{**BASE, **fields, "alwayson_scripts": fields.get("alwayson_scripts", {})})


def img2img(api, init, **fields):
    return api.img2img(images=[init], **{**BASE, "denoising_strength": 0.5, **fields,
                                         "alwayson_scripts": fields.get("alwayson_scripts", {})})


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def decoded(result) -> list:
    """The response's base64 PNGs, decoded here (not webuiapi's lazily opened files)."""
    images = []
    for text in result.json["images"]:
        image = Image.open(io.BytesIO(base64.b64decode(text, validate=True)))
        image.load()
        images.append(image)
    return images


def refusal(call) -> tuple[int, dict[str, str]]:
    """webuiapi raises ``RuntimeError(status, body)`` on a non-200 answer: (status, {field: message})."""
    with pytest.raises(RuntimeError) as caught:
        call()
    status, body = caught.value.args
    return status, {".".join(map(str, d["loc"][1:])): d["msg"] for d in json.loads(body)["detail"]}


@pytest.fixture(scope="module")
def first(api):
    """One txt2img with the base request, shared by the tests that only read it."""
    return txt2img(api)


# ------------------------------------------------------------------------------------------------ txt2img
def test_txt2img_images_info_and_parameters(first):
    (image,) = decoded(first)
    assert image.format == "PNG" and image.size == (64, 64) and image.mode == "RGB"
    assert pixels(image).std() > 0  # a picture, not a blank
    info = first.info
    assert isinstance(info, dict)  # webuiapi parsed the info JSON
    assert info["seed"] == 1234 and info["all_seeds"] == [1234]
    assert (info["steps"], info["sampler_name"], info["cfg_scale"]) == (4, "Euler", 3.0)
    assert (info["width"], info["height"]) == (64, 64)
    assert info["prompt"] == PROMPT and info["negative_prompt"] == "blurry"
    assert info["sd_model_name"] == "tiny-sd" and info["sd_model_hash"]
    (text,) = info["infotexts"]
    assert text.startswith(f"{PROMPT}\nNegative prompt: blurry\nSteps: 4, Sampler: Euler, CFG scale: 3.0, Seed: 1234")
    assert image.info["parameters"] == text  # the PNG carries the same text
    params = first.parameters  # the request as received, defaults filled
    assert {k: params[k] for k in BASE} == BASE
    assert params["n_iter"] == 1 and params["enable_hr"] is False and params["send_images"] is True


def test_batch_gets_consecutive_seeds(api):
    result = txt2img(api, batch_size=2, seed=77)
    images = decoded(result)
    assert [i.size for i in images] == [(64, 64)] * 2
    assert result.info["all_seeds"] == [77, 78]
    assert [t.split("Seed: ")[1].split(",")[0] for t in result.info["infotexts"]] == ["77", "78"]
    assert not np.array_equal(pixels(images[0]), pixels(images[1]))


def test_same_request_twice_gives_identical_pixels(api, first):
    again = txt2img(api)
    assert np.array_equal(pixels(decoded(again)[0]), pixels(decoded(first)[0]))
    assert again.info["infotexts"] == first.info["infotexts"]


def test_python_api_run_alone_gives_the_servers_pixels(api):
    """A random seed, resolved by the server; the info's resolved fields redo the image through diffspeed."""
    import diffspeed
    from diffspeed.request import GenerateRequest

    served = txt2img(api, seed=-1)
    info = served.info
    assert info["seed"] >= 0
    request = GenerateRequest(prompt=info["prompt"], negative_prompt=info["negative_prompt"], seed=info["seed"],
                              steps=info["steps"], sampler=info["sampler_name"], cfg_scale=info["cfg_scale"],
                              width=info["width"], height=info["height"])
    pipe = diffspeed.load("tiny-sd")  # a fresh load (the server's default device and dtype), not its cached one
    alone = diffspeed.generate(pipe, request, progress=False)
    assert np.array_equal(pixels(alone.images[0]), pixels(decoded(served)[0]))
    assert alone.parameters == info["infotexts"]


def test_sd_parsers_reads_the_returned_pngs(api):
    result = txt2img(api, batch_size=2, seed=500, cfg_scale=2.5)
    for i, image in enumerate(decoded(result)):
        parsed = sd_parsers.ParserManager().parse(image)
        assert parsed is not None and parsed.generator.name == "AUTOMATIC1111"
        (sampler,) = parsed.samplers
        assert sampler.name == "Euler"
        assert [p.value for p in sampler.prompts] == [PROMPT]
        assert [p.value for p in sampler.negative_prompts] == ["blurry"]
        assert float(sampler.parameters["cfg_scale"]) == 2.5
        assert int(sampler.parameters["seed"]) == 500 + i
        assert int(sampler.parameters["steps"]) == 4
        assert parsed.metadata["Size"] == "64x64"
        assert sampler.model.name == "tiny-sd" and sampler.model.hash == result.info["sd_model_hash"]


def test_png_info_round_trips_the_parameters(api, first):
    (image,) = decoded(first)
    result = api.png_info(image)  # webuiapi re-encodes the PIL image with its text chunks
    (text,) = first.info["infotexts"]
    assert result.info == text  # not JSON: webuiapi keeps the text as it is
    parsed = result.json["parameters"]
    assert (parsed["prompt"], parsed["negative_prompt"]) == (PROMPT, "blurry")
    assert (parsed["Steps"], parsed["Sampler"], parsed["CFG scale"], parsed["Seed"], parsed["Size"]) == \
        ("4", "Euler", "3.0", "1234", "64x64")
    plain = api.png_info(Image.new("RGB", (8, 8)))
    assert plain.info == "" and plain.json["parameters"] == {}


# ------------------------------------------------------------------------------------------------ img2img
def test_img2img_from_a_pil_image(api, first):
    init = decoded(first)[0]
    result = img2img(api, init, prompt="a green square", seed=9)
    (image,) = decoded(result)
    assert image.size == (64, 64)
    assert result.info["all_seeds"] == [9] and result.info["denoising_strength"] == 0.5
    assert "Denoising strength: 0.5" in result.info["infotexts"][0]
    assert not np.array_equal(pixels(image), pixels(init))
    assert result.parameters["init_images"] is None  # include_init_images=False: not echoed
    again = img2img(api, init, prompt="a green square", seed=9)
    assert np.array_equal(pixels(decoded(again)[0]), pixels(image))


def test_inpaint_repaints_only_under_the_mask(api, first):
    init = decoded(first)[0]
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 24, 64))  # repaint the left 24 columns
    result = img2img(api, init, mask_image=mask, mask_blur=0, inpaint_full_res=False, inpainting_fill=1,
                     denoising_strength=0.9, seed=11)
    (image,) = decoded(result)
    out, before = pixels(image).astype(int), pixels(init).astype(int)
    assert np.array_equal(out[:, 32:], before[:, 32:])  # the original pasted back outside the mask
    assert np.abs(out[:, :24] - before[:, :24]).mean() > 1  # repainted inside it
    assert result.info["extra_generation_params"]["Mask blur"] == 0


def test_inpaint_with_the_web_uis_defaults_is_refused_by_name(api, first):
    """webuiapi sends inpaint_full_res=True and inpainting_fill=0 unless told: a 422 naming both fields, which
    webuiapi raises as RuntimeError(422, body)."""
    init = decoded(first)[0]
    mask = Image.new("L", (64, 64), 255)
    status, problems = refusal(lambda: img2img(api, init, mask_image=mask))
    assert status == 422
    assert set(problems) == {"inpaint_full_res", "inpainting_fill"}
    assert "send false" in problems["inpaint_full_res"] and "send 1" in problems["inpainting_fill"]


def test_other_refusals_surface_as_runtime_errors(api):
    status, problems = refusal(lambda: txt2img(api, sampler_name="No Such Sampler", restore_faces=True))
    assert status == 422 and set(problems) == {"sampler_name", "restore_faces"}


# ------------------------------------------------------------------------------------------------ ControlNet
def test_controlnet_unit(api, first):
    control = Image.new("RGB", (64, 64), "black")
    control.paste((255, 255, 255), (16, 16, 48, 48))
    unit = webuiapi.ControlNetUnit(image=control, module="none", model=CONTROLNET)
    result = txt2img(api, controlnet_units=[unit])
    (image,) = decoded(result)
    assert image.size == (64, 64)
    line = result.info["extra_generation_params"]["ControlNet 0"]
    assert f"Model: {CONTROLNET}" in line and "Weight: 1" in line
    assert CONTROLNET in result.info["infotexts"][0]
    assert not np.array_equal(pixels(image), pixels(decoded(first)[0]))  # same seed, the unit changed it
    weak = webuiapi.ControlNetUnit(image=control, module="none", model=CONTROLNET, weight=0.5, guidance_end=0.5)
    line = txt2img(api, controlnet_units=[weak]).info["extra_generation_params"]["ControlNet 0"]
    assert "Weight: 0.5" in line and "Guidance End: 0.5" in line


def test_controlnet_preprocessor_is_refused(api):
    unit = webuiapi.ControlNetUnit(image=Image.new("RGB", (64, 64)), module="canny", model=CONTROLNET)
    status, problems = refusal(lambda: txt2img(api, controlnet_units=[unit]))
    assert status == 422 and list(problems) == ["alwayson_scripts.ControlNet.args[0].module"]


# ------------------------------------------------------------------------------------------------ models
def test_models_and_the_current_one(api):
    models = api.get_sd_models()
    titles = {m["model_name"]: m["title"] for m in models}
    assert {"tiny-sd", "tiny-sdxl"} <= set(titles)
    assert all(m["title"] == f"{m['model_name']} [{m['hash']}]" for m in models)
    assert api.util_get_model_names() == sorted(titles.values())
    assert api.util_get_current_model() == titles["tiny-sd"]


def test_switch_to_sdxl_and_back(api, first):
    titles = {m["model_name"]: m["title"] for m in api.get_sd_models()}
    try:
        assert api.set_options({"sd_model_checkpoint": titles["tiny-sdxl"]}) is None  # answers once loaded
        assert api.util_get_current_model() == titles["tiny-sdxl"]
        sdxl = txt2img(api, cfg_scale=5.0)
        assert sdxl.info["sd_model_name"] == "tiny-sdxl"
        assert "Model: tiny-sdxl" in sdxl.info["infotexts"][0]
        assert decoded(sdxl)[0].size == (64, 64)
    finally:
        api.util_set_model("tiny-sd")  # webuiapi's closest-title match
    assert api.util_get_current_model() == titles["tiny-sd"]
    back = txt2img(api)
    assert back.info["sd_model_name"] == "tiny-sd"
    assert np.array_equal(pixels(decoded(back)[0]), pixels(decoded(first)[0]))  # the model came back unchanged


def test_unknown_model_is_refused_and_nothing_changes(api):
    before = api.util_get_current_model()
    answer = api.set_options({"sd_model_checkpoint": "no-such-model [0123456789]"})  # webuiapi does not raise
    (problem,) = answer["detail"]
    assert problem["loc"] == ["body", "sd_model_checkpoint"] and "tiny-sd" in problem["msg"]
    assert api.util_get_current_model() == before


def test_per_request_model_override(api):
    titles = {m["model_name"]: m["title"] for m in api.get_sd_models()}
    result = txt2img(api, override_settings={"sd_model_checkpoint": titles["tiny-sdxl"]}, cfg_scale=5.0)
    assert result.info["sd_model_name"] == "tiny-sdxl"
    assert api.util_get_current_model() == titles["tiny-sd"]  # restored afterwards: the server's default stays


# ------------------------------------------------------------------------------------------------ listings
def test_listings(api):
    samplers = api.util_get_sampler_names()
    assert {"Euler", "Euler a", "DPM++ 2M", "DDIM"} <= set(samplers)
    euler_a = next(s for s in api.get_samplers() if s["name"] == "Euler a")
    assert "k_euler_a" in euler_a["aliases"]
    assert api.util_get_scheduler_names() == ["automatic", "karras"]
    upscalers = [u["name"] for u in api.get_upscalers()]
    assert upscalers and all(isinstance(n, str) for n in upscalers)
    assert "Latent" in [m["name"] for m in api.get_latent_upscale_modes()]
    assert "tiny-sd-lora-monochrome" in [lora["name"] for lora in api.get_loras()]
    memory = api.get_memory()
    assert memory["ram"]["total"] > 0 and "cuda" in memory
    assert api.get_scripts() == {"txt2img": ["controlnet", "diffspeed"], "img2img": ["controlnet", "diffspeed"]}
    assert api.refresh_checkpoints() == {}
    assert api.get_options()["sd_model_checkpoint"] == api.util_get_current_model()


def test_lora_from_the_prompt(api, first):
    result = txt2img(api, prompt=f"{PROMPT} <lora:tiny-sd-lora-monochrome:1>")
    assert result.info["extra_generation_params"]["Lora"] == "tiny-sd-lora-monochrome: 1"
    assert result.info["prompt"] == f"{PROMPT} <lora:tiny-sd-lora-monochrome:1>"
    assert not np.array_equal(pixels(decoded(result)[0]), pixels(decoded(first)[0]))
    back = txt2img(api)  # the LoRA is unloaded for the next request
    assert np.array_equal(pixels(decoded(back)[0]), pixels(decoded(first)[0]))


# ------------------------------------------------------------------------------------------------ queue
def test_progress_interrupt_skip_and_wait_for_ready(api, first):
    progress = api.get_progress()
    assert progress["progress"] == 0.0 and progress["state"]["job_count"] == 0
    assert progress["current_image"] is None
    api.util_wait_for_ready(check_interval=0.01)  # returns at once: nothing runs
    assert api.interrupt() == {}
    assert api.skip() == {}
    after = txt2img(api)  # an interrupt while idle does not stick to the next request
    assert np.array_equal(pixels(decoded(after)[0]), pixels(decoded(first)[0]))
    api.util_wait_for_ready(check_interval=0.01)


@pytest.mark.parametrize("stop", ["interrupt", "skip"])
def test_interrupt_and_skip_stop_a_running_request(api, stop):
    """A long request (150 steps, about 5 s here) stopped a few steps in comes back at once, with its image."""
    done: dict = {}
    worker = threading.Thread(target=lambda: done.setdefault("result", txt2img(api, steps=150, seed=3)))
    worker.start()
    deadline = time.monotonic() + 60
    while (state := api.get_progress()["state"])["sampling_step"] < 2:
        assert worker.is_alive() and time.monotonic() < deadline, "the request never started"
        time.sleep(0.01)
    assert state["job_count"] == 1 and state["sampling_steps"] == 150
    stopped_at = time.monotonic()
    assert getattr(api, stop)() == {}
    worker.join(60)
    assert time.monotonic() - stopped_at < 3  # not the ~150 steps left
    (image,) = decoded(done["result"])
    assert image.size == (64, 64)
    api.util_wait_for_ready(check_interval=0.01)
    assert api.get_progress()["state"]["interrupted"] is False  # the next request starts clean
