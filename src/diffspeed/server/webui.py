"""The AUTOMATIC1111 web UI's HTTP API as data, and its mapping onto :class:`diffspeed.request.GenerateRequest`.

Pure data and pure functions: pydantic models with the web UI's field names and defaults (``/sdapi/v1/txt2img``,
``/sdapi/v1/img2img`` and the listing endpoints), :func:`plan_request` turning a web-UI request into the fields of
a ``GenerateRequest`` plus what the server needs beside it (model, preset or recipe, LoRAs, echo), and
:func:`info_json`, the web UI's ``info`` string. Nothing here loads a model or touches a file.

The field names and defaults were learned from the web UI's generated OpenAPI schema and from the MIT-licensed
``webuiapi`` client (0.9.17), which shows every key a real client sends; no web UI code is copied.

**Never a silent wrong image.** A web-UI field that diffspeed cannot honour is refused when it holds a value
that would change the picture, with the field and the reason; values that change nothing (the defaults, and
what webuiapi sends by default) pass. :func:`plan_request` collects every problem before raising
:class:`PlanError`.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from importlib.util import find_spec
from types import MappingProxyType
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from diffspeed.pipelines.samplers import SAMPLERS
from diffspeed.pipelines.workflows import HIRES_UPSCALERS
from diffspeed.request import RequestError

DEFAULT_SAMPLER = "Euler"  # the web UI API's sampler_index default


# ------------------------------------------------------------------------------------------------ requests
class _WebUIModel(BaseModel):
    """Unknown keys are ignored (as the web UI does); ``null`` for a field that has a value means its default."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)  # NaN/Infinity: 422, never echoed back

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data):
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or _nullable(cls, k)}
        return data


def _nullable(cls, name: str) -> bool:
    info = cls.model_fields.get(name)
    return info is None or not info.is_required() and info.default is None


def _f(default, description: str, **kw):
    return Field(default, description=description, **kw)


class _ProcessingRequest(_WebUIModel):
    """The fields txt2img and img2img share (the web UI's StableDiffusionProcessing)."""

    prompt: str = _f("", "what to draw; `<lora:name:weight>` tags load a LoRA (weight default 1)")
    negative_prompt: str = _f("", "what to steer away from")
    styles: list[str] | None = _f(None, "saved prompt styles: diffspeed has none, so this must be empty")
    seed: int = _f(-1, "-1: a random seed; image i of the request uses seed + i")
    subseed: int = _f(-1, "variation seed; only used with subseed_strength > 0 (not supported)")
    subseed_strength: float = _f(0.0, "variation strength: diffspeed has no variation seeds, so this must be 0")
    seed_resize_from_h: int = _f(-1, "resize the seed from this height: not supported (<= 0 or = height)")
    seed_resize_from_w: int = _f(-1, "resize the seed from this width: not supported (<= 0 or = width)")
    sampler_name: str | None = _f(None, "a sampler name from /sdapi/v1/samplers (e.g. 'DPM++ 2M', 'Euler a')")
    sampler_index: str = _f(DEFAULT_SAMPLER, "the older name of sampler_name, used when sampler_name is empty")
    scheduler: str | None = _f(None, "'Automatic' (the sampler's own) or 'Karras'; see /sdapi/v1/schedulers")
    batch_size: int = _f(1, "images per batch", ge=1)
    n_iter: int = _f(1, "batches; diffspeed runs batch_size * n_iter images in one call, seeds seed, seed + 1, ...",
                     ge=1)
    steps: int = _f(50, "sampling steps")
    cfg_scale: float = _f(7.0, "classifier-free guidance scale")
    width: int = _f(512, "image width in pixels, a multiple of 8")
    height: int = _f(512, "image height in pixels, a multiple of 8")
    restore_faces: bool | None = _f(None, "face restoration: not supported, must be false")
    tiling: bool | None = _f(None, "seamless tiling: not supported, must be false")
    do_not_save_samples: bool = _f(False, "set by the server from save_images")
    do_not_save_grid: bool = _f(False, "set by the server from save_images")
    eta: float | None = _f(None, "DDIM's noise (default 0) and TCD's gamma (0.3), honoured; ancestral/SDE "
                           "samplers run with 1 only")
    denoising_strength: float | None = _f(0.75, "how much to change the init image / the hires pass, 0..1")
    s_min_uncond: float | None = _f(None, "negative guidance minimum sigma: not supported, must be 0")
    s_churn: float | None = _f(None, "k-diffusion churn: not supported, must be 0")
    s_tmax: float | None = _f(None, "k-diffusion churn range; no effect without s_churn")
    s_tmin: float | None = _f(None, "k-diffusion churn range; no effect without s_churn")
    s_noise: float | None = _f(None, "k-diffusion noise multiplier: must be 1 for ancestral/SDE samplers")
    override_settings: dict[str, Any] | None = _f(None, "web UI settings for this request; diffspeed reads "
                                                  "sd_model_checkpoint ('name [hash]') and accepts only the "
                                                  "defaults of settings that change the image")
    override_settings_restore_afterwards: bool = _f(True, "diffspeed never keeps a request's settings")
    refiner_checkpoint: str | None = _f(None, "the refiner model ('name [hash]'); txt2img only")
    refiner_switch_at: float | None = _f(None, "fraction of the steps after which the refiner takes over")
    disable_extra_networks: bool = _f(False, "remove `<lora:...>` tags from the prompt without loading them")
    firstpass_image: str | None = _f(None, "hires fix from an existing first-pass image: not supported")
    comments: dict[str, Any] | None = _f(None, "free comments; not used")
    force_task_id: str | None = _f(None, "the id to report progress under (/internal/progress)")
    script_name: str | None = _f(None, "a selectable script: only 'diffspeed' (see script_args)")
    script_args: list[Any] = _f([], "arguments of script_name; for 'diffspeed': [preset name] or "
                                    "[{'preset': name}] or [{'recipe': TOML text or {'optimization': [...]}}]")
    send_images: bool = _f(True, "return the images in the response")
    save_images: bool = _f(False, "also save the images on the server")
    alwayson_scripts: dict[str, Any] = _f({}, "always-on scripts: 'diffspeed' ({'args': [preset or "
                                              "{'preset': ...} or {'recipe': ...}]}) and 'controlnet' "
                                              "({'args': [unit, ...]}, one enabled unit, no preprocessor)")
    infotext: str | None = _f(None, "fill fields from a PNG's infotext: not supported, send the fields")


