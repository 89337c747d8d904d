"""Property-based API tests: schemathesis generates requests from the server's own OpenAPI schema and checks that
none gets a 5xx (and, for the routes besides txt2img/img2img, that the answers match their schema).

The requests go to a live server on loopback with small limits (128x128 pixels, 4 steps, 2 images), so the
generated requests that pass validation are cheap to run. Generation is deterministic (a fixed seed, no example
database) and bounded per operation. Every operation is tested; only the stateful phase is off (no route here
takes another's answer as input). The coverage phase's boundary and negative values are kept: they are what
finds crashes in validation code.

The web UI's schema bounds almost nothing (its defaults alone, 512x512 and 50 steps, are over these limits), so
requests generated from it all end in 422 before a model runs. A second schema narrows txt2img and img2img to
values this server runs -- sizes, steps, samplers, real images, masks, a ControlNet unit, a LoRA, both models --
and its positive cases must get 200 (with the images they asked for) or a 422 that names the field.

The schemas are read from ``create_app(...).openapi()`` at import, without starting the app, so that pytest can
make one test per operation: schemathesis' lazy loader (``schemathesis.pytest.from_fixture``, 4.32) reads
``request.node._nodeid``, which pytest 9.2 no longer has.
"""

from __future__ import annotations

import base64
import collections
import copy
import io
import json

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed")
pytest.importorskip("fastapi", reason="the server extra is not installed: pip install -e '.[server]'")

from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.config import SchemathesisConfig  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from diffspeed.server.config import Limits, ServerConfig  # noqa: E402

SEED = 15
GENERATE = "generate"  # the OpenAPI tag of txt2img and img2img
LIMITS = Limits(max_width=128, max_height=128, max_steps=4, max_images=2)
TIMEOUT = 60  # seconds per request; a generated request that passes validation takes well under one


def _config(max_examples: int, mode: str = "all") -> SchemathesisConfig:
    return SchemathesisConfig.from_dict({
        "seed": SEED,
        # the server's answers take long for Hypothesis' taste, and the web UI's models have many fields
        "suppress-health-check": ["too_slow", "filter_too_much", "data_too_large"],
        "generation": {"mode": mode, "max-examples": max_examples, "deterministic": True, "database": "none"},
        "phases": {"stateful": {"enabled": False}},
    })


def _openapi() -> dict:
    from diffspeed.server.app import create_app

    return create_app(ServerConfig(limits=LIMITS)).openapi()  # the lifespan does not run: no model loads


def _png(size: tuple[int, int], mode: str = "RGB", fill=(200, 40, 40), box=None, box_fill=(20, 20, 220)) -> str:
    from PIL import Image

    image = Image.new(mode, size, fill)
    if box is not None:
        image.paste(box_fill, box)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode("ascii")


def _jpeg_uri(size: tuple[int, int]) -> str:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", size, (10, 120, 10)).save(out, format="JPEG")
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode("ascii")


