"""Single-file export/import: exact round trips on tiny pipelines, and the shipped full-size configs.

The tiny pipelines have the real SD 1.x / SD 2.x / SDXL / refiner block structure (attention-less outer
blocks, several layers per block, deeper transformers inside, two text encoders of different widths)
at a size that builds, saves and runs in well under a second each. Full-size models are only ever
built on the meta device.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import pickle
import shutil
import socket
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import diffspeed
from diffspeed.errors import DiffspeedError, DiffspeedRuntimeError
from diffspeed.pipelines import single_file
from diffspeed.pipelines.single_file import (
    CONFIG_ROOT,
    clip_tokenizer,
    detect_family,
    export_single_file,
    load_single_file,
    original_state_dict,
)

KINDS = ("sd15", "sd2", "sdxl-base", "sdxl-refiner")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


# ----------------------------------------------------------------------------------- tiny pipelines


def _unet(**overrides):
    from diffusers import UNet2DConditionModel

    config = {"sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
              "norm_num_groups": 8, "block_out_channels": (16, 32, 32), "attention_head_dim": 4,
              "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
              "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")}
    return UNet2DConditionModel(**{**config, **overrides})


def _xl_unet(cross_attention_dim, time_ids, projection_dim=32):
    return _unet(cross_attention_dim=cross_attention_dim, use_linear_projection=True,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 2), addition_embed_type="text_time",
                 addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=projection_dim + time_ids * 8)


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, norm_num_groups=8,
                         layers_per_block=1, sample_size=32)


def _clip(cls_name="CLIPTextModel", hidden=32, act="quick_gelu"):
    import transformers

    config = transformers.CLIPTextConfig(hidden_size=hidden, intermediate_size=2 * hidden,
                                         num_hidden_layers=2, num_attention_heads=4, vocab_size=49408,
                                         max_position_embeddings=77, hidden_act=act, projection_dim=32)
    return getattr(transformers, cls_name)(config)


def _build(kind):
    import diffusers

    torch.manual_seed(0)
    if kind in ("sd15", "sd2"):
        openclip = kind == "sd2"
        # steps_offset=1 / clip_sample=False as SD's own scheduler configs: diffusers warns about the defaults
        scheduler = diffusers.DDIMScheduler(prediction_type="v_prediction" if openclip else "epsilon",
                                            steps_offset=1, clip_sample=False)
        return diffusers.StableDiffusionPipeline(
            unet=_unet(cross_attention_dim=32, use_linear_projection=openclip), vae=_vae(),
            text_encoder=_clip(act="gelu" if openclip else "quick_gelu"),
            tokenizer=clip_tokenizer(pad_token="!" if openclip else None), scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    encoder_2 = _clip("CLIPTextModelWithProjection", hidden=64, act="gelu")  # projection 32 != width 64
    if kind == "sdxl-base":
        return diffusers.StableDiffusionXLPipeline(
            unet=_xl_unet(cross_attention_dim=32 + 64, time_ids=6), vae=_vae(), text_encoder=_clip(),
            text_encoder_2=encoder_2, tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(pad_token="!"),
            scheduler=diffusers.EulerDiscreteScheduler())
    return diffusers.StableDiffusionXLImg2ImgPipeline(
        unet=_xl_unet(cross_attention_dim=64, time_ids=5), vae=_vae(), text_encoder=None, tokenizer=None,
        text_encoder_2=encoder_2, tokenizer_2=clip_tokenizer(pad_token="!"),
        scheduler=diffusers.EulerDiscreteScheduler(), requires_aesthetics_score=True)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Models this small gain nothing from threads, and on a busy machine the intra-op threads' spin
    waits make each step about 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """kind -> (pipeline, the diffusers folder it was saved to)."""
    built = {}
    for kind in KINDS:
        pipe = _build(kind)
        pipe.set_progress_bar_config(disable=True)
        folder = tmp_path_factory.mktemp(kind)
        pipe.save_pretrained(folder)
        built[kind] = (pipe, folder)
    return built


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to reach the hub fails loudly instead of silently downloading."""

    def refuse(*args, **kwargs):
        raise OSError("network access attempted during an offline load")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def _generate(pipe, kind):
    kwargs = {"prompt": "a red cube", "num_inference_steps": 2, "output_type": "np",
              "generator": torch.Generator().manual_seed(0)}
    if kind == "sdxl-refiner":
        image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        kwargs.update(image=image, strength=0.5, num_inference_steps=4)  # 2 denoising steps
    else:
        kwargs.update(height=32, width=32)
    return pipe(**kwargs).images