class Txt2ImgRequest(_ProcessingRequest):
    """``POST /sdapi/v1/txt2img``: the web UI's StableDiffusionProcessingTxt2Img fields."""

    enable_hr: bool = _f(False, "hires fix: a first pass at width x height, an upscale, and an img2img pass")
    firstphase_width: int = _f(0, "legacy: the first pass's width (both firstphase sizes, or neither)")
    firstphase_height: int = _f(0, "legacy: the first pass's height")
    hr_scale: float = _f(2.0, "hires fix upscale factor (> 1)")
    hr_upscaler: str | None = _f(None, "hires upscaler from /sdapi/v1/latent-upscale-modes or /sdapi/v1/upscalers; "
                                       "None: 'Latent'")
    hr_second_pass_steps: int = _f(0, "second-pass steps; 0 = steps")
    hr_resize_x: int = _f(0, "hires target width instead of hr_scale (keeps the aspect ratio)")
    hr_resize_y: int = _f(0, "hires target height instead of hr_scale (keeps the aspect ratio)")
    hr_checkpoint_name: str | None = _f(None, "another model for the second pass: not supported")
    hr_sampler_name: str | None = _f(None, "another sampler for the second pass: only the first pass's")
    hr_scheduler: str | None = _f(None, "another schedule for the second pass: only the first pass's")
    hr_prompt: str = _f("", "another prompt for the second pass: only '' or the prompt")
    hr_negative_prompt: str = _f("", "another negative prompt for the second pass: only '' or the negative prompt")


class Img2ImgRequest(_ProcessingRequest):
    """``POST /sdapi/v1/img2img``: the web UI's StableDiffusionProcessingImg2Img fields."""

    init_images: list[str] | None = _f(None, "the start image: a list of one base64 image (raw or a data URI)")
    resize_mode: int = _f(0, "0: resize the init image to width x height (the only mode diffspeed runs)")
    image_cfg_scale: float | None = _f(None, "instruct-pix2pix image guidance; not used by other models")
    mask: str | None = _f(None, "inpaint mask, base64; white = repaint")
    mask_blur_x: int = _f(4, "mask blur in pixels, horizontally (must equal mask_blur_y)")
    mask_blur_y: int = _f(4, "mask blur in pixels, vertically")
    mask_blur: int | None = _f(None, "mask blur in pixels, both directions (overrides mask_blur_x/y)")
    mask_round: bool = _f(True, "round the latent mask (the only mode diffspeed runs)")
    inpainting_fill: int = _f(0, "masked content: 1 'original' is what diffspeed runs (0 fill, 2 latent noise, "
                                 "3 latent nothing are refused with a mask)")
    inpaint_full_res: bool = _f(True, "True: inpaint only the masked area at full resolution (refused with a "
                                      "mask: diffspeed inpaints the whole picture, send false)")
    inpaint_full_res_padding: int = _f(0, "padding around the masked area when inpaint_full_res")
    inpainting_mask_invert: int = _f(0, "1: repaint the black part of the mask")
    initial_noise_multiplier: float | None = _f(None, "extra noise on the init latents: must be 1")
    latent_mask: str | None = _f(None, "a separate latent mask: not supported")
    include_init_images: bool = _f(False, "echo init_images and mask in the response's parameters")


# ------------------------------------------------------------------------------------------------ the plan
class PlanError(RequestError):
    """Every problem of a web-UI request at once: ``problems`` lists ``(field, message)`` in web-UI field names;
    ``field`` is the first's."""


@dataclass(frozen=True)
class Plan:
    """What one web-UI request asks diffspeed for."""

    kind: str  # "txt2img" or "img2img" (the endpoint; img2img with a mask inpaints)
    request_fields: dict  # keyword arguments of diffspeed.request.GenerateRequest
    model: str | None  # override_settings["sd_model_checkpoint"] without " [hash]"; None: the server's
    preset: str | None  # from the diffspeed script
    recipe: dict | str | None  # from the diffspeed script: a recipe dict or TOML text
    loras: tuple[tuple[str, float], ...]  # (name, weight) from the prompt's <lora:name:weight> tags
    send_images: bool
    save_images: bool
    n_images: int  # batch_size * n_iter
    echo: dict  # the response's "parameters": the request as received, defaults filled
    task_id: str | None = None  # force_task_id
    control_resize_mode: str | None = None  # the ControlNet unit's resize mode; see control_resize_problem
    notes: tuple[str, ...] = ()  # what was honoured approximately, for the response's info


# web-UI names of diffspeed's samplers -> the k-diffusion style aliases the web UI also accepts
SAMPLER_ALIASES = MappingProxyType({
    "DDIM": ("ddim",), "PNDM": ("pndm",), "LMS": ("k_lms",), "LMS Karras": ("k_lms_ka",), "Euler": ("k_euler",),
    "Euler a": ("k_euler_a", "k_euler_ancestral"), "Heun": ("k_heun",), "DPM2": ("k_dpm_2",),
    "DPM2 a": ("k_dpm_2_a",), "DPM++ 2M": ("k_dpmpp_2m",), "DPM++ 2M Karras": ("k_dpmpp_2m_ka",),
    "DPM++ 2M SDE": ("k_dpmpp_2m_sde",), "DPM++ SDE Karras": ("k_dpmpp_sde_ka",), "UniPC": ("unipc",),
})
# samplers that draw fresh noise every step: the web UI's eta and s_noise scale it (default 1)
STOCHASTIC_SAMPLERS = frozenset({"Euler a", "DPM2 a", "DPM++ 2M SDE", "DPM++ SDE Karras"})
# the schedules diffspeed can run: web-UI scheduler name -> (label, default_rho)
SCHEDULERS = MappingProxyType({"automatic": ("Automatic", -1.0), "karras": ("Karras", 7.0)})
CONTROL_RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")
_CONTROL_RESIZE_ALIASES = MappingProxyType({
    "0": "Just Resize", "1": "Crop and Resize", "2": "Resize and Fill", "just resize": "Just Resize",
    "crop and resize": "Crop and Resize", "resize and fill": "Resize and Fill",
    "inner fit (scale to fit)": "Crop and Resize", "scale to fit (inner fit)": "Crop and Resize",
    "outer fit (shrink to fit)": "Resize and Fill", "envelope (outer fit)": "Resize and Fill",
})
# web-UI settings (override_settings keys) that change the picture -> the values that keep the default picture
_SETTING_DEFAULTS = MappingProxyType({
    "CLIP_stop_at_last_layers": (1,), "sd_vae": ("Automatic", "None", ""), "eta_noise_seed_delta": (0,),
    "eta_ancestral": (1, 1.0), "eta_ddim": (0, 0.0), "s_churn": (0, 0.0), "s_noise": (1, 1.0),
    "s_min_uncond": (0, 0.0), "s_tmin": (0, 0.0), "s_tmax": (0, 0.0), "randn_source": ("GPU",),
    "face_restoration": (False,), "tiling": (False,), "initial_noise_multiplier": (1, 1.0),
    "img2img_fix_steps": (False,), "emphasis": ("Original",), "sd_unet": ("Automatic",),
})
# web-UI settings that only decide where and how files are written or what progress shows: never the picture
_SETTINGS_WITHOUT_EFFECT = frozenset({
    "samples_save", "samples_format", "samples_filename_pattern", "save_images_add_number", "grid_save",
    "grid_format", "return_grid", "enable_pnginfo", "save_txt", "jpeg_quality", "webp_lossless", "outdir_samples",
    "outdir_txt2img_samples", "outdir_img2img_samples", "outdir_grids", "live_previews_enable",
    "show_progress_every_n_steps", "show_progress_type", "add_model_hash_to_info", "add_model_name_to_info",
    "add_version_to_infotext", "sd_checkpoint_hash",
})
_NO_CHECKPOINT = ("", "None", "none", "Use same checkpoint")
_EXTRA_NET = re.compile(r"<(\w+):([^>]+)>")  # the web UI's extra-network tag: <kind:args>
_EMPHASIS = re.compile(r"(?<!\\)(?:\\\\)*[()\[\]]")  # an unescaped bracket
_ESCAPE = re.compile(r"\\([()\[\]\\])")