def _servable(openapi: dict) -> dict:
    """txt2img and img2img narrowed to what this server runs (types as the web UI's, values in range)."""
    from diffspeed.pipelines.workflows import HIRES_UPSCALERS
    from diffspeed.server.webui import sampler_items

    images = [_png((64, 64), box=(16, 16, 48, 48)), _png((96, 128), "RGBA", (0, 0, 0, 0)), _png((8, 8), "L", 90),
              _jpeg_uri((128, 64))]
    masks = [_png((64, 64), "L", 0, (0, 0, 32, 64), 255), _png((32, 32), "L", 0), _png((128, 128), "1", 1)]
    text = {"type": "string", "pattern": "^[a-z ,.]{0,24}$"}  # plain prompts: no emphasis, AND, BREAK or tags
    size = {"type": "integer", "minimum": 64, "maximum": 128, "multipleOf": 8}
    fraction = {"type": "number", "minimum": 0, "maximum": 1}
    unit = {"type": "object", "additionalProperties": False, "required": ["model", "image"], "properties": {
        "model": {"enum": ["tiny-sd-controlnet-mask"]}, "image": {"enum": images}, "module": {"enum": ["none"]},
        "weight": {"type": "number", "minimum": 0, "maximum": 2}, "guidance_start": fraction,
        "guidance_end": fraction, "resize_mode": {"enum": ["Just Resize", "Crop and Resize", "Resize and Fill"]}}}
    common = {
        "prompt": {"anyOf": [text, {"enum": ["a cat <lora:tiny-sd-lora-monochrome:0.5>"]}]},
        "negative_prompt": text, "seed": {"type": "integer", "minimum": -1, "maximum": 2**32 - 1},
        "steps": {"type": "integer", "minimum": 1, "maximum": 4},
        "cfg_scale": {"type": "number", "minimum": 0, "maximum": 15}, "width": size, "height": size,
        "batch_size": {"type": "integer", "minimum": 1, "maximum": 2},
        "n_iter": {"type": "integer", "minimum": 1, "maximum": 2},
        "sampler_name": {"enum": [s.name for s in sampler_items()]},
        "scheduler": {"enum": ["automatic", "Automatic", "karras", "Karras"]},
        "denoising_strength": fraction, "send_images": {"type": "boolean"}, "save_images": {"type": "boolean"},
        "override_settings": {"type": "object", "additionalProperties": False,
                              "properties": {"sd_model_checkpoint": {"enum": ["tiny-sd", "tiny-sdxl"]}}},
        "alwayson_scripts": {"type": "object", "additionalProperties": False, "properties": {"controlnet": {
            "type": "object", "additionalProperties": False, "required": ["args"],
            "properties": {"args": {"type": "array", "maxItems": 1, "items": unit}}}}},
    }
    hires = {"enable_hr": {"enum": [True]}, "width": {"enum": [64]}, "height": {"enum": [64]},
             "hr_scale": {"type": "number", "minimum": 1, "maximum": 2}, "hr_upscaler": {"enum": list(HIRES_UPSCALERS)},
             "hr_second_pass_steps": {"type": "integer", "minimum": 0, "maximum": 4},
             "hr_resize_x": {"enum": [0, 96, 128]}, "hr_resize_y": {"enum": [0, 96, 128]}}
    img2img = {"init_images": {"type": "array", "items": {"enum": images}, "minItems": 1, "maxItems": 1},
               "mask": {"anyOf": [{"type": "null"}, {"enum": masks}]},
               "mask_blur": {"type": "integer", "minimum": 0, "maximum": 8},
               "inpainting_fill": {"enum": [1]}, "inpaint_full_res": {"enum": [False]},
               "inpainting_mask_invert": {"enum": [0, 1]}, "resize_mode": {"enum": [0]},
               "include_init_images": {"type": "boolean"}}
    spec = copy.deepcopy(openapi)
    spec["paths"] = {p: v for p, v in spec["paths"].items() if "generate" in v.get("post", {}).get("tags", ())}
    models = spec["components"]["schemas"]
    required = ["width", "height", "steps"]  # the web UI's defaults (512x512, 50 steps) are over the limits

    def body(own: dict, more: list[str]) -> dict:
        return {"type": "object", "properties": {**common, **own}, "required": required + more,
                "additionalProperties": False}

    # txt2img: plain, or a hires fix from 64x64 (kept apart, or a random body would rarely be a hires one)
    models["Txt2ImgRequest"] = {"anyOf": [body({"enable_hr": {"enum": [False]}}, []), body(hires, ["enable_hr"])]}
    models["Img2ImgRequest"] = body(img2img, ["init_images", "inpaint_full_res", "inpainting_fill"])
    return spec


OPENAPI = _openapi()
schema = schemathesis.openapi.from_dict(OPENAPI, config=_config(10))
deep = schemathesis.openapi.from_dict(OPENAPI, config=_config(60))
servable = schemathesis.openapi.from_dict(_servable(OPENAPI), config=_config(15, mode="positive"))
deep_servable = schemathesis.openapi.from_dict(_servable(OPENAPI), config=_config(80, mode="positive"))


@pytest.fixture(scope="module")
def small_server(tmp_path_factory):
    from tests.server.conftest import running

    out = tmp_path_factory.mktemp("schemathesis-outputs")
    with running(ServerConfig(outputs_dir=str(out), limits=LIMITS, request_timeout=TIMEOUT)) as url:
        yield url


def test_every_route_is_in_the_schema():
    """What the tests below cover: every route a client can call (the page and /metrics are left out of it)."""
    labels = {result.ok().label for result in schema.get_all_operations()}
    assert {"POST /sdapi/v1/txt2img", "POST /sdapi/v1/img2img", "POST /sdapi/v1/options", "GET /sdapi/v1/options",
            "POST /sdapi/v1/png-info", "GET /sdapi/v1/progress", "POST /sdapi/v1/interrupt",
            "POST /diffspeed/v1/cancel/{task_id}"} <= labels


@schema.exclude(tag=GENERATE).parametrize()
def test_other_routes_never_fail_and_match_their_schema(case, small_server):
    case.call_and_validate(base_url=small_server, timeout=TIMEOUT, checks=[
        not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance])


@schema.include(tag=GENERATE).parametrize()
def test_generate_routes_never_fail(case, small_server):
    """Every generated txt2img/img2img body gets 200, 422 or another deliberate status: never a 5xx."""
    case.call_and_validate(base_url=small_server, timeout=TIMEOUT, checks=[not_a_server_error])


@pytest.mark.slow
@deep.include(tag=GENERATE).parametrize()
def test_generate_routes_never_fail_deeper(case, small_server):
    case.call_and_validate(base_url=small_server, timeout=TIMEOUT, checks=[not_a_server_error])


@pytest.fixture(scope="module")
def answers():
    """Statuses per operation of the servable requests; at the end, each operation that ran made an image."""
    seen: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    yield seen
    for label, statuses in seen.items():
        if set(statuses) == {422}:  # (another status fails its own test)
            pytest.fail(f"{label}: the server refused every request generated from the narrowed schema "
                        f"({statuses[422]}); it no longer matches what the server runs")


