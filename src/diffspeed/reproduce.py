"""Back from an image to the request that made it: diffspeed's infotext -> ``GenerateRequest`` + recipe.

``generate`` records everything that changes the pixels (see ``diffspeed.generate._infotext``): the web UI's
entries (prompt, negative prompt, Steps, Sampler, CFG scale, Seed, Size, hires / img2img / ControlNet / refiner
settings), ``Batch size`` / ``Batch pos`` for a batch, ``Lora weights``, ``Diffspeed recipe`` (the recipe's
optimization tables as JSON), ``Device`` and ``Dtype``. :func:`request_from_parameters` turns that back into
a request that, on the same model, device and dtype with the same LoRAs and recipe, gives the same image.
Images are not in the text: an img2img, inpaint or ControlNet image needs its input images passed in again.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from PIL import Image

from diffspeed.errors import DiffspeedError
from diffspeed.generate import MAX_SEED, GenerateRequest
from diffspeed.pngmeta import parse_parameters, read_text

_CONTROLNET = re.compile(r"Model: (?P<model>.+?)(?: \[\w*\])?, Weight: (?P<weight>[^,]+),.*"
                         r"Guidance Start: (?P<start>[^,]+), Guidance End: (?P<end>[^,]+)$")


def request_from_parameters(source, *, init_image=None, mask_image=None,
                            control_image=None) -> tuple[GenerateRequest, dict | None, dict]:
    """``source``: a parameters text, a PNG path or an open PIL image written by diffspeed.

    Returns ``(request, recipe, extras)``: the request (a batch image gives the whole batch's request; its index
    is ``extras["batch_pos"]``); the recipe as a dict for :meth:`diffspeed.Recipe.from_dict`, or None without
    one; and what the request cannot hold -- ``model``, ``model_hash``, ``preset``, ``device``, ``dtype``,
    ``loras`` (a list of ``{"name", "weight", "hash", "source"}`` to load with ``load_lora``), ``batch_pos``,
    ``version``.
    """
    p = parse_parameters(_text_of(source))
    if "Steps" not in p or "Seed" not in p:
        raise DiffspeedError("parameters: no 'Steps' and 'Seed' entries; not a generation's parameters text",
                             field="parameters")
    pos = _num(p, "Batch pos", int, 0)
    fields = dict(prompt=p["prompt"], negative_prompt=p["negative_prompt"], steps=_num(p, "Steps", int),
                  sampler=p.get("Sampler"), cfg_scale=_num(p, "CFG scale", float),
                  seed=(_num(p, "Seed", int) - pos) % (MAX_SEED + 1), batch_size=_num(p, "Batch size", int, 1))
    fields.update(_size(p))
    fields.update(_workflow(p, init_image, mask_image))
    fields.update(_controlnet(p, control_image))
    fields.update(_refiner(p))
    recipe = {"optimization": json.loads(p["Diffspeed recipe"])} if "Diffspeed recipe" in p else None
    model_hash = p.get("Model hash")
    extras = {"model": p.get("Model"), "model_hash": model_hash, "preset": p.get("Diffspeed preset"),
              "device": p.get("Device"), "dtype": p.get("Dtype"), "loras": _loras(p), "batch_pos": pos,
              "version": p.get("Version")}
    return GenerateRequest(**fields), recipe, extras


def _text_of(source) -> str:
    if isinstance(source, Image.Image):
        return read_text(source)
    if isinstance(source, Path) or (isinstance(source, str) and "\n" not in source and _is_file(source)):
        try:
            return read_text(source)
        except (OSError, ValueError) as err:
            raise DiffspeedError(f"parameters: cannot read {source}: {err}", field="parameters") from err
    if isinstance(source, str):
        return source
    raise DiffspeedError(f"parameters must be a text, a PNG path or a PIL image; got {type(source).__name__}",
                         field="parameters")


def _is_file(text: str) -> bool:
    try:
        return Path(text).is_file()
    except (OSError, ValueError):  # a name too long for the file system, or a NUL byte: text, not a path
        return False


def _num(p: dict, key: str, kind: type, default=None):
    if key not in p:
        return default
    try:
        return kind(p[key])
    except ValueError:
        raise DiffspeedError(f"parameters: {key} must be a{'n integer' if kind is int else ' number'}, got "
                             f"{p[key]!r}", field=key) from None


def _size(p: dict) -> dict:
    """Width and height of the first pass. ``Size`` is the final size; a hires image's first pass is the size
    that ``round(size * scale / 8) * 8`` maps onto it, unique for scale >= 1 (the map is then increasing)."""
    if "Size" not in p:
        return {}
    m = re.fullmatch(r"(\d+)x(\d+)", p["Size"])
    if m is None:
        raise DiffspeedError(f"parameters: Size must be WIDTHxHEIGHT, got {p['Size']!r}", field="Size")
    size = [int(m.group(1)), int(m.group(2))]
    scale = _num(p, "Hires upscale", float)
    if scale is not None:
        size = [_first_pass(v, scale) for v in size]
    return {"width": size[0], "height": size[1]}


def _first_pass(big: int, scale: float) -> int:
    k = round(big / 8 / scale)
    for c in (k, k - 1, k + 1):
        if round(c * scale) * 8 == big:
            return c * 8
    raise DiffspeedError(f"parameters: no first-pass size makes {big} at Hires upscale {scale}", field="Size")


def _workflow(p: dict, init_image, mask_image) -> dict:
    """Hires fix, img2img and inpaint settings; the input images come from the caller."""
    out = {}
    if "Hires upscale" in p:
        out.update(hires_scale=_num(p, "Hires upscale", float), hires_upscaler=p.get("Hires upscaler", "Latent"),
                   hires_steps=_num(p, "Hires steps", int, 0))
    if "Denoising strength" in p:
        out["denoising_strength"] = _num(p, "Denoising strength", float)
        if "Hires upscale" not in p:
            if init_image is None:
                raise DiffspeedError("parameters: this image was made by img2img or inpaint; pass its init_image",
                                     field="init_image")
            out["init_image"] = init_image
    if "Mask blur" in p:
        if mask_image is None:
            raise DiffspeedError("parameters: this image was made by inpaint; pass its mask_image",
                                 field="mask_image")
        out.update(mask_image=mask_image, mask_blur=_num(p, "Mask blur", int),
                   inpaint_overlay=p.get("Inpaint overlay", "True") != "False")
    return out


def _controlnet(p: dict, control_image) -> dict:
    if "ControlNet 0" not in p:
        return {}
    m = _CONTROLNET.search(p["ControlNet 0"])
    if m is None:
        raise DiffspeedError(f"parameters: cannot read ControlNet 0 {p['ControlNet 0']!r}", field="ControlNet 0")
    if control_image is None:
        raise DiffspeedError(f"parameters: this image was made with ControlNet {m['model']}; pass its "
                             f"control_image", field="control_image")
    try:
        return dict(controlnet=m["model"], control_image=control_image, control_scale=float(m["weight"]),
                    control_start=float(m["start"]), control_end=float(m["end"]))
    except ValueError:
        raise DiffspeedError(f"parameters: bad number in ControlNet 0 {p['ControlNet 0']!r}",
                             field="ControlNet 0") from None


def _refiner(p: dict) -> dict:
    """A refiner that ran; one asked for with switch-at 1 never ran, so the image is the base's alone."""
    if "Refiner" not in p:
        return {}
    name = re.sub(r" \[\w*\]$", "", p["Refiner"])
    return {"refiner": name, "refiner_switch_at": _num(p, "Refiner switch at", float, 0.8),
            "refiner_mode": p.get("Refiner mode", "ensemble")}


def _loras(p: dict) -> list[dict]:
    """``Lora weights: "a: 0.8, b: 1.0"`` with the hashes of ``Lora hashes: "a: 0123abcd, ..."``; ``source``
    is the shipped LoRA with that hash (loadable by name), else None: the caller knows its own files."""
    hashes = dict(_pairs(p.get("Lora hashes", "")))
    out = []
    for name, weight in _pairs(p.get("Lora weights", "")):
        try:
            value = float(weight)
        except ValueError:
            raise DiffspeedError(f"parameters: Lora weights: {weight!r} is not a number", field="Lora weights") \
                from None
        out.append({"name": name, "weight": value, "hash": hashes.get(name), "source": _shipped(hashes.get(name))})
    return out


def _shipped(digest: str | None) -> str | None:
    from diffspeed.pipelines.lora import SHIPPED_LORAS, lora_hash, resolve_lora_path

    for name in SHIPPED_LORAS if digest else ():
        try:
            if lora_hash(resolve_lora_path(name)) == digest:
                return name
        except DiffspeedError:  # not in this install
            continue
    return None


def _pairs(text: str) -> list[tuple[str, str]]:
    return [tuple(s.strip() for s in item.rpartition(": ")[::2]) for item in text.split(", ") if item.strip()]
