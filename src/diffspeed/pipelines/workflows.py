"""The workflows beyond txt2img -- img2img, inpaint, hires fix -- on any loaded SD 1.x/2.x or SDXL pipeline.

Each workflow pipeline is built at call time with diffusers' ``from_pipe`` from the loaded pipeline's *current*
components, so it shares their weights (no copy) and sees whatever an applied optimization swapped in (a tiny
VAE, another scheduler, hooks on the UNet).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from diffspeed.errors import DiffspeedError

# web-UI names of the hires-fix upscalers -> (kind, mode): latent upscalers resize the latents before the second
# pass; image upscalers decode, resize the picture, and encode again.
HIRES_UPSCALERS: dict[str, tuple[str, str]] = {
    "Latent": ("latent", "bilinear"),
    "Latent (antialiased)": ("latent", "bilinear-antialias"),
    "Latent (bicubic)": ("latent", "bicubic"),
    "Latent (nearest)": ("latent", "nearest"),
    "Lanczos": ("image", "lanczos"),
    "Nearest": ("image", "nearest"),
}


def hires_upscaler(name: str) -> tuple[str, str]:
    for known, spec in HIRES_UPSCALERS.items():
        if name.lower() == known.lower():
            return spec
    raise DiffspeedError(f"hires_upscaler must be one of {', '.join(HIRES_UPSCALERS)}; got {name!r}",
                         field="hires_upscaler")


def canonical_upscaler(name: str) -> str:
    hires_upscaler(name)
    return next(k for k in HIRES_UPSCALERS if k.lower() == name.lower())


def workflow_pipeline(pipe, kind: str):
    """A pipeline for ``kind`` ("txt2img", "img2img", "inpaint") sharing ``pipe``'s current components."""
    if kind == "txt2img":
        return pipe
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

    cls = {"img2img": AutoPipelineForImage2Image, "inpaint": AutoPipelineForInpainting}[kind]
    sub = cls.from_pipe(pipe)
    if hasattr(pipe, "diffspeed_model"):
        sub.diffspeed_model = pipe.diffspeed_model
    return sub


def load_image(value, field: str, mode: str = "RGB") -> Image.Image:
    """An image from a PIL image, a path, or an HxWxC uint8 / float [0, 1] array; clear error otherwise."""
    if isinstance(value, Image.Image):
        return value.convert(mode)
    if isinstance(value, np.ndarray):
        arr = value if value.dtype == np.uint8 else (np.clip(value, 0, 1) * 255).round().astype(np.uint8)
        return Image.fromarray(arr).convert(mode)
    if isinstance(value, (str, Path)):
        path = Path(value).expanduser()
        if not path.is_file():
            raise DiffspeedError(f"{field}: no such image file: {path}", field=field)
        try:
            with Image.open(path) as im:
                return im.convert(mode)
        except (OSError, ValueError) as err:
            raise DiffspeedError(f"{field}: cannot read {path} as an image ({err})", field=field) from err
    raise DiffspeedError(f"{field} must be an image file path, a PIL image or an array; got "
                         f"{type(value).__name__}", field=field)


def fit_size(image: Image.Image, width: int | None, height: int | None) -> tuple[int, int]:
    """The output size: the given one, else the image's own rounded down to a multiple of 8 (at least 64)."""
    w = width or max(64, image.width // 8 * 8)
    h = height or max(64, image.height // 8 * 8)
    if w > 2048 or h > 2048:
        raise DiffspeedError(f"init_image is {image.width}x{image.height}; the output size must be at most "
                             f"2048x2048 -- pass width and height", field="init_image")
    return w, h


def prepare_mask(mask: Image.Image, size: tuple[int, int], blur: int) -> Image.Image:
    """The mask as "L" at ``size`` (white = repaint), softened by a Gaussian of radius ``blur`` pixels."""
    mask = mask.convert("L").resize(size, Image.Resampling.LANCZOS)
    return mask.filter(ImageFilter.GaussianBlur(blur)) if blur > 0 else mask


def paste_outside_mask(original: Image.Image, generated: Image.Image, mask: Image.Image) -> Image.Image:
    """The web UI's overlay: keep the original pixels where the (blurred) mask is black."""
    return Image.composite(generated.convert("RGB"), original.convert("RGB"), mask)


@torch.no_grad()
def vae_round_trip(pipe, images: list[Image.Image]) -> list[Image.Image]:
    """Encode and decode through the pipeline's VAE: what denoising strength 0 gives (the input, within VAE
    error), without running the denoiser at all."""
    vae = pipe.vae
    device = vae.device
    x = pipe.image_processor.preprocess(images).to(device=device, dtype=vae.dtype)
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    if upcast:
        vae = vae.to(torch.float32)
        x = x.float()
    try:
        z = vae.encode(x).latent_dist.mode()
        out = vae.decode(z).sample
    finally:
        if upcast:
            pipe.vae.to(torch.float16)
    return pipe.image_processor.postprocess(out.float(), output_type="pil")


def upscale_latents(latents: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Resize latents (N, C, h, w) to the latent grid of ``size`` (width, height in pixels // 8 already)."""
    w, h = size
    if mode == "bilinear-antialias":
        return F.interpolate(latents, size=(h, w), mode="bilinear", antialias=True)
    if mode == "nearest":
        return F.interpolate(latents, size=(h, w), mode="nearest")
    return F.interpolate(latents, size=(h, w), mode=mode, align_corners=False)


def upscale_images(images: list[Image.Image], size: tuple[int, int], mode: str) -> list[Image.Image]:
    resample = {"lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST}[mode]
    return [im.resize(size, resample) for im in images]
