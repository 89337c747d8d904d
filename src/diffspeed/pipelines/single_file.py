"""Single-file checkpoints in the original Stable Diffusion layout (what the AUTOMATIC1111 web UI reads).

Export: diffusers ships importers for this layout (``from_single_file``) but no exporter, so the mapping
diffusers -> original lives here. It is derived from the *modules* of the pipeline (how many resnets,
attentions and resamplers each block really has), not from config strings, so tiny test models and
full-size models go through the same code.

Import: always offline. ``from_single_file`` gets a local diffusers-format config folder (either the
caller's, or the full-size configs shipped under ``diffspeed/configs/<family>``) and tokenizers built
from the shared CLIP BPE files, so nothing is fetched from the hub.

Families: ``sd15``, ``sd2`` (768 px, v-prediction), ``sd2-base`` (512 px, epsilon), ``sdxl-base``,
``sdxl-refiner``.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import pickletools
import re
import tempfile
import warnings
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from itertools import chain
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from diffspeed._io import write_beside
from diffspeed.errors import DiffspeedError, DiffspeedRuntimeError
from diffspeed.pipelines.load import parse_dtype

CONFIG_ROOT = Path(__file__).resolve().parents[1] / "configs"
TOKENIZER_DIR = CONFIG_ROOT / "clip-tokenizer"
FAMILIES = ("sd15", "sd2", "sd2-base", "sdxl-base", "sdxl-refiner")
PICKLE_SUFFIXES = frozenset({".ckpt", ".pt", ".pth", ".bin"})
PICKLE_REFUSED = ("pickle checkpoints can run code when loaded; convert to .safetensors "
                  "or pass allow_pickle=True")

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# Stability's SD 2.0/2.1 *base* checkpoints were saved at this step; diffusers uses it to pick epsilon
# over v-prediction, and so do we (nothing in the weights tells the two objectives apart).
SD2_BASE_GLOBAL_STEP = 875000

# Where each text encoder goes, per family: (pipeline attribute, original prefix, layout). "hf" keeps
# the transformers names under ``...transformer.text_model.``; "openclip" is OpenCLIP's own layout.
_TEXT_SLOTS = {
    "sd15": (("text_encoder", "cond_stage_model.transformer.", "hf"),),
    "sd2": (("text_encoder", "cond_stage_model.model.", "openclip"),),
    "sdxl-base": (("text_encoder", "conditioner.embedders.0.transformer.", "hf"),
                  ("text_encoder_2", "conditioner.embedders.1.model.", "openclip")),
    "sdxl-refiner": (("text_encoder_2", "conditioner.embedders.0.model.", "openclip"),),
}
_TEXT_SLOTS["sd2-base"] = _TEXT_SLOTS["sd2"]

# Renames inside one module: diffusers sub-module path -> original sub-module path.
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0",
                "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_SAME: dict[str, str] = {}

_OPENCLIP_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc",
                   "mlp.fc2": "mlp.c_proj", "self_attn.out_proj": "attn.out_proj"}
_HF_LAYER_KEY = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")
# Extra copies of to_q/to_k/to_v that ``fuse_qkv_projections()`` adds beside the originals.
_FUSED_PROJECTIONS = (".to_qkv.", ".to_kv.")

# Trainers wrap the weights in ``state_dict`` once or twice; a file nesting them deeper is no checkpoint.
MAX_WRAPPING = 8
# The globals torch's weights-only unpickler names when it refuses a file ("GLOBAL posix.system").
_BLOCKED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
# Reading a refused pickle's opcodes to name what it would call: the pickle part of a checkpoint is small
# (tensor data sits beside it in the zip, or after it), so a bounded prefix and op count are enough.
_SCAN_BYTES = 64 << 20
_SCAN_OPS = 1_000_000
_STRING_OPS = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING",
                         "SHORT_BINSTRING"})
_OPCODE_NAMES = {op.code: op.name for op in pickletools.opcodes}
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # torch's refusal bolds its "only if you trust the source" advice


# --------------------------------------------------------------------------------------------- export


def export_single_file(pipe, path: str | Path, *, dtype=None, overwrite: bool = False) -> Path:
    """Write ``pipe`` (SD 1.x/2.x, SDXL base or refiner) as one original-layout ``.safetensors`` file.

    ``dtype`` casts the floating-point weights (e.g. ``torch.float16`` halves the file). An existing
    file is kept unless ``overwrite=True``; the file is written beside the target and renamed into
    place, so a crash never leaves a truncated checkpoint under the real name.
    """
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise DiffspeedError(f"path must end in .safetensors, got {path.name!r}", field="path")
    if path.exists() and not overwrite:
        raise DiffspeedError(f"{path} already exists; pass overwrite=True to replace it", field="path")
    tensors = original_state_dict(pipe, dtype=dtype)
    if any(t.is_meta for t in tensors.values()):
        raise DiffspeedError("the pipeline has weights on the meta device (never loaded); nothing to export")
    tensors = _untied({k: t.detach().to("cpu").contiguous() for k, t in tensors.items()})
    write_beside(path, lambda partial: save_tensors(tensors, partial, {"format": "pt"}), field="path")
    return path


def save_tensors(tensors: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """``safetensors.torch.save_file``, whose I/O failures (a ``SafetensorError`` carrying "os error 30")
    are raised as the ``OSError`` they are, so callers can say "read-only file system"."""
    try:
        save_file(dict(tensors), str(path), metadata=metadata)
    except Exception as err:  # SafetensorError is not an OSError subclass
        code = re.search(r"\(os error (\d+)\)", str(err))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from err


def original_state_dict(pipe, *, dtype=None) -> dict[str, torch.Tensor]:
    """The pipeline's weights under original-layout names (no copies except where tensors are rebuilt).

    Works on meta-device models too, which is how full-size key/shape skeletons are made cheaply.
    """
    family = pipeline_family(pipe)
    out: dict[str, torch.Tensor] = {}
    _merge(out, UNET_PREFIX, _unet_to_original(_unwrap(pipe.unet)))
    _merge(out, VAE_PREFIX, _vae_to_original(_unwrap(pipe.vae)))
    for attr, prefix, layout in _TEXT_SLOTS[family]:
        encoder = _unwrap(getattr(pipe, attr))
        _merge(out, prefix, _hf_clip_state(encoder) if layout == "hf" else _openclip_to_original(encoder))
    dtype = parse_dtype(dtype)
    if dtype is not None:
        out = {k: t.to(dtype) if t.is_floating_point() else t for k, t in out.items()}
    return out


def pipeline_family(pipe) -> str:
    """Which original layout a pipeline exports to, from the text encoders it carries.

    SD 2.x is told from SD 1.x by its OpenCLIP text encoder (``gelu``; OpenAI CLIP uses ``quick_gelu``),
    which is exactly the difference between the two original text-encoder layouts.
    """
    text_encoder = getattr(pipe, "text_encoder", None)
    if getattr(pipe, "text_encoder_2", None) is not None:
        return "sdxl-base" if text_encoder is not None else "sdxl-refiner"
    if text_encoder is None or getattr(pipe, "unet", None) is None or getattr(pipe, "vae", None) is None:
        raise DiffspeedError("can only export Stable Diffusion / SDXL pipelines with unet, vae and text "
                             f"encoder(s); got {type(pipe).__name__}", field="pipe")
    return "sd2" if text_encoder.config.hidden_act == "gelu" else "sd15"


def _unwrap(module):
    """The model inside a ``torch.compile`` wrapper, whose names would all start with ``_orig_mod.``."""
    return getattr(module, "_orig_mod", module)


def _own_state(module, what: str) -> dict[str, torch.Tensor]:
    """A component's weights minus fused-projection duplicates. Unfused LoRA adapters are refused: the
    original layout has no place for them, and dropping them would silently export the base model."""
    state = module.state_dict()
    if any(".lora_" in key or ".base_layer." in key for key in state):
        raise DiffspeedError(f"the {what} carries unfused LoRA adapters; call pipe.fuse_lora() and "
                             "pipe.unload_lora_weights() before exporting", field="pipe")
    return {key: tensor for key, tensor in state.items() if not any(f in key for f in _FUSED_PROJECTIONS)}


def _merge(out: dict, prefix: str, tensors: Mapping[str, torch.Tensor]) -> None:
    for key, tensor in tensors.items():
        out[prefix + key] = tensor


def _rename(state: Mapping[str, torch.Tensor], modules: Iterable[tuple], what: str) -> dict:
    """Map every key through a module table; an unmapped key is an error, never silently dropped."""
    table = {src: (dst, renames) for src, dst, renames in modules}
    out = {}
    for key, tensor in state.items():
        new_key = _lookup(table, key)
        if new_key is None:
            raise DiffspeedError(f"cannot export the {what}: {key!r} has no place in the original layout")
        if new_key in out:
            raise DiffspeedError(f"cannot export the {what}: two weights map to {new_key!r}")
        out[new_key] = tensor
    return out


def _lookup(table: Mapping[str, tuple], key: str) -> str | None:
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        entry = table.get(".".join(parts[:cut]))
        if entry is not None:
            dst, renames = entry
            inner_module, param = ".".join(parts[cut:-1]), parts[-1]
            inner_module = renames.get(inner_module, inner_module)
            return ".".join(p for p in (dst, inner_module, param) if p)
    return None


def _unet_to_original(unet) -> dict:
    return _rename(_own_state(unet, "UNet"), _unet_modules(unet), "UNet")


def _unet_modules(unet) -> Iterator[tuple[str, str, dict]]:
    """(diffusers module, original module, inner renames) in the original ``input/middle/output_blocks``
    numbering: one index per resnet (its attention sits beside it at ``.1``) and one per resampler."""
    yield "conv_in", "input_blocks.0.0", _SAME
    yield "time_embedding.linear_1", "time_embed.0", _SAME
    yield "time_embedding.linear_2", "time_embed.2", _SAME
    for name in ("class_embedding", "add_embedding"):  # both are ``label_emb`` originally
        yield f"{name}.linear_1", "label_emb.0.0", _SAME
        yield f"{name}.linear_2", "label_emb.0.2", _SAME
    index = 1
    for b, block in enumerate(unet.down_blocks):
        for j in range(len(block.resnets)):
            yield f"down_blocks.{b}.resnets.{j}", f"input_blocks.{index}.0", _UNET_RESNET
            yield f"down_blocks.{b}.attentions.{j}", f"input_blocks.{index}.1", _SAME
            index += 1
        if block.downsamplers:
            yield f"down_blocks.{b}.downsamplers.0.conv", f"input_blocks.{index}.0.op", _SAME
            index += 1
    yield "mid_block.resnets.0", "middle_block.0", _UNET_RESNET
    yield "mid_block.attentions.0", "middle_block.1", _SAME
    yield "mid_block.resnets.1", "middle_block.2", _UNET_RESNET
    index = 0
    for b, block in enumerate(unet.up_blocks):
        for j in range(len(block.resnets)):
            yield f"up_blocks.{b}.resnets.{j}", f"output_blocks.{index}.0", _UNET_RESNET
            yield f"up_blocks.{b}.attentions.{j}", f"output_blocks.{index}.1", _SAME
            index += 1
        if block.upsamplers:  # after the block's last resnet (and its attention, if any)
            slot = 2 if getattr(block, "attentions", None) else 1
            yield f"up_blocks.{b}.upsamplers.0.conv", f"output_blocks.{index - 1}.{slot}.conv", _SAME
    yield "conv_norm_out", "out.0", _SAME
    yield "conv_out", "out.2", _SAME


def _vae_to_original(vae) -> dict:
    """The original VAE attention uses 1x1 convolutions where diffusers uses linear layers: the web UI
    loads strictly by shape, so those weights get their two trailing unit dimensions back."""
    out = _rename(_own_state(vae, "VAE"), _vae_modules(vae), "VAE")
    for key, tensor in out.items():
        if ".mid.attn_1." in key and key.endswith(".weight") and tensor.ndim == 2:
            out[key] = tensor[:, :, None, None]
    return out


def _vae_modules(vae) -> Iterator[tuple[str, str, dict]]:
    for side in ("encoder", "decoder"):
        yield f"{side}.conv_in", f"{side}.conv_in", _SAME
        yield f"{side}.conv_norm_out", f"{side}.norm_out", _SAME
        yield f"{side}.conv_out", f"{side}.conv_out", _SAME
        yield f"{side}.mid_block.resnets.0", f"{side}.mid.block_1", _VAE_RESNET
        yield f"{side}.mid_block.attentions.0", f"{side}.mid.attn_1", _VAE_ATTENTION
        yield f"{side}.mid_block.resnets.1", f"{side}.mid.block_2", _VAE_RESNET
    for b, block in enumerate(vae.encoder.down_blocks):
        for j in range(len(block.resnets)):
            yield f"encoder.down_blocks.{b}.resnets.{j}", f"encoder.down.{b}.block.{j}", _VAE_RESNET
        yield f"encoder.down_blocks.{b}.downsamplers.0.conv", f"encoder.down.{b}.downsample.conv", _SAME
    levels = len(vae.decoder.up_blocks)
    for b, block in enumerate(vae.decoder.up_blocks):  # the original decoder numbers levels bottom-up
        level = levels - 1 - b
        for j in range(len(block.resnets)):
            yield f"decoder.up_blocks.{b}.resnets.{j}", f"decoder.up.{level}.block.{j}", _VAE_RESNET
        yield f"decoder.up_blocks.{b}.upsamplers.0.conv", f"decoder.up.{level}.upsample.conv", _SAME
    yield "quant_conv", "quant_conv", _SAME
    yield "post_quant_conv", "post_quant_conv", _SAME


def _hf_clip_state(encoder) -> dict[str, torch.Tensor]:
    """Transformers-named CLIP weights, always with the ``text_model.`` prefix.

    Since transformers 5.6 ``CLIPTextModel`` is flattened (no ``text_model`` child, names start at
    ``embeddings.``) while ``CLIPTextModelWithProjection`` still nests; the original layout wants the
    nested names either way.
    """
    state = _own_state(encoder, "text encoder")
    if hasattr(encoder, "text_model"):
        return state
    return {f"text_model.{key}": tensor for key, tensor in state.items()}


def _openclip_to_original(encoder) -> dict[str, torch.Tensor]:
    """OpenCLIP names: fused q/k/v ``in_proj``, ``c_fc``/``c_proj`` MLP, and a ``text_projection`` matrix
    applied as ``x @ P`` (the transpose of the linear layer's weight)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in _hf_clip_state(encoder).items():
        if key in _OPENCLIP_TOP:
            out[_OPENCLIP_TOP[key]] = tensor
        elif key == "text_projection.weight":
            out["text_projection"] = tensor.T.contiguous()
        elif key.endswith("position_ids"):  # a buffer older transformers saved; OpenCLIP has none
            continue
        elif (match := _HF_LAYER_KEY.fullmatch(key)) is None:
            raise _no_openclip_place(key)
        else:
            layer, module, param = match.groups()
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((layer, param), {})[module[len("self_attn.")]] = tensor
            elif module in _OPENCLIP_LAYER:
                out[f"transformer.resblocks.{layer}.{_OPENCLIP_LAYER[module]}.{param}"] = tensor
            else:
                raise _no_openclip_place(key)
    for (layer, param), parts in qkv.items():
        out[f"transformer.resblocks.{layer}.attn.in_proj_{param}"] = torch.cat([parts[c] for c in "qkv"])
    return out


def _no_openclip_place(key: str) -> DiffspeedError:
    return DiffspeedError(f"cannot export the text encoder: {key!r} has no place in the OpenCLIP layout")


def _untied(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share storage; give every repeat its own copy."""
    seen: set[int] = set()
    out = {}
    for key, tensor in tensors.items():
        pointer = tensor.untyped_storage().data_ptr()
        out[key] = tensor.clone() if pointer in seen and tensor.numel() else tensor
        seen.add(pointer)
    return out


# --------------------------------------------------------------------------------------------- import


def load_single_file(path: str | Path, *, dtype=None, config_dir: str | Path | None = None,
                     allow_pickle: bool = False):
    """Build a diffusers pipeline from an original-layout single-file checkpoint, fully offline.

    ``config_dir`` is a diffusers-format folder (``model_index.json`` plus per-component configs) that
    describes the checkpoint's architecture; without it the family is detected from the weights and
    the shipped full-size configs are used. ``dtype=None`` means float32 for every component: left to
    itself, transformers would build the SDXL text encoders in the float16 their configs name while
    diffusers builds the UNet and VAE in float32.
    Pickle checkpoints are refused unless ``allow_pickle=True``, and then read with ``weights_only``.
    """
    path = Path(path)
    if not path.is_file():
        raise DiffspeedError(f"checkpoint not found: {path}", field="path")
    torch_dtype = parse_dtype(dtype) or torch.float32
    if not _is_pickle(path):
        family = detect_family(_read_skeleton(path))
        return _build_pipeline(path, family, config_dir, torch_dtype)
    if not allow_pickle:
        raise DiffspeedError(f"{PICKLE_REFUSED} ({path.name})", field="allow_pickle")
    state, global_step = _read_pickle(path)
    family = detect_family(state if global_step is None else {**state, "global_step": global_step})
    # from_single_file wants a file: hand it the same tensors as safetensors, which it reads without
    # unpickling anything a second time.
    tensors = _untied({key: tensor.contiguous() for key, tensor in state.items()})
    del state
    try:
        scratch = tempfile.TemporaryDirectory(prefix="diffspeed-")
        with scratch as tmp:
            converted = Path(tmp) / f"{path.stem}.safetensors"
            save_tensors(tensors, converted, {"format": "pt"})
            del tensors
            return _build_pipeline(converted, family, config_dir, torch_dtype, shown_as=path.name)
    except OSError as err:  # a full or read-only temp folder: say so, not a traceback
        raise DiffspeedRuntimeError(f"path: cannot stage {path.name} as safetensors in the temp folder: "
                                    f"{err.strerror or err} ({err.filename or tempfile.gettempdir()})",
                                    field="path") from err


def detect_family(state_dict: Mapping) -> str:
    """Name the family of an original-layout state dict from its key names and a few shapes.

    Works on shape-only skeletons (meta tensors). The text-encoder layout decides, because it is what
    differs between the families whatever their size; SD 2 also shows in its 1024-wide cross-attention.
    A ``global_step`` entry of 875000 marks the SD 2 base (epsilon) checkpoints, as diffusers assumes.
    """
    keys = list(state_dict.keys())
    for prefix, what in ((UNET_PREFIX, "UNet"), (VAE_PREFIX, "VAE")):
        if not _has_prefix(keys, prefix):
            raise DiffspeedError(f"not a Stable Diffusion checkpoint in the original layout: no {what} "
                                 f"weights ({prefix}*); expected SD 1.x, SD 2.x or SDXL keys", field="path")
    conv_in = state_dict.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is not None and conv_in.shape[1] != 4:
        raise DiffspeedError(f"unsupported checkpoint: its UNet takes {conv_in.shape[1]} input channels "
                             "(inpainting, instruct-pix2pix or upscaler); only 4-channel text-to-image "
                             "models are supported", field="path")
    if _has_prefix(keys, "conditioner.embedders.1.model."):
        return "sdxl-base"
    if _has_prefix(keys, "conditioner.embedders.0.model."):
        return "sdxl-refiner"
    cross_attention = state_dict.get(UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    if _has_prefix(keys, "cond_stage_model.model.") or (
            _has_prefix(keys, "cond_stage_model.transformer.") and cross_attention is not None
            and cross_attention.shape[-1] == 1024):
        return "sd2-base" if _global_step(state_dict) == SD2_BASE_GLOBAL_STEP else "sd2"
    if _has_prefix(keys, "cond_stage_model.transformer."):
        return "sd15"
    raise DiffspeedError("no text-encoder weights of a known layout: expected cond_stage_model.transformer.* "
                         "(SD 1.x), cond_stage_model.model.* (SD 2.x), conditioner.embedders.1.model.* "
                         "(SDXL base) or conditioner.embedders.0.model.* (SDXL refiner)", field="path")


def clip_tokenizer(*, pad_token: str | None = None):
    """The CLIP BPE tokenizer from the shared folder; OpenCLIP encoders (SD 2, SDXL's second) pad with "!"."""
    from transformers import CLIPTokenizer

    kwargs = {} if pad_token is None else {"pad_token": pad_token}
    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), local_files_only=True, **kwargs)


def _build_pipeline(checkpoint: Path, family: str, config_dir, torch_dtype, *, shown_as: str = ""):
    shown_as = shown_as or checkpoint.name
    config = Path(config_dir) if config_dir is not None else CONFIG_ROOT / family
    if not (config / "model_index.json").is_file():
        raise DiffspeedError(f"config_dir {config} is not a diffusers pipeline folder (no model_index.json)",
                             field="config_dir")
    pipeline_class, components = _pipeline_parts(family)
    try:
        if family == "sdxl-base":
            components.update(_sdxl_text_encoders(checkpoint, config, torch_dtype))
        pipe = pipeline_class.from_single_file(str(checkpoint), config=str(config), local_files_only=True,
                                               dtype=torch_dtype, **components)
    except DiffspeedError:
        raise
    except Exception as err:  # diffusers reports mismatches with many exception types; all mean "won't fit"
        raise DiffspeedError(f"cannot load {shown_as} as {family} with the configs in {config}: "
                             f"{_first_line(err)}", field="config_dir") from err
    _check_loaded(pipe, shown_as)
    return pipe


def _sdxl_text_encoders(checkpoint: Path, config: Path, torch_dtype) -> dict:
    """Both SDXL text encoders, each converted from its own prefix.

    diffusers tells the two apart by width (768 vs 1280); when they are equally wide, as in tiny-sdxl, it
    converts the first encoder's weights into the second. Only the text-encoder tensors are read here.
    """
    from accelerate import init_empty_weights
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
    from safetensors import safe_open
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with safe_open(str(checkpoint), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys() if k.startswith("conditioner.embedders.")}
    out = {}
    for name, cls, convert in (
            ("text_encoder", CLIPTextModel,
             lambda m: convert_ldm_clip_checkpoint(state, "conditioner.embedders.0.transformer.")),
            ("text_encoder_2", CLIPTextModelWithProjection,
             lambda m: convert_open_clip_checkpoint(m, state, prefix="conditioner.embedders.1.model."))):
        with init_empty_weights(include_buffers=False):
            model = cls(CLIPTextConfig.from_pretrained(str(config / name), local_files_only=True))
        tensors = convert(model)
        if not hasattr(model, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
            tensors = {k.removeprefix("text_model."): v for k, v in tensors.items()}
        result = model.load_state_dict(tensors, strict=False, assign=True)
        if result.missing_keys or result.unexpected_keys:
            raise DiffspeedError(f"{checkpoint.name}: {name} does not fit {config / name}: missing "
                                 f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}",
                                 field="config_dir")
        out[name] = model.to(torch_dtype).eval()
    return out


def _pipeline_parts(family: str):
    """The pipeline class and the components passed in ready-made (tokenizers, no safety checker)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    if family in ("sd15", "sd2", "sd2-base"):
        tokenizer = clip_tokenizer(pad_token="!" if family != "sd15" else None)
        return StableDiffusionPipeline, {"tokenizer": tokenizer, "safety_checker": None,
                                         "feature_extractor": None, "requires_safety_checker": False}
    if family == "sdxl-base":
        return StableDiffusionXLPipeline, {"tokenizer": clip_tokenizer(),
                                           "tokenizer_2": clip_tokenizer(pad_token="!")}
    return StableDiffusionXLImg2ImgPipeline, {"tokenizer": None, "text_encoder": None,
                                              "tokenizer_2": clip_tokenizer(pad_token="!")}


def _check_loaded(pipe, shown_as: str) -> None:
    """diffusers leaves weights absent from the file on the meta device without complaint; catch that."""
    for name, component in pipe.components.items():
        if not isinstance(component, torch.nn.Module):
            continue
        missing = [n for n, t in chain(component.named_parameters(), component.named_buffers()) if t.is_meta]
        if missing:
            raise DiffspeedError(f"{shown_as} lacks {len(missing)} {name} weights "
                                 f"(e.g. {', '.join(missing[:3])})", field="path")


def _is_pickle(path: Path) -> bool:
    """By suffix, or by the zip signature of ``torch.save`` files, so a renamed pickle is still caught."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return True
    with path.open("rb") as handle:
        return handle.read(4) == b"PK\x03\x04"


def _read_skeleton(path: Path) -> dict[str, torch.Tensor]:
    """Key -> meta tensor of the stored shape: enough to detect the family without reading weights."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            names = handle.keys()
            skeleton = {key: torch.empty(handle.get_slice(key).get_shape(), device="meta") for key in names}
            if "global_step" in skeleton:
                skeleton["global_step"] = handle.get_tensor("global_step")
    except Exception as err:  # safetensors raises its own error types for every kind of bad file
        raise DiffspeedError(f"not a readable checkpoint: {_first_line(err)} ({path})", field="path") from err
    return skeleton


def _read_pickle(path: Path) -> tuple[dict[str, torch.Tensor], object]:
    """The innermost ``state_dict``'s named tensors, and the outermost ``global_step``."""
    levels = read_weights_pickle(path, f"checkpoint {path.name}", "path")
    weights = {k: v for k, v in levels[-1].items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    return weights, levels[0].get("global_step")


# -------------------------------------------------------------------------------- pickles, read safely


def read_weights_pickle(path: Path, label: str, field: str) -> list[Mapping]:
    """The pickle's top-level mapping and each mapping nested under ``state_dict``, outermost first.

    Read with ``torch.load(weights_only=True)``, which refuses any object that is not a tensor or plain data
    before building it, so nothing in the file runs. Every refusal is one line starting with ``label``.
    """
    try:
        with warnings.catch_warnings():  # "pickle protocol N" notes from the weights-only unpickler
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # refusals, corrupt archives, truncated files, hostile nesting
        raise DiffspeedError(f"{label} {pickle_refusal(path, err)}", field=field) from err
    if not isinstance(obj, Mapping):
        raise DiffspeedError(f"{label} is not a readable checkpoint: it holds a {type(obj).__name__}, not a "
                             "state dict", field=field)
    return state_dict_levels(obj, label, field)


def state_dict_levels(obj: Mapping, label: str, field: str) -> list[Mapping]:
    """``obj`` and each mapping under its ``state_dict`` key, outermost first, at most ``MAX_WRAPPING`` deep.

    The unpickler's memo lets a 1 KB file hold a dict that is its own ``state_dict``: an unbounded
    ``while "state_dict" in obj`` walk follows it forever, so a repeat is refused at once.
    """
    levels: list[Mapping] = []
    while isinstance(obj, Mapping):
        if any(level is obj for level in levels):
            raise DiffspeedError(f"{label} is not a plain weights file: its state_dict contains itself (a "
                                 "crafted or corrupt file), so it was refused", field=field)
        if len(levels) == MAX_WRAPPING:
            raise DiffspeedError(f"{label} is not a plain weights file: its weights are wrapped in state_dict "
                                 f"more than {MAX_WRAPPING} times, so it was refused", field=field)
        levels.append(obj)
        obj = obj.get("state_dict")
    return levels


def pickle_refusal(path: Path, err: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` failed on ``path``, as one clause to follow the file's name.

    A refusal names the global the file would have called: torch's message names it for protocol <= 3
    pickles; for protocol 4+ (whose framing the weights-only unpickler rejects first) it is found by reading
    the pickle's opcodes, which runs nothing. torch's page of advice ("re-run with weights_only=False") is
    never repeated: that advice is exactly how a malicious checkpoint gets to run.
    """
    text = _ANSI.sub("", str(err))
    names = _BLOCKED_GLOBAL.findall(text)[:1] or refused_globals(path)
    if names:
        return (f"is not a plain weights file: loading it would call {', '.join(names)}, so it was refused "
                "(nothing in it was run)")
    if text.startswith("Weights only load failed"):
        return (f"is not a plain weights file: weights-only loading refused it ({_weights_only_detail(text)}); "
                "nothing in it was run")
    detail = f"{type(err).__name__}: {_first_line(err)}"
    with contextlib.suppress(OSError), path.open("rb") as handle:
        if handle.read(1) not in (b"\x80", b"P"):  # neither a pickle's PROTO opcode nor a torch.save zip
            return f"is not a readable checkpoint: not a torch.save file or a pickle ({detail})"
    return f"is not a readable checkpoint: {detail}"


def _weights_only_detail(text: str) -> str:
    """The line of torch's refusal that says what it met, without the advice around it."""
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    else:
        text = text.split("\n", 1)[1] if "\n" in text else ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    lines = [line for line in lines if "weights_only" not in line and not line.startswith("Check the documentation")]
    if not lines:
        return "unknown reason"
    operand = re.fullmatch(r"Unsupported operand (\d+)", lines[0])
    if operand is not None:
        code = int(operand.group(1))
        name = _OPCODE_NAMES.get(chr(code)) if code < 256 else None
        return f"unsupported pickle opcode {name}" if name else f"byte {code:#04x} is no pickle opcode: not a pickle"
    return lines[0]


def refused_globals(path: Path, limit: int = 3) -> list[str]:
    """Up to ``limit`` globals (``module.name``) the file's pickle would import and call that torch's
    weights-only unpickler does not allow, found by reading opcodes only. Best effort: [] when unreadable."""
    try:
        from torch._weights_only_unpickler import _get_allowed_globals  # private, hence the fallback

        allowed = set(_get_allowed_globals()).__contains__
    except Exception:  # a torch without it: at least never blame the tensor-rebuilding functions
        allowed = re.compile(r"torch\.|collections\.OrderedDict$|_codecs\.encode$").match
    found: list[str] = []
    for name in _pickled_globals(_pickle_bytes(path)):
        if not allowed(name) and name not in found:
            found.append(name)
            if len(found) == limit:
                break
    return found


def _pickle_bytes(path: Path) -> bytes:
    """The pickle inside a ``torch.save`` zip (``*/data.pkl``), else the file's start; bounded in size."""
    try:
        with path.open("rb") as handle:
            if handle.read(4) != b"PK\x03\x04":
                handle.seek(0)
                return handle.read(_SCAN_BYTES)
            with zipfile.ZipFile(handle) as archive:
                names = [n for n in archive.namelist() if n.endswith("data.pkl")]
                if not names:
                    return b""
                with archive.open(names[0]) as member:
                    return member.read(_SCAN_BYTES)
    except (OSError, zipfile.BadZipFile, RuntimeError, ValueError):  # zipfile's errors for broken archives
        return b""


def _pickled_globals(data: bytes) -> Iterator[str]:
    """Every ``module.name`` a pickle stream imports (GLOBAL, INST, STACK_GLOBAL), in order, without running it.

    STACK_GLOBAL takes its two names from the stack, often through the memo, so the strings pushed and
    memoized are tracked; the stack itself is not modelled. Legacy ``torch.save`` files hold several pickles
    in a row (then raw tensor bytes, where the scan stops).
    """
    stream, ops = io.BytesIO(data), 0
    while stream.tell() < len(data) and ops < _SCAN_OPS:
        memo: dict[int, str | None] = {}
        top: list[str | None] = [None, None]  # the last two values pushed, if they were strings
        try:
            for op, arg, _ in pickletools.genops(stream):
                ops += 1
                if op.name in ("GLOBAL", "INST"):
                    yield str(arg).replace(" ", ".")
                elif op.name == "STACK_GLOBAL" and None not in top:
                    yield f"{top[0]}.{top[1]}"
                if op.name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
                    memo[len(memo) if op.name == "MEMOIZE" else arg] = top[1]
                elif op.name not in ("FRAME", "PROTO", "STOP"):
                    pushed = arg if op.name in _STRING_OPS else memo.get(arg) if op.name.endswith("GET") else None
                    top = [top[1], pushed]
                if ops >= _SCAN_OPS:
                    return
        except Exception:  # truncated or not a pickle (legacy files continue with raw bytes): done
            return


def _has_prefix(keys: Iterable[str], prefix: str) -> bool:
    return any(key.startswith(prefix) for key in keys)


def _global_step(state_dict: Mapping):
    step = state_dict.get("global_step")
    if isinstance(step, torch.Tensor):
        if step.is_meta or step.numel() != 1 or step.is_complex():
            return None
        value = step.item()
        return int(value) if math.isfinite(value) else None  # a NaN step is no step, not a traceback
    return step


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]