def _public(config):
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _assert_same_weights(expected, actual, what, dtype=None):
    if expected is None:
        assert actual is None, what
        return
    want, got = expected.state_dict(), actual.state_dict()
    if dtype is not None:
        want = {k: v.to(dtype) if v.is_floating_point() else v for k, v in want.items()}
    assert want.keys() == got.keys(), what
    different = [k for k in want if want[k].dtype != got[k].dtype or not torch.equal(want[k], got[k])]
    assert not different, f"{what}: {different[:5]}"


# ------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_is_exact(kind, tiny, tmp_path, no_network):
    pipe, folder = tiny[kind]
    path = export_single_file(pipe, tmp_path / "model.safetensors")
    loaded = load_single_file(path, config_dir=folder)
    loaded.set_progress_bar_config(disable=True)

    assert type(loaded) is type(pipe)
    for name in ("unet", "vae", *TEXT_ENCODERS):
        _assert_same_weights(getattr(pipe, name, None), getattr(loaded, name, None), name)
    assert _public(loaded.scheduler.config) == _public(pipe.scheduler.config)
    before, after = _generate(pipe, kind), _generate(loaded, kind)
    assert np.isfinite(before).all()
    np.testing.assert_array_equal(before, after)


@pytest.mark.parametrize(("kind", "expected"), [
    ("sd15", {"cond_stage_model.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight": (32, 32),
              "cond_stage_model.transformer.text_model.final_layer_norm.weight": (32,)}),
    ("sd2", {"cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight": (96, 32),
             "cond_stage_model.model.positional_embedding": (77, 32),
             "model.diffusion_model.input_blocks.1.1.proj_in.weight": (16, 16)}),
    ("sdxl-base", {"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (32,),
                   "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_bias": (192,),
                   "conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_fc.weight": (128, 64),
                   "conditioner.embedders.1.model.text_projection": (64, 32),
                   "conditioner.embedders.1.model.ln_final.weight": (64,),
                   "model.diffusion_model.label_emb.0.0.weight": (64, 80),
                   "model.diffusion_model.input_blocks.7.1.transformer_blocks.1.attn2.to_k.weight": (32, 96),
                   "model.diffusion_model.middle_block.1.transformer_blocks.1.ff.net.2.weight": (32, 128),
                   "model.diffusion_model.output_blocks.2.2.conv.weight": (32, 32, 3, 3)}),
    ("sdxl-refiner", {"conditioner.embedders.0.model.text_projection": (64, 32),
                      "conditioner.embedders.0.model.token_embedding.weight": (49408, 64)}),
])
def test_export_writes_the_original_layout(kind, expected, tiny, tmp_path):
    path = export_single_file(tiny[kind][0], tmp_path / "model.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in list(handle.keys())}
        assert handle.metadata() == {"format": "pt"}
    for key, shape in expected.items():
        assert shapes.get(key) == shape, key
    # Shared by every family: 1x1-conv VAE attention, bottom-up decoder levels, LDM resnet names.
    assert shapes["first_stage_model.decoder.mid.attn_1.q.weight"] == (32, 32, 1, 1)
    assert shapes["first_stage_model.decoder.up.0.block.0.conv1.weight"] == (16, 32, 3, 3)
    assert shapes["first_stage_model.encoder.down.0.downsample.conv.weight"] == (16, 16, 3, 3)
    assert "model.diffusion_model.out.2.weight" in shapes
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.")
    assert all(key.startswith(prefixes) for key in shapes)


def test_export_sees_through_speed_ups(tiny, tmp_path):
    """Fused QKV projections (extra copies) and torch.compile wrappers do not change the file."""
    pipe = _build("sdxl-base")
    pipe.fuse_qkv_projections()
    assert any(".to_qkv." in key for key in pipe.unet.state_dict())
    assert any(".to_qkv." in key for key in pipe.vae.state_dict())
    pipe.unet = torch.compile(pipe.unet)  # wrapping is lazy: nothing is compiled here
    fast = original_state_dict(pipe)
    plain = original_state_dict(tiny["sdxl-base"][0])
    assert fast.keys() == plain.keys()
    assert all(torch.equal(fast[key], plain[key]) for key in plain)


def test_export_refuses_to_overwrite(tiny, tmp_path):
    pipe = tiny["sd15"][0]
    path = export_single_file(pipe, tmp_path / "model.safetensors")
    with pytest.raises(DiffspeedError, match="overwrite=True"):
        export_single_file(pipe, path)
    assert export_single_file(pipe, path, overwrite=True) == path
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no partial file left behind


def _refuse_erofs(*args, **kwargs):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS))