def plan_request(api: Txt2ImgRequest | Img2ImgRequest, *, default_sampler: str | None = DEFAULT_SAMPLER) -> Plan:
    """Map a web-UI request onto diffspeed: the ``GenerateRequest`` fields and the rest (see :class:`Plan`).

    ``default_sampler`` is used when the client named no sampler (neither ``sampler_name`` nor
    ``sampler_index``); ``None`` leaves the choice to diffspeed (``resolve_sampling``). Raises
    :class:`PlanError` with every problem, in web-UI field names.
    """
    problems: list[tuple[str, str]] = []
    notes: list[str] = []
    kind = "img2img" if isinstance(api, Img2ImgRequest) else "txt2img"
    prompt, loras = _extra_networks(api.prompt, api.disable_extra_networks, problems)
    width, height = _first_pass_size(api, problems)
    sampler = _sampler(api, default_sampler, problems)
    fields = {"prompt": _plain_prompt("prompt", prompt, problems),
              "negative_prompt": _plain_prompt("negative_prompt", api.negative_prompt, problems),
              "seed": api.seed, "steps": api.steps, "cfg_scale": api.cfg_scale, "width": width, "height": height,
              "batch_size": api.batch_size * api.n_iter}
    if sampler is not None:
        fields["sampler"] = sampler
        if api.eta is not None and SAMPLERS[sampler].eta is not None:  # DDIM's noise, TCD's gamma: honoured
            fields["eta"] = api.eta
    _refuse_unsupported(api, sampler, (width, height), problems)
    model = _model(api.override_settings or {}, problems)
    scripts = {str(k).lower(): (str(k), v) for k, v in (api.alwayson_scripts or {}).items()}
    preset, recipe = _diffspeed_script(api, scripts.pop("diffspeed", None), problems)
    resize_mode = _controlnet(api, scripts.pop("controlnet", None), fields, problems, notes)
    for name, value in scripts.values():
        if not _disabled_script(value):
            problems.append((f"alwayson_scripts.{name}", f"alwayson_scripts.{name}: diffspeed has no {name!r} script "
                             "(it runs 'diffspeed' and 'controlnet'); leave it out or disable it"))
    _refiner(api, kind, fields, problems)
    if kind == "txt2img":
        _hires(api, fields, problems)
    else:
        _img2img(api, fields, problems)
    if problems:  # the request model's own problems too, so that every one is reported at once
        raise PlanError(problems + _request_problems(fields, {f for f, _ in problems}))
    echo = api.model_dump(mode="json")
    if kind == "img2img" and not api.include_init_images:
        echo["init_images"] = echo["mask"] = None
    return Plan(kind=kind, request_fields=fields, model=model, preset=preset, recipe=recipe, loras=tuple(loras),
                send_images=api.send_images, save_images=api.save_images, n_images=api.batch_size * api.n_iter,
                echo=echo, task_id=api.force_task_id, control_resize_mode=resize_mode, notes=tuple(notes))


def _request_problems(fields: dict, known: set[str]) -> list[tuple[str, str]]:
    """What GenerateRequest says about ``fields`` (in web-UI names), minus fields already reported."""
    from diffspeed.request import GenerateRequest

    try:
        GenerateRequest(**fields)
    except RequestError as err:
        return [(api_field(f), m) for f, m in err.problems if api_field(f) not in known]
    return []


def strip_hash(title: str) -> str:
    """A web-UI model title ``"name [hash]"`` -> ``"name"`` (a title without a hash is returned as it is)."""
    return re.sub(r"\s*\[[0-9A-Fa-f]{6,64}\]\s*$", "", title.strip())


def control_resize_problem(mode: str | None, image_size: tuple[int, int], output_size: tuple[int, int]) -> str | None:
    """Why a decoded control image cannot be used as the ControlNet unit's ``resize_mode`` asks, or None.

    diffspeed stretches the control image to the output size ("Just Resize"); "Crop and Resize" and
    "Resize and Fill" give the same picture only when the image already has the output's aspect ratio.
    """
    if mode in (None, "Just Resize"):
        return None
    (w, h), (ow, oh) = image_size, output_size
    if w * oh == h * ow:
        return None
    return (f"alwayson_scripts.controlnet: resize_mode {mode!r} crops or pads a {w}x{h} control image to the "
            f"{ow}x{oh} output, which diffspeed does not; send the control image at the output's aspect ratio or "
            f"resize_mode 'Just Resize'")


