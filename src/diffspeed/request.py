"""The one request model: what to generate, as pure data, shared by the CLI, the Python API and the server.

A :class:`GenerateRequest` holds only JSON values: text, numbers, and *references* -- images as a file path or a
base64 image (raw or a ``data:image/...;base64,`` URI), ControlNets and refiners as a shipped name or a folder.
Validation checks types, ranges and how the fields fit together, and reports every problem at once, each with
its field (:class:`RequestError`); it never touches the file system or loads a model. Turning references into
images and models is the resolver's job (:class:`diffspeed.resolve.Resolver`), in one place, where the server
also refuses paths on its own disk.

The Python API may pass a PIL image or an HxWxC array for an image field, and a ``pathlib.Path`` for a path:
they are turned into their reference (a lossless base64 PNG, a path string) as the request is made.
"""

from __future__ import annotations

import base64
import io
from pathlib import PurePath
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from diffspeed.errors import DiffspeedError
from diffspeed.pipelines.samplers import SAMPLERS, check_eta, get_sampler
from diffspeed.pipelines.workflows import HIRES_UPSCALERS, hires_upscaler

MAX_SEED = 2**32 - 1
REFINER_MODES = ("ensemble", "img2img")


class RequestError(DiffspeedError):
    """Every problem of a request at once: ``problems`` lists ``(field, message)``; ``field`` is the first's."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        text = "; ".join(message for _, message in problems)
        super().__init__(text if len(problems) == 1 else f"{len(problems)} problems: {text}",
                         field=problems[0][0] if problems else None)

    @classmethod
    def from_validation(cls, err: ValidationError) -> RequestError:
        problems = []
        for e in err.errors(include_url=False):
            field = ".".join(str(p) for p in e["loc"]) or "request"
            message = e["msg"].removeprefix("Value error, ")
            cause = (e.get("ctx") or {}).get("error")
            if isinstance(cause, DiffspeedError):  # our own checks word their message with the field already
                problems.append((cause.field or field, str(cause)))
                continue
            if e["type"] == "extra_forbidden":
                problems.append((field, f"{field}: not a request field (see GenerateRequest's fields)"))
                continue
            problems.append((field, f"{field}: {message[:1].lower()}{message[1:]}, got {_short(e.get('input'))}"))
        return cls(problems)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ------------------------------------------------------------------------------------------------ references
def image_reference(value):
    """A PIL image or an array -> a base64 PNG data URI; a ``Path`` -> its text; text and None as they are."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, PurePath):
        return str(value)
    image = _as_pil(value)
    if image is None:
        raise ValueError(f"must be an image file path, a base64 image, a PIL image or an array; got "
                         f"{type(value).__name__}")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)  # lossless: the pixels resolve back exactly
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _as_pil(value):
    from PIL import Image

    if isinstance(value, Image.Image):
        return value
    if type(value).__module__ == "numpy" and type(value).__name__ == "ndarray":
        import numpy as np

        arr = value if value.dtype == np.uint8 else (np.clip(value, 0, 1) * 255).round().astype(np.uint8)
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
            raise ValueError(f"an image array must be HxW or HxWxC (C = 1, 3 or 4); got shape {arr.shape}")
        return Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr)
    return None


