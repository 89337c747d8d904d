import hashlib

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

import diffspeed
from diffspeed import DiffspeedError
from diffspeed.pipelines.load import model_hash, shipped_path


def test_shipped_names_load_the_right_architectures(tiny_sd, tiny_sdxl):
    assert isinstance(tiny_sd, StableDiffusionPipeline)
    assert isinstance(tiny_sdxl, StableDiffusionXLPipeline)
    assert tiny_sd.unet.dtype == torch.float32  # fp16 on disk, fp32 on the CPU by default
    assert tiny_sd.diffspeed_model.kind == "shipped"
    assert tiny_sd.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_directory_path_loads_same_weights(tiny_sd):
    pipe = diffspeed.load(str(shipped_path("tiny-sd")), device="cpu")
    assert pipe.diffspeed_model.kind == "directory"
    a, b = pipe.unet.state_dict(), tiny_sd.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dtype_option():
    pipe = diffspeed.load("tiny-sd", device="cpu", dtype="bf16")
    assert pipe.unet.dtype == torch.bfloat16 and pipe.vae.dtype == torch.bfloat16


@pytest.mark.parametrize(("kw", "field"), [({"dtype": "fp8"}, "dtype"), ({"device": "cuda:7"}, "device")])
def test_bad_options(kw, field):
    if field == "device" and torch.cuda.is_available():
        pytest.skip("a CUDA device exists here")
    with pytest.raises(DiffspeedError) as err:
        diffspeed.load("tiny-sd", **kw)
    assert err.value.field == field


@pytest.mark.parametrize("source", ["missing.safetensors", "./nope", "/no/such/dir/model.ckpt"])
def test_missing_model_is_a_clear_error(source):
    with pytest.raises(DiffspeedError, match="no such file or folder") as err:
        diffspeed.load(source)
    assert err.value.field == "model"


def test_folder_without_model_index(tmp_path):
    with pytest.raises(DiffspeedError, match="model_index.json"):
        diffspeed.load(tmp_path)


def test_pickle_refused_through_load(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}}, path)
    with pytest.raises(DiffspeedError, match="allow_pickle"):
        diffspeed.load(path)


def test_model_hash_is_web_ui_short_hash(tmp_path):
    f = tmp_path / "m.safetensors"
    f.write_bytes(b"diffspeed" * 1000)
    assert model_hash(f) == hashlib.sha256(b"diffspeed" * 1000).hexdigest()[:10]
    h = model_hash(shipped_path("tiny-sd"))
    assert len(h) == 10 and h == model_hash(shipped_path("tiny-sd"))
    assert h != model_hash(shipped_path("tiny-sdxl"))


@pytest.mark.parametrize("model", ["tiny_sd", "tiny_sdxl"])
def test_single_file_round_trip_of_the_shipped_model(model, request, tmp_path):
    from diffspeed.pipelines.single_file import export_single_file

    pipe = request.getfixturevalue(model)
    name = pipe.diffspeed_model.name
    path = export_single_file(pipe, tmp_path / f"{name}.safetensors")
    back = diffspeed.load(path, device="cpu", config_dir=shipped_path(name))
    assert back.diffspeed_model.kind == "single-file" and type(back) is type(pipe)
    for part in ("unet", "vae", "text_encoder"):
        a, b = getattr(pipe, part).state_dict(), getattr(back, part).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    assert back.diffspeed_model.hash == hashlib.sha256(path.read_bytes()).hexdigest()[:10]