# -- prompt ------------------------------------------------------------------------------------------------
def _extra_networks(prompt: str, disabled: bool, problems) -> tuple[str, list[tuple[str, float]]]:
    """Remove the ``<kind:args>`` tags from the prompt, as the web UI does, and read the LoRAs among them."""
    loras: dict[str, float] = {}
    for match in _EXTRA_NET.finditer(prompt):
        tag, kind, args = match.group(0), match.group(1).lower(), match.group(2).split(":")
        if disabled:
            continue
        if kind not in ("lora", "lyco"):
            problems.append(("prompt", f"prompt: {tag}: diffspeed loads LoRAs only (<lora:name:weight>)"))
            continue
        name, weight = args[0].strip(), _lora_weight(tag, args[1:], problems)
        if not name or name.startswith(".") or any(c in name for c in "/\\"):
            problems.append(("prompt", f"prompt: {tag}: a LoRA is named as /sdapi/v1/loras lists it, not a path"))
        elif weight is not None and loras.setdefault(name, weight) != weight:
            problems.append(("prompt", f"prompt: LoRA {name!r} is given twice with different weights"))
    # the tag and one space before it go, and the ends are trimmed: "a cat <lora:x:1>" reads "a cat"
    return re.sub(r" ?" + _EXTRA_NET.pattern, "", prompt).strip(), list(loras.items())


def _lora_weight(tag: str, args: list[str], problems) -> float | None:
    if any("=" in a for a in args):
        problems.append(("prompt", f"prompt: {tag}: named LoRA arguments (te=, unet=, dyn=) are not supported"))
        return None
    try:
        weights = [float(a) for a in args] or [1.0]
    except ValueError:
        problems.append(("prompt", f"prompt: {tag}: the weight must be a number"))
        return None
    if len(weights) > 2 or len(set(weights)) > 1 or not math.isfinite(weights[0]):
        problems.append(("prompt", f"prompt: {tag}: diffspeed applies one finite weight to the text encoder and "
                         f"the UNet alike"))
        return None
    return weights[0]


def _plain_prompt(field: str, text: str, problems) -> str:
    """The prompt as diffspeed reads it: plain text. The web UI's emphasis ``(word:1.2)``, ``[word]``, prompt
    editing ``[a:b:n]``, ``AND`` and ``BREAK`` change its picture, so they are refused; ``\\(`` and friends are
    the literal characters in both."""
    found = sorted({m.group(0)[-1] for m in _EMPHASIS.finditer(text)})
    found += [w for w in ("AND", "BREAK") if re.search(rf"\b{w}\b", text) and (w == "BREAK" or field == "prompt")]
    if found:  # AND splits only the prompt (composable diffusion); BREAK and brackets act in both
        what = " ".join(found)
        problems.append((field, f"{field}: diffspeed reads the prompt as plain text, without the web UI's emphasis, "
                         f"prompt editing, AND or BREAK ({what}); escape brackets as \\( \\) \\[ \\]"))
    return _ESCAPE.sub(r"\1", text)


# -- sampler -----------------------------------------------------------------------------------------------
def _sampler_lookup(name: str) -> str | None:
    key = name.strip().lower()
    for known in SAMPLERS:
        if key == known.lower() or key in SAMPLER_ALIASES.get(known, ()):
            return known
    return None


def _scheduler(name: str | None) -> str | None:
    key = (name or "automatic").strip().lower()
    return next((k for k, (label, _) in SCHEDULERS.items() if key in (k, label.lower())), None)


def _sampler(api, default: str | None, problems) -> str | None:
    """sampler_name (or sampler_index) + scheduler -> diffspeed's sampler name."""
    if api.sampler_name:
        name, source = api.sampler_name, "sampler_name"
    elif api.sampler_index and "sampler_index" in api.model_fields_set:
        name, source = api.sampler_index, "sampler_index"
    else:
        name, source = default, "sampler_name"
    schedule = _scheduler(api.scheduler)
    if schedule is None:
        problems.append(("scheduler", f"scheduler: diffspeed runs {' and '.join(v[0] for v in SCHEDULERS.values())}"
                         f" schedules; got {api.scheduler!r}"))
    if name is None:
        if schedule == "karras":
            problems.append(("scheduler", "scheduler: Karras needs a sampler_name"))
        return None
    own = _sampler_lookup(name)
    if schedule != "karras" or (own is not None and own.endswith("Karras")):
        found = own
    else:
        found = _sampler_lookup(f"{own or name} Karras")
        if found is None and own is not None:
            with_karras = ", ".join(s.removesuffix(" Karras") for s in SAMPLERS if s.endswith(" Karras"))
            problems.append(("scheduler", f"scheduler: diffspeed has no Karras schedule for {own!r}; it has one for "
                             f"{with_karras}"))
            return None
    if found is None:
        problems.append((source, f"{source}: diffspeed has no sampler {name!r}; it has {', '.join(_available())}"))
    return found


def _available() -> list[str]:
    return [s.name for s in SAMPLERS.values() if s.needs is None or find_spec(s.needs) is not None]


# -- what diffspeed cannot honour --------------------------------------------------------------------------
def _refuse_unsupported(api, sampler: str | None, size: tuple[int, int], problems) -> None:
    def refuse(field, why):
        problems.append((field, f"{field}: {why}"))

    if api.styles:
        refuse("styles", "diffspeed has no saved styles; put their text into the prompt")
    if api.subseed_strength not in (None, 0):
        refuse("subseed_strength", "diffspeed has no variation seeds; send 0")
    if api.seed_resize_from_w > 0 and api.seed_resize_from_h > 0 and \
            (api.seed_resize_from_w, api.seed_resize_from_h) != size:
        refuse("seed_resize_from_w", "diffspeed cannot resize a seed's noise; send 0 or -1")
    if api.restore_faces:
        refuse("restore_faces", "diffspeed has no face restoration; send false")
    if api.tiling:
        refuse("tiling", "diffspeed does not draw seamless tiles; send false")
    stochastic = sampler in STOCHASTIC_SAMPLERS
    if api.eta is not None and stochastic and api.eta != 1:
        refuse("eta", f"{sampler} runs with eta 1 only; send that or leave eta out")
    if api.s_min_uncond not in (None, 0):
        refuse("s_min_uncond", "diffspeed does not skip the negative prompt by sigma; send 0")
    if api.s_churn not in (None, 0):
        refuse("s_churn", "diffspeed's samplers have no churn; send 0")
    if stochastic and api.s_noise not in (None, 1):
        refuse("s_noise", f"{sampler} runs with s_noise 1 only; send 1 or leave it out")
    if api.firstpass_image:
        refuse("firstpass_image", "diffspeed draws the first pass itself; leave it out")
    if api.infotext:
        refuse("infotext", "diffspeed does not read an infotext; send its values as fields")
    script = (api.script_name or "").strip()
    if script and script.lower() != "diffspeed":
        refuse("script_name", f"diffspeed has no script {script!r}; it runs 'diffspeed' (or none)")
    for key, value in (api.override_settings or {}).items():
        if key == "sd_model_checkpoint" or key in _SETTINGS_WITHOUT_EFFECT:
            continue
        if key not in _SETTING_DEFAULTS:
            refuse(f"override_settings.{key}", "diffspeed does not read this web UI setting; leave it out")
        elif not _default_setting(key, value):
            refuse(f"override_settings.{key}", f"diffspeed runs only {_SETTING_DEFAULTS[key][0]!r}; got {value!r}")