@servable.parametrize()
def test_servable_requests_make_their_images_or_name_the_field(case, small_server, answers):
    _check_servable(case, small_server, answers)


@pytest.mark.slow
@deep_servable.parametrize()
def test_servable_requests_deeper(case, small_server, answers):
    _check_servable(case, small_server, answers)


def _check_servable(case, small_server, answers):
    """200 with the images asked for, each PNG carrying its infotext; or a 422 naming the fields."""
    response = case.call(base_url=small_server, timeout=TIMEOUT)
    answers[case.operation.label][response.status_code] += 1
    case.validate_response(response, checks=[not_a_server_error])
    body = response.json()
    assert response.status_code in (200, 422), body
    if response.status_code == 422:
        assert body["detail"] and all(d["loc"][0] == "body" and d["msg"] for d in body["detail"]), body
        return
    case.validate_response(response, checks=[response_schema_conformance])
    asked = case.body.get("batch_size", 1) * case.body.get("n_iter", 1)
    info = json.loads(body["info"])
    assert len(info["all_seeds"]) == len(info["infotexts"]) == asked
    if not case.body.get("send_images", True):
        assert not body["images"]
        return
    assert len(body["images"]) == asked
    from PIL import Image

    for text, infotext in zip(body["images"], info["infotexts"]):
        image = Image.open(io.BytesIO(base64.b64decode(text, validate=True)))
        assert image.format == "PNG" and image.info["parameters"] == infotext
        assert f"Size: {image.width}x{image.height}," in infotext  # the final size (after a hires pass)


def _strict_json(text: str):
    """JSON as a browser reads it: NaN and Infinity are not JSON."""
    def refuse(token):
        raise ValueError(f"{token} is not JSON")

    return json.loads(text, parse_constant=refuse)


# requests that got a 5xx (found by the tests above, with other seeds or more examples, or next to what they
# found), as raw JSON text: Python's parser, and so the server's, reads NaN and Infinity
FOUND = {
    "hires pass of zero steps": ("txt2img", '{"enable_hr": true, "width": 64, "height": 64, "steps": 4, '
                                            '"hr_scale": 2, "denoising_strength": 0.1}'),
    "firstphase_height alone, hr_resize_x": ("txt2img", '{"enable_hr": true, "firstphase_height": 64, '
                                                        '"hr_resize_x": 128, "steps": 2}'),
    "width 0, hr_resize_x": ("txt2img", '{"enable_hr": true, "width": 0, "height": 64, "hr_resize_x": 128}'),
    "height 0, hr_resize_y": ("txt2img", '{"enable_hr": true, "width": 64, "height": 0, "hr_resize_y": 128}'),
    "hr_scale 1e308": ("txt2img", '{"enable_hr": true, "width": 64, "height": 64, "steps": 2, "hr_scale": 1e308}'),
    "hr_scale Infinity": ("txt2img", '{"enable_hr": true, "width": 64, "height": 64, "hr_scale": Infinity}'),
    "hr_scale NaN": ("txt2img", '{"enable_hr": true, "width": 64, "height": 64, "hr_scale": NaN}'),
    "batch_size NaN": ("txt2img", '{"width": 64, "height": 64, "steps": 2, "batch_size": NaN}'),
    "prompt NaN": ("txt2img", '{"prompt": NaN}'),
    "eta NaN (ignored by Euler)": ("txt2img", '{"width": 64, "height": 64, "steps": 2, "sampler_name": "Euler", '
                                              '"eta": NaN}'),
    "denoising_strength Infinity (no hires)": ("txt2img", '{"width": 64, "height": 64, "steps": 2, '
                                                          '"denoising_strength": Infinity}'),
    "init image: a data URI without a comma": ("img2img", '{"width": 64, "height": 64, "steps": 2, '
                                                          '"init_images": ["data:image/png;base64"]}'),
    "control image: a data URI without a comma": (
        "txt2img", '{"width": 64, "height": 64, "steps": 2, "alwayson_scripts": {"controlnet": {"args": '
                   '[{"model": "tiny-sd-controlnet-mask", "image": "data:"}]}}}'),
    "png-info: a data URI without a comma": ("png-info", '{"image": "data:image/png;base64"}'),
    "png-info: image NaN": ("png-info", '{"image": NaN}'),
}


@pytest.mark.parametrize("route, body", FOUND.values(), ids=FOUND.keys())
def test_requests_that_once_failed(small_server, route, body):
    """Each gets a deliberate answer (an image, or a 422 naming the field), in strict JSON."""
    import requests

    response = requests.post(f"{small_server}/sdapi/v1/{route}", data=body, timeout=TIMEOUT,
                              headers={"Content-Type": "application/json"})
    assert response.status_code in (200, 422), response.text[:500]
    answer = _strict_json(response.text)
    if response.status_code == 422:
        assert answer["detail"] and all(d["loc"][0] == "body" and d["msg"] for d in answer["detail"]), answer
    elif route != "png-info":
        _strict_json(answer["info"])
