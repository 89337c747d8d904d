"""The resolver: references become images and models in one place; the server's resolver refuses paths."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from diffspeed import DiffspeedError, GenerateRequest, generate
from diffspeed.generate import generate_batch
from diffspeed.resolve import Resolver


def b64png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def bomb(edge: int) -> str:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", edge, edge, 1, 0, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b""))
    return base64.b64encode(raw).decode()


def test_base64_raw_and_data_uri_decode_to_the_same_pixels():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 40, 3), dtype=np.uint8))
    r = Resolver(allow_paths=False)
    a = r.image(b64png(image), "init_image")
    b = r.image("data:image/png;base64," + b64png(image), "init_image")
    assert np.array_equal(np.asarray(a), np.asarray(image)) and np.array_equal(np.asarray(b), np.asarray(image))


@pytest.mark.parametrize("ref, match", [
    ("/etc/passwd", "paths are not accepted"),
    ("data:image/png;base64,@@@@", "not valid base64"),
    ("data:image/png;base64," + base64.b64encode(b"not an image at all").decode(), "cannot read"),
])
def test_server_resolver_refuses_paths_and_garbage(ref, match):
    with pytest.raises(DiffspeedError, match=match) as err:
        Resolver(allow_paths=False).image(ref, "mask_image")
    assert err.value.field == "mask_image"


@pytest.mark.parametrize("edge", [5000, 40_000])  # over our limit, and over PIL's own bomb limit
def test_a_decompression_bomb_is_refused_from_its_header(edge):
    with pytest.raises(DiffspeedError, match="pixels") as err:
        Resolver(allow_paths=False, max_image_pixels=4096 * 4096).image(bomb(edge), "init_image")
    assert err.value.field == "init_image"


def test_check_refuses_unlisted_controlnets_and_refiners_when_paths_are_off(tmp_path):
    r = Resolver(allow_paths=False)
    with pytest.raises(DiffspeedError, match="not one of this server's controlnets") as err:
        r.check(GenerateRequest(prompt="x", controlnet=str(tmp_path), control_image=b64png(Image.new("RGB", (8, 8)))))
    assert err.value.field == "controlnet"
    with pytest.raises(DiffspeedError, match="not one of this server's refiners"):
        r.check(GenerateRequest(prompt="x", refiner="/etc"))
    with pytest.raises(DiffspeedError, match="paths are not accepted") as err:
        r.check(GenerateRequest(prompt="x", init_image="/etc/hosts"))
    assert err.value.field == "init_image"


def test_models_dir_lists_controlnets_by_name(tmp_path):
    (tmp_path / "controlnet" / "edges").mkdir(parents=True)
    (tmp_path / "controlnet" / "edges" / "config.json").write_text("{}")
    (tmp_path / "controlnet" / "empty").mkdir()
    r = Resolver(allow_paths=False, models_dir=tmp_path)
    assert "edges" in r.controlnet_names() and "empty" not in r.controlnet_names()
    r.check(GenerateRequest(prompt="x", controlnet="edges", control_image=b64png(Image.new("RGB", (8, 8)))))


def test_controlnet_is_loaded_once_per_resolver(tiny_sd, monkeypatch):
    from diffusers import ControlNetModel

    loads = []
    original = ControlNetModel.from_pretrained.__func__
    monkeypatch.setattr(ControlNetModel, "from_pretrained",
                        classmethod(lambda cls, *a, **k: loads.append(a) or original(cls, *a, **k)))
    r = Resolver()
    first = r.controlnet("tiny-sd-controlnet-mask", tiny_sd)
    second = r.controlnet("tiny-sd-controlnet-mask", tiny_sd)
    assert first is second and len(loads) == 1


def test_batched_requests_match_each_run_alone(tiny_sd):
    a = GenerateRequest(prompt="a red circle on a white background", seed=11, steps=6, sampler="Euler")
    b = a.replace(prompt="a blue square on a green background", seed=12, batch_size=2)
    alone = [generate(tiny_sd, r, progress=False) for r in (a, b)]
    together = generate_batch(tiny_sd, [a, b], progress=False)
    for x, y in zip(alone, together):
        assert x.seeds == y.seeds and x.parameters == y.parameters
        for p, q in zip(x.images, y.images):
            # the same latents; a batched matrix product may round the last float bit differently
            assert np.abs(np.asarray(p, int) - np.asarray(q, int)).max() <= 1
    assert together[0].stats["batched_requests"] == 2
    with pytest.raises(DiffspeedError, match="differ in more than"):
        generate_batch(tiny_sd, [a, a.replace(steps=7)], progress=False)


def test_on_step_reports_and_stops_early(tiny_sd):
    seen = []
    request = GenerateRequest(prompt="a red circle", seed=3, steps=10, sampler="Euler")
    out = generate(tiny_sd, request, progress=False, on_step=lambda i, n: seen.append((i, n)) or i >= 3)
    assert seen == [(1, 10), (2, 10), (3, 10)]
    full = generate(tiny_sd, request, progress=False)
    assert out.images[0].size == full.images[0].size
    assert not np.array_equal(np.asarray(out.images[0]), np.asarray(full.images[0]))  # stopped at step 3