def _default_setting(key: str, value) -> bool:
    defaults = _SETTING_DEFAULTS[key]
    return value in defaults and isinstance(value, bool) == isinstance(defaults[0], bool)  # True == 1 in Python


def _model(settings: dict, problems) -> str | None:
    title = settings.get("sd_model_checkpoint")
    if title is None:
        return None
    if not isinstance(title, str) or not title.strip():
        problems.append(("override_settings.sd_model_checkpoint", "override_settings.sd_model_checkpoint: must be "
                         "a model title from /sdapi/v1/sd-models"))
        return None
    return strip_hash(title)


def _first_pass_size(api, problems) -> tuple[int, int]:
    if isinstance(api, Img2ImgRequest) or (api.firstphase_width, api.firstphase_height) == (0, 0):
        return api.width, api.height
    if api.firstphase_width <= 0 or api.firstphase_height <= 0:
        problems.append(("firstphase_width", "firstphase_width: give firstphase_width and firstphase_height both, "
                         "or neither (better: width and height, with hr_scale)"))
    return api.firstphase_width, api.firstphase_height


# -- scripts -----------------------------------------------------------------------------------------------
def _disabled_script(value) -> bool:
    """``{"args": []}`` or ``{"args": [False, ...]}``: how clients send an always-on script they leave off."""
    if isinstance(value, dict):
        if "args" not in value:
            return not value
        value = value["args"]
    return value in (None, [], ()) or isinstance(value, (list, tuple)) and value[0] is False


def _diffspeed_script(api, entry, problems) -> tuple[str | None, dict | str | None]:
    chosen = []
    if entry is not None:
        name, value = entry
        if isinstance(value, dict):  # {"args": [...]}, or the argument itself: {"preset": ...}
            value = value["args"] if "args" in value else [value]
        chosen.append((f"alwayson_scripts.{name}", value))
    if (api.script_name or "").strip().lower() == "diffspeed":
        chosen.append(("script_args", api.script_args))
    if len(chosen) == 2:
        problems.append(("script_name", "script_name: the diffspeed script is given twice (script_name and "
                         "alwayson_scripts); give it once"))
        return None, None
    return _diffspeed_args(*chosen[0], problems) if chosen else (None, None)


def _diffspeed_args(field: str, args, problems) -> tuple[str | None, dict | str | None]:
    from diffspeed.presets import PRESETS

    def bad(why):
        problems.append((field, f"{field}: {why}"))
        return None, None

    if args in (None, [], ()):
        return None, None
    if not isinstance(args, (list, tuple)) or len(args) != 1:
        return bad("give one argument: a preset name, {'preset': name} or {'recipe': TOML text or dict}")
    arg = args[0]
    if arg is None or arg is False:
        return None, None
    if isinstance(arg, str):
        arg = {"preset": arg}
    if not isinstance(arg, dict) or set(arg) - {"preset", "recipe"}:
        return bad("give a preset name, {'preset': name} or {'recipe': TOML text or dict}")
    preset, recipe = arg.get("preset"), arg.get("recipe")
    if preset is not None and recipe is not None:
        return bad("give a preset or a recipe, not both")
    if preset is not None and preset not in PRESETS:
        return bad(f"preset must be one of {', '.join(PRESETS)}; got {preset!r}")
    if recipe is not None and not isinstance(recipe, (str, dict)):
        return bad(f"recipe must be TOML text or a dict like {{'optimization': [...]}}, got {type(recipe).__name__}")
    return preset, recipe


def _controlnet(api, entry, fields: dict, problems, notes: list) -> str | None:
    """The ControlNet extension's first enabled unit -> controlnet, control_image, control_scale/start/end."""
    if entry is None:
        return None
    name, value = entry
    where = f"alwayson_scripts.{name}"
    args = value.get("args", []) if isinstance(value, dict) else value
    if not isinstance(args, (list, tuple)):
        problems.append((where, f"{where}: args must be a list of ControlNet units"))
        return None
    enabled = [(i, u) for i, u in enumerate(args) if not isinstance(u, dict) or u.get("enabled", True) is not False]
    if len(enabled) > 1:
        problems.append((where, f"{where}: diffspeed runs one ControlNet unit; {len(enabled)} are enabled"))
        return None
    if not enabled:
        return None
    i, unit = enabled[0]
    at = f"{where}.args[{i}]"
    if not isinstance(unit, dict):
        problems.append((at, f"{at}: a ControlNet unit is an object"))
        return None
    before = len(problems)
    module = unit.get("module")
    if module not in (None, "", "none", "None"):
        problems.append((f"{at}.module", f"{at}.module: diffspeed runs no preprocessors; send the control image "
                         f"(got module {module!r})"))
    model = unit.get("model")
    if not isinstance(model, str) or model.strip() in _NO_CHECKPOINT:
        problems.append((f"{at}.model", f"{at}.model: name the ControlNet model ('name [hash]')"))
    image, mask = _unit_image(unit)
    if mask:
        problems.append((f"{at}.mask", f"{at}.mask: diffspeed has no ControlNet masks; leave it out"))
    if not image and isinstance(api, Img2ImgRequest) and api.init_images:
        image = api.init_images[0]
        notes.append("the ControlNet unit has no image: the init image is its control image")
    if not image or not isinstance(image, str):
        problems.append((f"{at}.image", f"{at}.image: send the control image (base64)"))
    numbers = {k: _unit_number(unit, k, d, at, problems)
               for k, d in (("weight", 1.0), ("guidance_start", 0.0), ("guidance_end", 1.0))}
    if unit.get("control_mode", 0) not in (0, "0", "Balanced", None):
        problems.append((f"{at}.control_mode", f"{at}.control_mode: diffspeed runs 'Balanced' only"))
    if unit.get("guess_mode") or unit.get("guessmode"):
        problems.append((f"{at}.guess_mode", f"{at}.guess_mode: diffspeed runs 'Balanced' only"))
    if isinstance(api, Txt2ImgRequest) and api.enable_hr and unit.get("hr_option", "Both") not in ("Both", None):
        problems.append((f"{at}.hr_option", f"{at}.hr_option: diffspeed controls both hires passes ('Both')"))
    mode = _CONTROL_RESIZE_ALIASES.get(str(unit.get("resize_mode", "Crop and Resize")).strip().lower())
    if mode is None:
        problems.append((f"{at}.resize_mode", f"{at}.resize_mode: one of {', '.join(CONTROL_RESIZE_MODES)}"))
    if len(problems) > before:
        return None
    fields.update(controlnet=strip_hash(model), control_image=image, control_scale=numbers["weight"],
                  control_start=numbers["guidance_start"], control_end=numbers["guidance_end"])
    return mode