def name_reference(value):
    """A ``Path`` -> its text; a loaded model is refused with what to do instead."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, PurePath):
        return str(value)
    raise ValueError(f"must be a shipped name or a folder path, got a {type(value).__name__} object; a request "
                     f"holds only data -- register a loaded model with Resolver.add(name, model) and pass the name")


ImageRef = Annotated[str | None, BeforeValidator(image_reference)]
NameRef = Annotated[str | None, BeforeValidator(name_reference)]


def is_inline_image(ref: str) -> bool:
    """Whether an image reference is a base64 image (a data URI, or raw base64 of a PNG/JPEG/WebP/GIF/BMP file)
    rather than a path; decides without touching the file system."""
    if ref.startswith("data:"):
        return True
    head = ref[:16]
    return len(ref) >= 64 and head.startswith(("iVBORw0KGgo", "/9j/", "UklGR", "R0lGOD", "Qk"))


# ------------------------------------------------------------------------------------------------ the request
class GenerateRequest(BaseModel):
    """What to generate: txt2img, img2img, inpaint or hires fix (whichever the fields ask for), each with an
    optional ControlNet, and txt2img with an optional SDXL refiner pass. Frozen; ``replace`` gives a validated
    copy. ``steps``, ``sampler`` and ``cfg_scale`` left out (None) are decided by
    :func:`diffspeed.generate.resolve_sampling`."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, validate_default=False)

    prompt: str = Field(description="what to draw")
    negative_prompt: str = Field("", description="what to steer away from")
    seed: int = Field(-1, ge=-1, le=MAX_SEED, description="-1: a random seed, reported in the result")
    steps: int | None = Field(None, ge=1, le=1000,
                              description="denoising steps, 1..1000 (default: the recipe's sampler steps, else 20)")
    cfg_scale: float | None = Field(None, ge=0.0, le=50.0, allow_inf_nan=False,
                                    description="classifier-free guidance, 0..50; <= 1 disables the unconditional "
                                    "pass (default: the shipped model's recommended scale from its card, else 7)")
    width: int | None = Field(None, ge=64, le=2048, multiple_of=8, description="pixels; None: the model's native")
    height: int | None = Field(None, ge=64, le=2048, multiple_of=8, description="pixels; None: the model's native")
    batch_size: int = Field(1, ge=1, le=64, description="images per call, seeds seed, seed+1, ...")
    sampler: str | None = Field(None, description=f"one of: {', '.join(SAMPLERS)} (default: the recipe's sampler, "
                                "else DPM++ 2M)")
    eta: float | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False,
                              description="the noise DDIM adds back (0 = deterministic) / TCD's gamma, 0..1 (default: "
                              "the sampler's or the accelerator's: DDIM 0, TCD 0.3); only samplers that read it")
    # img2img / inpaint
    init_image: ImageRef = Field(None, description="img2img: the start image (path or base64)")
    mask_image: ImageRef = Field(None, validate_default=True,
                                 description="inpaint: the mask, white = repaint (path or base64)")
    mask_invert: bool = Field(False, description="inpaint: repaint the black part of the mask instead")
    denoising_strength: float | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False,
                                             description="0..1; None: 0.75 (img2img/inpaint), 0.7 (hires pass)")
    mask_blur: int = Field(4, ge=0, le=64, description="pixels of Gaussian blur on the mask edge")
    inpaint_overlay: bool = Field(True, description="paste the original back outside the (blurred) mask")
    # hires fix (txt2img only)
    hires_scale: float = Field(1.0, ge=1.0, le=4.0, allow_inf_nan=False, validate_default=True,
                               description="hires fix upscale factor; 1 = off")
    hires_steps: int = Field(0, ge=0, le=1000, description="second-pass steps; 0 = steps")
    hires_upscaler: str = Field("Latent", description=f"one of: {', '.join(HIRES_UPSCALERS)}")
    # ControlNet
    controlnet: NameRef = Field(None, description="a shipped ControlNet name or a diffusers ControlNetModel folder")
    control_image: ImageRef = Field(None, validate_default=True, description="the control image (path or base64)")
    control_scale: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False, description="ControlNet weight")
    control_start: float = Field(0.0, ge=0.0, le=1.0, allow_inf_nan=False,
                                 description="fraction of the steps before control starts")
    control_end: float = Field(1.0, ge=0.0, le=1.0, allow_inf_nan=False, validate_default=True,
                               description="fraction of the steps after which control stops")
    # SDXL refiner
    refiner: NameRef = Field(None, validate_default=True, description="a shipped refiner name or an SDXL folder")
    refiner_switch_at: float = Field(0.8, ge=0.01, le=1.0, allow_inf_nan=False,
                                     description="fraction of the steps after which the refiner takes over")
    refiner_mode: str = Field("ensemble", description="ensemble (hand over noisy latents) or img2img")

    def __init__(self, /, **data: Any):
        try:
            super().__init__(**data)
        except ValidationError as err:
            raise RequestError.from_validation(err) from None

    @classmethod
    def from_data(cls, data: dict) -> GenerateRequest:
        """Validate a dict (e.g. a JSON line); problems raise :class:`RequestError`."""
        if not isinstance(data, dict):
            raise RequestError([("request", f"request: must be an object of fields, got {type(data).__name__}")])
        return cls(**data)

    def replace(self, **changes: Any) -> GenerateRequest:
        """A validated copy with ``changes``."""
        return type(self)(**{**self.model_dump(exclude_unset=True), **changes})

    # -- checks that need one field ------------------------------------------------------------------------
    @field_validator("sampler")
    @classmethod
    def _sampler(cls, v):
        if v is not None:
            get_sampler(v)
        return v

    @field_validator("eta")
    @classmethod
    def _eta_needs_sampler(cls, v, info: ValidationInfo):
        if info.data.get("sampler") is not None:
            check_eta(info.data["sampler"], v)
        return v

    @field_validator("hires_upscaler")
    @classmethod
    def _upscaler(cls, v):
        hires_upscaler(v)
        return v

    @field_validator("refiner_mode")
    @classmethod
    def _refiner_mode(cls, v):
        if v not in REFINER_MODES:
            raise DiffspeedError(f"refiner_mode must be one of {', '.join(REFINER_MODES)}; got {v!r}",
                                 field="refiner_mode")
        return v

    # -- checks across fields: each on the later field, so that all problems are reported at once -----------
    @field_validator("mask_image")
    @classmethod
    def _mask_needs_init(cls, v, info: ValidationInfo):
        if v is not None and info.data.get("init_image") is None and "init_image" in info.data:
            raise DiffspeedError("mask_image needs an init_image to inpaint", field="mask_image")
        return v

    @field_validator("hires_scale")
    @classmethod
    def _hires_is_txt2img(cls, v, info: ValidationInfo):
        if v > 1 and info.data.get("init_image") is not None:
            raise DiffspeedError("hires fix (hires_scale > 1) is a txt2img option; with an init_image use img2img "
                                 "at the size you want", field="hires_scale")
        return v

    @field_validator("control_image")
    @classmethod
    def _control_pair(cls, v, info: ValidationInfo):
        if "controlnet" not in info.data:  # its own problem is reported
            return v
        if v is not None and info.data["controlnet"] is None:
            raise DiffspeedError("control_image needs a controlnet to read it", field="control_image")
        if v is None and info.data["controlnet"] is not None:
            raise DiffspeedError("controlnet needs a control_image", field="controlnet")
        return v

    @field_validator("control_end")
    @classmethod
    def _control_window(cls, v, info: ValidationInfo):
        start = info.data.get("control_start")
        if start is not None and start >= v:
            raise DiffspeedError(f"control_end must be greater than control_start ({start}), got {v}",
                                 field="control_end")
        return v

    @field_validator("refiner")
    @classmethod
    def _refiner_is_txt2img(cls, v, info: ValidationInfo):
        if v is not None and (info.data.get("init_image") is not None or info.data.get("hires_scale", 1) > 1):
            raise DiffspeedError("refiner runs with txt2img; leave out init_image, mask_image and hires_scale",
                                 field="refiner")
        return v

    # -- derived --------------------------------------------------------------------------------------------
    @property
    def workflow(self) -> str:
        """"inpaint", "img2img", "hires" or "txt2img", from the fields that are set."""
        if self.mask_image is not None:
            return "inpaint"
        if self.init_image is not None:
            return "img2img"
        return "hires" if self.hires_scale > 1 else "txt2img"

    @property
    def strength(self) -> float:
        if self.denoising_strength is not None:
            return self.denoising_strength
        return 0.7 if self.workflow == "hires" else 0.75

    def batch_key(self) -> tuple:
        """What two requests must share to run as one pipeline call: everything but the prompts, the seed and
        the batch size -- and whether the negative prompt is empty (SDXL encodes an empty one as zeros)."""
        own = {"prompt", "negative_prompt", "seed", "batch_size"}
        return (bool(self.negative_prompt),) + tuple((k, v) for k, v in self.model_dump().items() if k not in own)
