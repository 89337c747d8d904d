import numpy as np
import pytest

from diffspeed import DiffspeedError, GenerateRequest, generate, save_images
from diffspeed.pipelines.samplers import SAMPLERS
from diffspeed.pngmeta import read_parameters

PROMPT = "a red circle at top left on a blue background"


def run(pipe, **kw):
    kw.setdefault("steps", 4)
    return generate(pipe, GenerateRequest(prompt=PROMPT, **kw), progress=False)


def test_same_seed_same_image_and_different_seed_differs(tiny_sd):
    a, b, c = (run(tiny_sd, seed=s).images[0] for s in (5, 5, 6))
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_batch_uses_consecutive_seeds(tiny_sd):
    batch = run(tiny_sd, seed=10, batch_size=2)
    assert batch.seeds == [10, 11]
    single = run(tiny_sd, seed=11).images[0]
    diff = np.abs(np.asarray(batch.images[1], dtype=int) - np.asarray(single, dtype=int))
    assert diff.max() <= 2  # same latents; batched matmuls may round differently


def test_native_size_and_explicit_size(tiny_sd):
    assert run(tiny_sd, seed=1).images[0].size == (64, 64)
    assert run(tiny_sd, seed=1, width=96, height=64).images[0].size == (96, 64)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_runs_and_scheduler_is_restored(tiny_sd, name):
    before = type(tiny_sd.scheduler)
    out = run(tiny_sd, seed=3, steps=3, sampler=name)
    assert np.isfinite(np.asarray(out.images[0], dtype=float)).all()
    assert type(tiny_sd.scheduler) is before
    assert f"Sampler: {name}," in out.parameters[0]


def test_random_seed_is_reported(tiny_sd):
    out = run(tiny_sd, seed=-1)
    assert 0 <= out.seeds[0] < 2**32
    again = run(tiny_sd, seed=out.seeds[0])
    assert np.array_equal(np.asarray(out.images[0]), np.asarray(again.images[0]))


@pytest.mark.parametrize(("field", "value"), [
    ("steps", 0), ("steps", -3), ("steps", 1001), ("cfg_scale", -1.0), ("cfg_scale", 51.0), ("width", 63),
    ("width", 100), ("height", 4096), ("height", 30), ("batch_size", 0), ("seed", -2), ("seed", 2**33),
    ("sampler", "Euler b"), ("steps", 2.5),
])
def test_bad_request_names_the_field(field, value):
    with pytest.raises(DiffspeedError) as err:
        GenerateRequest(prompt=PROMPT, **{field: value})
    assert err.value.field == field
    assert field in str(err.value)


def test_saved_png_carries_parameters_and_never_overwrites(tiny_sd, tmp_path):
    out = run(tiny_sd, seed=7, negative_prompt="green")
    first = save_images(out, tmp_path)
    second = save_images(out, tmp_path)
    assert first[0] != second[0] and len(list(tmp_path.glob("*.png"))) == 2
    meta = read_parameters(first[0])
    assert meta["prompt"] == PROMPT and meta["negative_prompt"] == "green"
    assert meta["Seed"] == "7" and meta["Steps"] == "4" and meta["Size"] == "64x64"
    assert meta["Model"] == "tiny-sd" and len(meta["Model hash"]) == 10