def _unit_image(unit: dict) -> tuple[Any, Any]:
    image = unit.get("image") or unit.get("input_image")
    mask = unit.get("mask") or unit.get("mask_image")
    if isinstance(image, dict):
        mask = mask or image.get("mask")
        image = image.get("image")
    return image, mask


def _unit_number(unit: dict, key: str, default: float, at: str, problems) -> float:
    value = unit.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        problems.append((f"{at}.{key}", f"{at}.{key}: must be a number, got {value!r}"))
        return default
    return float(value)


# -- workflows ---------------------------------------------------------------------------------------------
def _refiner(api, kind: str, fields: dict, problems) -> None:
    title = api.refiner_checkpoint
    if title is None or title.strip() in _NO_CHECKPOINT:
        return
    if kind == "img2img":
        problems.append(("refiner_checkpoint", "refiner_checkpoint: diffspeed runs the refiner with txt2img only"))
    elif api.refiner_switch_at is None:
        problems.append(("refiner_switch_at", "refiner_switch_at: give the fraction of the steps after which the "
                         "refiner takes over (the web UI runs no refiner without it)"))
    else:
        fields.update(refiner=strip_hash(title), refiner_switch_at=float(api.refiner_switch_at))


def _hires(api: Txt2ImgRequest, fields: dict, problems) -> None:
    if not api.enable_hr:
        return
    width, height = fields["width"], fields["height"]
    if width <= 0 or height <= 0:  # refused on its own: firstphase_* here, width/height by GenerateRequest
        return
    if api.hr_resize_x or api.hr_resize_y:
        scale, target, field = _hires_resize(api, width, height, problems)
    else:
        scale, field = float(api.hr_scale), "hr_scale"
        if not math.isfinite(scale * max(width, height)):
            problems.append(("hr_scale", f"hr_scale: {scale:g} is too large"))
            return
        target = (int(width * scale) // 8 * 8, int(height * scale) // 8 * 8)  # the latents are the size // 8
    if scale is not None and scale <= 1:
        problems.append((field, f"{field}: diffspeed's hires fix upscales (a scale above 1); got {scale:g}"))
    elif scale is not None:
        ours = (round(width * scale / 8) * 8, round(height * scale / 8) * 8)  # diffspeed.generate._hires
        if ours != target:
            problems.append((field, f"{field}: the web UI's hires pass is {target[0]}x{target[1]}, diffspeed's "
                             f"would be {ours[0]}x{ours[1]}; pick a size both reach (a multiple of 8 per side)"))
    upscaler = api.hr_upscaler or "Latent"
    known = next((k for k in HIRES_UPSCALERS if k.lower() == upscaler.lower()), None)
    if known is None:
        problems.append(("hr_upscaler", f"hr_upscaler: diffspeed has {', '.join(HIRES_UPSCALERS)}; got "
                         f"{upscaler!r}"))
    for field, value, same in (("hr_sampler_name", api.hr_sampler_name, "Use same sampler"),
                               ("hr_scheduler", api.hr_scheduler, "Use same scheduler")):
        first, unresolved = fields.get("sampler"), []
        if value and value != same and (_sampler(_HrSampler(api, field), first, unresolved) != first or unresolved):
            problems.append((field, f"{field}: diffspeed's second pass uses the first pass's sampler; leave it out"))
    if api.hr_checkpoint_name and api.hr_checkpoint_name.strip() not in _NO_CHECKPOINT:
        problems.append(("hr_checkpoint_name", "hr_checkpoint_name: diffspeed's second pass uses the first pass's "
                         "model; leave it out"))
    for field, value, first in (("hr_prompt", api.hr_prompt, api.prompt),
                                ("hr_negative_prompt", api.hr_negative_prompt, api.negative_prompt)):
        if value not in ("", first):
            problems.append((field, f"{field}: diffspeed's second pass uses the first pass's prompts; leave it out"))
    if scale is not None:
        fields.update(hires_scale=scale, hires_steps=api.hr_second_pass_steps, hires_upscaler=known or upscaler,
                      denoising_strength=api.denoising_strength)


class _HrSampler:
    """The hires pass's sampler fields seen as a first pass's, to resolve them with the same rule."""

    def __init__(self, api, field):
        self.sampler_name = api.hr_sampler_name if field == "hr_sampler_name" else api.sampler_name
        self.sampler_index = api.sampler_index
        self.scheduler = api.hr_scheduler if field == "hr_scheduler" else api.scheduler
        self.model_fields_set = api.model_fields_set


def _hires_resize(api, width: int, height: int, problems):
    rx, ry = api.hr_resize_x, api.hr_resize_y
    if rx < 0 or ry < 0:
        problems.append(("hr_resize_x", "hr_resize_x: hr_resize_x and hr_resize_y must be 0 or positive"))
        return None, None, "hr_resize_x"
    if rx and ry and rx * height != ry * width:
        problems.append(("hr_resize_x", f"hr_resize_x: {rx}x{ry} has another aspect ratio than {width}x{height}; "
                         f"the web UI would crop, diffspeed keeps the aspect ratio (give one of hr_resize_x/y)"))
        return None, None, "hr_resize_x"
    if not ry:
        ry = rx * height // width
    elif not rx:
        rx = ry * width // height
    return rx / width, (rx // 8 * 8, ry // 8 * 8), "hr_resize_x" if api.hr_resize_x else "hr_resize_y"


def _img2img(api: Img2ImgRequest, fields: dict, problems) -> None:
    images = api.init_images or []
    if not images:
        problems.append(("init_images", "init_images: img2img needs one init image (base64)"))
    elif len(images) > 1:
        problems.append(("init_images", f"init_images: diffspeed takes one init image; got {len(images)}"))
    else:
        fields["init_image"] = images[0]
    if api.resize_mode != 0:
        problems.append(("resize_mode", "resize_mode: diffspeed resizes the init image to width x height (0, "
                         "'Just resize') only"))
    if api.initial_noise_multiplier not in (None, 1):
        problems.append(("initial_noise_multiplier", "initial_noise_multiplier: diffspeed adds no extra noise; "
                         "send 1"))
    if api.latent_mask:
        problems.append(("latent_mask", "latent_mask: diffspeed uses the mask for the latents too; leave it out"))
    if api.denoising_strength is not None:
        fields["denoising_strength"] = api.denoising_strength
    if api.mask:
        _inpaint(api, fields, problems)


def _inpaint(api: Img2ImgRequest, fields: dict, problems) -> None:
    blur = api.mask_blur
    if blur is None:
        blur = api.mask_blur_x
        if api.mask_blur_x != api.mask_blur_y:
            problems.append(("mask_blur_x", "mask_blur_x: diffspeed blurs the mask alike in both directions; give "
                             "mask_blur_x = mask_blur_y (or mask_blur)"))
    if api.inpainting_mask_invert not in (0, 1):
        problems.append(("inpainting_mask_invert", "inpainting_mask_invert: 0 or 1"))
    if api.inpaint_full_res:
        problems.append(("inpaint_full_res", "inpaint_full_res: diffspeed inpaints the whole picture; send false "
                         "('Whole picture')"))
    if api.inpainting_fill != 1:
        problems.append(("inpainting_fill", "inpainting_fill: diffspeed starts from the original image under the "
                         "mask; send 1 ('original')"))
    if not api.mask_round:
        problems.append(("mask_round", "mask_round: diffspeed rounds the latent mask; send true"))
    fields.update(mask_image=api.mask, mask_blur=blur, mask_invert=bool(api.inpainting_mask_invert))


# web-UI field a GenerateRequest problem is about, for the errors the request model raises on plan_request's fields
API_FIELDS = MappingProxyType({
    "sampler": "sampler_name", "init_image": "init_images", "mask_image": "mask", "mask_invert":
    "inpainting_mask_invert", "hires_scale": "hr_scale", "hires_steps": "hr_second_pass_steps",
    "hires_upscaler": "hr_upscaler", "controlnet": "alwayson_scripts.controlnet", "control_image":
    "alwayson_scripts.controlnet", "control_scale": "alwayson_scripts.controlnet", "control_start":
    "alwayson_scripts.controlnet", "control_end": "alwayson_scripts.controlnet", "refiner": "refiner_checkpoint",
})


def api_field(request_field: str) -> str:
    """The web-UI field behind a :class:`~diffspeed.request.GenerateRequest` field (``init_image`` ->
    ``init_images``); ``batch_size`` stays, though it is batch_size * n_iter."""
    return API_FIELDS.get(request_field, request_field)


# ------------------------------------------------------------------------------------------------ responses
class ImageResponse(BaseModel):
    """``/sdapi/v1/txt2img`` and ``/sdapi/v1/img2img``."""

    images: list[str] | None = Field(None, description="the images, base64 PNG (none when send_images is false)")
    parameters: dict[str, Any] = Field(description="the request as received, defaults filled")
    info: str = Field(description="a JSON object: the generation's seeds, infotexts, and a 'diffspeed' object with "
                      "timings, statistics and the recipe")


class ErrorDetail(BaseModel):
    """An error that is not about one field (400, 409, 413, 429, 500, 503, 504)."""

    detail: str


class ProgressState(BaseModel):
    skipped: bool = Field(False, description="the current image was skipped")
    interrupted: bool = Field(False, description="the current job was interrupted")
    stopping_generation: bool = Field(False, description="the job finishes its current image, then stops")
    job: str = Field("", description="what runs now")
    job_count: int = Field(0, description="jobs in the current task")
    job_timestamp: str = Field("0", description="when the job started, YYYYmmddHHMMSS")
    job_no: int = Field(0, description="the job's number within the task")
    sampling_step: int = Field(0, description="steps done")
    sampling_steps: int = Field(0, description="steps in all")


class ProgressResponse(BaseModel):
    """``/sdapi/v1/progress``."""

    progress: float = Field(description="0..1")
    eta_relative: float = Field(description="estimated seconds left")
    state: ProgressState
    current_image: str | None = Field(None, description="a preview, base64 PNG")
    textinfo: str | None = Field(None, description="a line about the state")
    current_task: str | None = Field(None, description="the id of the task that runs")
    queue: dict[str, Any] | None = Field(None, description="diffspeed: the job queue's state")


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, Any]


class SchedulerItem(BaseModel):
    name: str
    label: str
    aliases: list[str] | None = None
    default_rho: float | None = None
    need_inner_model: bool | None = None


class SDModelItem(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    title: str = Field(description="'name [hash]': what override_settings.sd_model_checkpoint takes")
    model_name: str
    hash: str | None = None
    sha256: str | None = None
    filename: str = Field(description="a display name, never a path on the server")
    config: str | None = None


class LoraItem(BaseModel):
    name: str = Field(description="what <lora:name:weight> takes")
    alias: str
    path: str = Field(description="a display value, never a path on the server")
    metadata: dict[str, Any] = Field(default_factory=dict)


class UpscalerItem(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    name: str
    model_name: str | None = None
    model_path: str | None = None
    model_url: str | None = None
    scale: float | None = None


class LatentUpscaleModeItem(BaseModel):
    name: str


class ScriptsList(BaseModel):
    txt2img: list[str] = Field(default_factory=list)
    img2img: list[str] = Field(default_factory=list)


class PNGInfoRequest(BaseModel):
    image: str = Field(description="a base64 PNG (raw or a data URI)")


class PNGInfoResponse(BaseModel):
    info: str = Field(description="the image's parameters text")
    items: dict[str, Any] = Field(description="the other text chunks of the image")
    parameters: dict[str, Any] = Field(description="the parameters text, parsed")


class MemoryResponse(BaseModel):
    ram: dict[str, Any] = Field(description="system memory: free, used, total (bytes)")
    cuda: dict[str, Any] = Field(description="GPU memory, or {'error': ...} without one")


def sampler_items(*, available_only: bool = True) -> list[SamplerItem]:
    """``/sdapi/v1/samplers``: diffspeed's samplers (those whose optional package is installed, unless
    ``available_only`` is false)."""
    names = _available() if available_only else list(SAMPLERS)
    return [SamplerItem(name=n, aliases=list(SAMPLER_ALIASES.get(n, ())),
                        options={"scheduler": "karras"} if n.endswith("Karras") else {}) for n in names]


def scheduler_items() -> list[SchedulerItem]:
    """``/sdapi/v1/schedulers``: the schedules diffspeed runs."""
    return [SchedulerItem(name=n, label=label, aliases=None, default_rho=rho, need_inner_model=False)
            for n, (label, rho) in SCHEDULERS.items()]


def latent_upscale_modes() -> list[LatentUpscaleModeItem]:
    """``/sdapi/v1/latent-upscale-modes``: diffspeed's latent hires upscalers."""
    return [LatentUpscaleModeItem(name=n) for n, (kind, _) in HIRES_UPSCALERS.items() if kind == "latent"]


def upscaler_items() -> list[UpscalerItem]:
    """``/sdapi/v1/upscalers``: diffspeed's image hires upscalers (plain resizes, no model)."""
    return [UpscalerItem(name=n, scale=4.0) for n, (kind, _) in HIRES_UPSCALERS.items() if kind == "image"]


def scripts_list() -> ScriptsList:
    """``/sdapi/v1/scripts``: the scripts :func:`plan_request` reads."""
    return ScriptsList(txt2img=["controlnet", "diffspeed"], img2img=["controlnet", "diffspeed"])


# ------------------------------------------------------------------------------------------------ info
def info_json(plan: Plan, results, *, model_name: str | None, model_hash: str | None, version: str,
              job_timestamp: str | None = None, batched_with: int = 0) -> str:
    """The web UI's ``info`` JSON for ``results`` (objects with ``images``, ``seeds``, ``parameters``,
    ``seconds``, ``steps_per_second``, ``stats``, ``events`` and the resolved ``request``), plus a ``diffspeed``
    object. ``batched_with``: how many other requests shared the pipeline call."""
    results = list(results)
    echo = plan.echo
    seeds = [int(s) for r in results for s in r.seeds]
    n = len(seeds) or plan.n_images
    ran = next((r.request for r in results if getattr(r, "request", None) is not None), None)
    fields = plan.request_fields
    subseed = echo.get("subseed", -1)
    seconds = sum(float(r.seconds) for r in results)
    n_images = sum(len(r.images) for r in results)
    obj = {
        "prompt": echo["prompt"], "all_prompts": [echo["prompt"]] * n,
        "negative_prompt": echo["negative_prompt"], "all_negative_prompts": [echo["negative_prompt"]] * n,
        "seed": seeds[0] if seeds else echo["seed"], "all_seeds": seeds,
        "subseed": subseed, "all_subseeds": [subseed + i if subseed >= 0 else -1 for i in range(n)],
        "subseed_strength": echo.get("subseed_strength") or 0,
        "width": getattr(ran, "width", None) or fields["width"],
        "height": getattr(ran, "height", None) or fields["height"],
        "sampler_name": getattr(ran, "sampler", None) or fields.get("sampler"),
        "cfg_scale": getattr(ran, "cfg_scale", None) or fields["cfg_scale"],
        "steps": getattr(ran, "steps", None) or fields["steps"],
        "batch_size": echo["batch_size"], "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": model_name, "sd_model_hash": model_hash, "sd_vae_name": None, "sd_vae_hash": None,
        "seed_resize_from_w": echo["seed_resize_from_w"], "seed_resize_from_h": echo["seed_resize_from_h"],
        "denoising_strength": echo.get("denoising_strength"),
        "extra_generation_params": _extra_params(plan),
        "index_of_first_image": 0,
        "infotexts": [t for r in results for t in r.parameters],
        "styles": echo.get("styles") or [],
        "job_timestamp": job_timestamp or time.strftime("%Y%m%d%H%M%S"),
        "clip_skip": 1, "is_using_inpainting_conditioning": False, "version": version,
        "diffspeed": {
            "seconds": seconds, "seconds_per_image": seconds / n_images if n_images else None,
            "steps_per_second": (sum(float(r.steps_per_second) * float(r.seconds) for r in results) / seconds
                                 if seconds else None),
            "stats": _sum_stats(r.stats for r in results), "events": [e for r in results for e in r.events],
            "preset": plan.preset, "recipe": plan.recipe, "batched_with": batched_with, "notes": list(plan.notes),
        },
    }
    return json.dumps(obj, default=str)


def _extra_params(plan: Plan) -> dict:
    f = plan.request_fields
    extra = {}
    if f.get("hires_scale"):
        extra.update({"Hires upscale": f["hires_scale"], "Hires upscaler": f["hires_upscaler"]})
        if f.get("hires_steps"):
            extra["Hires steps"] = f["hires_steps"]
    if f.get("mask_image") is not None:
        extra["Mask blur"] = f["mask_blur"]
        if f.get("mask_invert"):
            extra["Mask mode"] = "Inpaint not masked"
    if f.get("refiner"):
        extra.update({"Refiner": f["refiner"], "Refiner switch at": f["refiner_switch_at"]})
    if f.get("controlnet"):
        extra["ControlNet 0"] = (f"Module: none, Model: {f['controlnet']}, Weight: {f['control_scale']:g}, "
                                 f"Guidance Start: {f['control_start']:g}, Guidance End: {f['control_end']:g}")
    if plan.loras:
        extra["Lora"] = ", ".join(f"{name}: {weight:g}" for name, weight in plan.loras)
    return extra


def _sum_stats(all_stats) -> dict:
    total: dict = {}
    for stats in all_stats:
        for key, value in (stats or {}).items():
            both_numbers = isinstance(value, (int, float)) and isinstance(total.get(key), (int, float))
            total[key] = total[key] + value if both_numbers and not isinstance(value, bool) else value
    return total