def test_export_to_a_read_only_folder_is_one_line(tiny, tmp_path, monkeypatch):
    """On a read-only file system even unlink of a missing file fails (EROFS); that must not mask the cause."""
    path = tmp_path / "new" / "model.safetensors"
    monkeypatch.setattr(single_file, "save_file", _refuse_erofs)
    monkeypatch.setattr(Path, "unlink", _refuse_erofs)
    with pytest.raises(DiffspeedRuntimeError) as err:
        export_single_file(tiny["sd15"][0], path)
    assert str(err.value) == f"path: cannot write {path}: Read-only file system" and err.value.exit_code == 1
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []  # the folder made for it is gone too


def test_allowed_pickle_with_a_read_only_temp_folder(tiny, tmp_path, monkeypatch):
    path = _write_pickle(tiny["sd15"][0], tmp_path / "model.ckpt")
    monkeypatch.setattr(tempfile, "mkdtemp", _refuse_erofs)
    with pytest.raises(DiffspeedRuntimeError, match="^path: cannot stage model.ckpt as safetensors in the temp "
                                                    "folder: Read-only file system"):
        load_single_file(path, config_dir=tiny["sd15"][1], allow_pickle=True)


def test_export_rejects_other_suffixes(tiny, tmp_path):
    with pytest.raises(DiffspeedError, match=r"\.safetensors"):
        export_single_file(tiny["sd15"][0], tmp_path / "model.ckpt")


def test_half_precision_export_and_load(tiny, tmp_path, no_network):
    pipe, folder = tiny["sdxl-base"]
    path = export_single_file(pipe, tmp_path / "model.safetensors", dtype=torch.float16)
    with safe_open(str(path), framework="pt") as handle:
        assert {handle.get_slice(key).get_dtype() for key in list(handle.keys())} == {"F16"}
    loaded = load_single_file(path, config_dir=folder, dtype="float16")
    for name in ("unet", "vae", *TEXT_ENCODERS):
        _assert_same_weights(getattr(pipe, name), getattr(loaded, name), name, dtype=torch.float16)


def test_default_dtype_is_float32_even_where_a_config_names_float16(tiny, tmp_path, no_network):
    """The shipped SDXL text-encoder configs say float16, as the official ones do."""
    pipe, folder = tiny["sdxl-base"]
    config_dir = shutil.copytree(folder, tmp_path / "config")
    config_file = config_dir / "text_encoder_2" / "config.json"
    config = json.loads(config_file.read_text())
    config.update(dtype="float16", torch_dtype="float16")
    config_file.write_text(json.dumps(config))
    loaded = load_single_file(export_single_file(pipe, tmp_path / "m.safetensors"), config_dir=config_dir)
    dtypes = {next(getattr(loaded, name).parameters()).dtype for name in ("unet", "vae", *TEXT_ENCODERS)}
    assert dtypes == {torch.float32}


# ------------------------------------------------------------------------------------------ pickles


def _write_pickle(pipe, path):
    state = {k: v.clone() for k, v in original_state_dict(pipe).items()}
    torch.save({"state_dict": state, "global_step": 1}, path)
    return path


def test_pickle_is_refused_by_default(tiny, tmp_path):
    path = _write_pickle(tiny["sd15"][0], tmp_path / "model.ckpt")
    with pytest.raises(DiffspeedError, match="allow_pickle=True") as err:
        load_single_file(path, config_dir=tiny["sd15"][1])
    assert err.value.field == "allow_pickle"


def test_renamed_pickle_is_still_refused(tiny, tmp_path):
    path = _write_pickle(tiny["sd15"][0], tmp_path / "model.safetensors")
    with pytest.raises(DiffspeedError, match="allow_pickle=True"):
        load_single_file(path, config_dir=tiny["sd15"][1])


def test_pickle_loads_when_allowed(tiny, tmp_path, no_network):
    pipe, folder = tiny["sd15"]
    path = _write_pickle(pipe, tmp_path / "model.ckpt")
    loaded = load_single_file(path, config_dir=folder, allow_pickle=True)
    for name in ("unet", "vae", "text_encoder"):
        _assert_same_weights(getattr(pipe, name), getattr(loaded, name), name)


