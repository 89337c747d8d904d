"""The request model: pure data, every problem at once with its field, no file system access."""

from __future__ import annotations

import base64
import builtins
import io
import json
import os
import pathlib

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from diffspeed.request import GenerateRequest, RequestError, is_inline_image


def test_every_problem_is_reported_at_once_with_its_field():
    with pytest.raises(RequestError) as err:
        GenerateRequest(prompt="x", steps=0, width=100, sampler="Euler b", mask_image="m.png",
                        controlnet="cn", control_start=0.6, control_end=0.4, stepz=3)
    fields = [f for f, _ in err.value.problems]
    assert fields == ["steps", "width", "sampler", "mask_image", "controlnet", "control_end", "stepz"]
    assert err.value.field == "steps" and str(err.value).startswith("7 problems: steps:")
    assert all(msg.startswith(field) for field, msg in err.value.problems)


@pytest.mark.parametrize(("field", "value"), [("steps", True), ("steps", "20"), ("cfg_scale", True),
                                              ("cfg_scale", float("nan")), ("seed", 1.0), ("prompt", None)])
def test_types_are_strict(field, value):
    with pytest.raises(RequestError) as err:
        GenerateRequest(**{"prompt": "x", field: value})
    assert err.value.field == field


def test_validation_never_touches_the_file_system(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"file system access during validation: {args}")

    for name in ("stat", "lstat", "open", "listdir", "scandir"):
        monkeypatch.setattr(os, name, refuse)
    monkeypatch.setattr(builtins, "open", refuse)
    monkeypatch.setattr(pathlib.Path, "is_file", refuse)
    monkeypatch.setattr(pathlib.Path, "exists", refuse)
    request = GenerateRequest(prompt="x", init_image="/no/such.png", mask_image="/no/mask.png",
                              controlnet="/no/such/controlnet", control_image="/no/control.png")
    assert request.workflow == "inpaint"


def test_python_images_become_lossless_base64_and_the_request_is_json():
    rgb = np.random.default_rng(0).integers(0, 256, (64, 48, 3), dtype=np.uint8)
    mask = Image.fromarray(np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1)), "L")
    request = GenerateRequest(prompt="x", init_image=rgb, mask_image=mask, seed=3)
    assert is_inline_image(request.init_image) and request.init_image.startswith("data:image/png;base64,")
    decoded = Image.open(io.BytesIO(base64.b64decode(request.init_image.split(",", 1)[1])))
    assert np.array_equal(np.asarray(decoded), rgb)
    again = GenerateRequest.from_data(json.loads(request.model_dump_json()))
    assert again == request
    assert "properties" in GenerateRequest.model_json_schema()


def test_paths_and_loaded_objects():
    assert GenerateRequest(prompt="x", init_image=pathlib.Path("/a/b.png")).init_image == "/a/b.png"
    assert not is_inline_image("/a/b.png") and not is_inline_image("relative/iVBORw0KGgo.png")
    with pytest.raises(RequestError, match="Resolver.add") as err:
        GenerateRequest(prompt="x", controlnet=object(), control_image="/c.png")
    assert err.value.field == "controlnet"


def test_frozen_replace_validates_and_batch_key():
    request = GenerateRequest(prompt="a", seed=1, steps=8)
    with pytest.raises(ValidationError, match="frozen"):
        request.steps = 9
    assert request.replace(seed=2).seed == 2
    with pytest.raises(RequestError):
        request.replace(steps=0)
    same = request.replace(prompt="b", seed=7, batch_size=3, negative_prompt="")
    assert same.batch_key() == request.batch_key()
    assert request.replace(negative_prompt="blue").batch_key() != request.batch_key()  # SDXL: empty -> zeros
    assert request.replace(steps=9).batch_key() != request.batch_key()