def test_pickle_with_python_objects_is_not_unpickled(tiny, tmp_path):
    path = tmp_path / "trainer.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.out.2.bias": torch.zeros(4)},
                "hyper_parameters": argparse.Namespace(lr=1e-4)}, path)
    with pytest.raises(DiffspeedError, match=r"^checkpoint trainer.ckpt is not a plain weights file: loading it "
                       r"would call argparse\.Namespace, so it was refused \(nothing in it was run\)$"):
        load_single_file(path, allow_pickle=True)


class _Payload:
    """Unpickling this runs ``call(*args)``: what a malicious checkpoint does."""

    def __init__(self, call, args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


@pytest.mark.skipif(os.name != "posix", reason="the payload uses touch")
@pytest.mark.parametrize("protocol", [2, 5])
def test_allowed_pickle_that_would_call_os_system_says_so(protocol, tmp_path):
    """Before, protocol 5 gave "stores Python objects besides tensors ()": empty, and no word of what ran."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    obj = {"state_dict": {"model.diffusion_model.x": [0.0]}, "callbacks": _Payload(os.system, (f"touch {marker}",))}
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    with pytest.raises(DiffspeedError, match=r"would call posix\.system, so it was refused") as err:
        load_single_file(path, allow_pickle=True)
    message = str(err.value)
    assert "()" not in message and "weights_only" not in message and "\n" not in message
    assert err.value.field == "path" and not marker.exists()


def _looped(path):
    """~1.5 KB: a dict that is its own state_dict (the unpickler's memo allows it)."""
    state = {"model.diffusion_model.out.2.bias": torch.zeros(4)}
    state["state_dict"] = state
    torch.save(state, path)
    return path


def test_self_referencing_pickle_is_refused_at_once(tmp_path):
    path = _looped(tmp_path / "loop.ckpt")
    start = time.perf_counter()
    with pytest.raises(DiffspeedError, match="^checkpoint loop.ckpt is not a plain weights file: its state_dict "
                                             "contains itself") as err:
        load_single_file(path, allow_pickle=True)
    assert time.perf_counter() - start < 1.0 and err.value.field == "path"


def test_self_referencing_pickle_through_diffspeed_load(tmp_path):
    """The path ``generate --allow-pickle`` takes."""
    path = _looped(tmp_path / "loop.ckpt")
    start = time.perf_counter()
    with pytest.raises(DiffspeedError, match="contains itself"):
        diffspeed.load(path, device="cpu", allow_pickle=True)
    assert time.perf_counter() - start < 1.0


# ------------------------------------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    with pytest.raises(DiffspeedError, match="checkpoint not found: .*nope.safetensors") as err:
        load_single_file(tmp_path / "nope.safetensors")
    assert err.value.field == "path"


@pytest.mark.parametrize(("name", "match"), [
    ("junk.safetensors", "not a readable checkpoint: "),
    ("junk.ckpt", r"^checkpoint junk.ckpt is not a readable checkpoint: not a torch.save file or a pickle \("),
])
def test_garbage_file(tmp_path, name, match):
    path = tmp_path / name
    path.write_bytes(b"this is not a checkpoint at all" * 10)
    with pytest.raises(DiffspeedError, match=match) as err:
        load_single_file(path, allow_pickle=True)
    assert "\n" not in str(err.value) and "weights_only" not in str(err.value)


def test_unknown_keys(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"encoder.layer.0.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(DiffspeedError, match=r"no UNet weights \(model\.diffusion_model\.\*\)"):
        load_single_file(path)


def _skeleton(shapes):
    return {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}


def test_unknown_text_encoder_layout():
    skeleton = _skeleton({"model.diffusion_model.out.2.weight": (4,),
                          "first_stage_model.quant_conv.weight": (8,),
                          "text_encoders.t5xxl.weight": (8,)})
    with pytest.raises(DiffspeedError, match=r"expected cond_stage_model\.transformer\.\*"):
        detect_family(skeleton)


def test_inpainting_checkpoints_are_refused():
    skeleton = _skeleton({"model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3),
                          "first_stage_model.quant_conv.weight": (8,),
                          "cond_stage_model.transformer.text_model.final_layer_norm.bias": (8,)})
    with pytest.raises(DiffspeedError, match="9 input channels"):
        detect_family(skeleton)


def test_config_mismatch_is_a_clear_error(tiny, tmp_path, no_network):
    """Without config_dir a tiny SD 1.x file meets the full-size sd15 configs (built empty, on meta)."""
    path = export_single_file(tiny["sd15"][0], tmp_path / "tiny.safetensors")
    expected = r"cannot load tiny\.safetensors as sd15 with the configs in .*sd15"
    with pytest.raises(DiffspeedError, match=expected):
        load_single_file(path)


def test_config_dir_must_be_a_pipeline_folder(tiny, tmp_path):
    path = export_single_file(tiny["sd15"][0], tmp_path / "tiny.safetensors")
    with pytest.raises(DiffspeedError, match="no model_index.json") as err:
        load_single_file(path, config_dir=tmp_path)
    assert err.value.field == "config_dir"


def test_bad_dtype(tiny, tmp_path):
    with pytest.raises(DiffspeedError, match="floating-point torch dtype") as err:
        export_single_file(tiny["sd15"][0], tmp_path / "x.safetensors", dtype="int8")
    assert err.value.field == "dtype"


# ---------------------------------------------------------------------------- shipped full-size configs

PUBLISHED_PARAMETERS = {  # from the official diffusers repos
    "sd15": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sd2": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840},
    "sd2-base": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840},
    "sdxl-base": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
                  "text_encoder_2": 694_659_840},
    "sdxl-refiner": {"unet": 2_259_526_660, "vae": 83_653_863, "text_encoder_2": 694_659_840},
}
DIFFUSERS_MODEL_TYPE = {"sd15": "v1", "sd2": "v2", "sd2-base": "v2", "sdxl-base": "xl_base",
                        "sdxl-refiner": "xl_refiner"}


def _meta_components(family):
    """Every model of a shipped config, instantiated without memory."""
    import diffusers
    import transformers

    folder = CONFIG_ROOT / family
    index = json.loads((folder / "model_index.json").read_text())
    models = {}
    with torch.device("meta"):
        for name, entry in index.items():
            skipped = ("_", "tokenizer", "feature_extractor", "scheduler", "safety_checker")
            if name.startswith(skipped) or not isinstance(entry, list) or entry[0] is None:
                continue
            library, class_name = entry
            cls = getattr(diffusers if library == "diffusers" else transformers, class_name)
            if library == "diffusers":
                models[name] = cls.from_config(cls.load_config(folder / name))
            else:
                models[name] = cls(transformers.CLIPTextConfig.from_pretrained(folder / name))
    return models


@pytest.fixture(scope="module")
def full_size():
    return {family: _meta_components(family) for family in PUBLISHED_PARAMETERS}


@pytest.mark.parametrize("family", PUBLISHED_PARAMETERS)
def test_shipped_configs_match_published_sizes(family, full_size):
    counts = {name: sum(p.numel() for p in model.parameters()) for name, model in full_size[family].items()}
    assert counts == PUBLISHED_PARAMETERS[family]


@pytest.mark.parametrize("family", PUBLISHED_PARAMETERS)
def test_full_size_export_layout_is_what_diffusers_and_detection_expect(family, full_size):
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    skeleton = original_state_dict(SimpleNamespace(**full_size[family]))
    if family == "sd2-base":
        skeleton["global_step"] = 875000
    assert detect_family(skeleton) == family
    assert infer_diffusers_model_type(skeleton) == DIFFUSERS_MODEL_TYPE[family]


@pytest.mark.parametrize("family", ["sd15", "sd2", "sdxl-base", "sdxl-refiner"])
def test_full_size_export_converts_back_through_diffusers(family, full_size):
    """diffusers' own original->diffusers converters must give back every key at its shape."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    models = full_size[family]
    skeleton = original_state_dict(SimpleNamespace(**models))
    converted = {
        "unet": convert_ldm_unet_checkpoint(skeleton, dict(models["unet"].config)),
        "vae": convert_ldm_vae_checkpoint(skeleton, dict(models["vae"].config)),
    }
    open_clip_prefix = {"sd2": "cond_stage_model.model.", "sdxl-base": "conditioner.embedders.1.model.",
                        "sdxl-refiner": "conditioner.embedders.0.model."}.get(family)
    openclip_name = "text_encoder" if family == "sd2" else "text_encoder_2"
    if open_clip_prefix:
        converted[openclip_name] = convert_open_clip_checkpoint(models[openclip_name], skeleton,
                                                                open_clip_prefix)
    if family in ("sd15", "sdxl-base"):
        converted["text_encoder"] = convert_ldm_clip_checkpoint(skeleton)
    for name, state in converted.items():
        model = models[name]
        if not hasattr(model, "text_model") and name.startswith("text_encoder"):
            state = {k.removeprefix("text_model."): v for k, v in state.items()}
        want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in state.items()} == want, name
