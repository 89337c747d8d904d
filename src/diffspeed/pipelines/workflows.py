"""The workflows beyond txt2img -- img2img, inpaint, hires fix, ControlNet, the SDXL refiner -- on any loaded
SD 1.x/2.x or SDXL pipeline.

Each workflow pipeline is built at call time with diffusers' ``from_pipe`` from the loaded pipeline's *current*
components, so it shares their weights (no copy) and sees whatever an applied optimization swapped in (a tiny
VAE, another scheduler, hooks on the UNet). ControlNets and refiners are loaded per call (or handed in as
loaded objects): nothing is cached in module globals.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image, ImageFilter

from diffspeed._lazy import lazy_import
from diffspeed.errors import DiffspeedError

# the CLI's help reads HIRES_UPSCALERS; torch and numpy load when an image or tensor is handled
np = lazy_import("numpy")
torch = lazy_import("torch")

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


def workflow_pipeline(pipe, kind: str, controlnet=None):
    """A pipeline for ``kind`` ("txt2img", "img2img", "inpaint") sharing ``pipe``'s current components; with a
    loaded ``controlnet``, the matching ControlNet pipeline (StableDiffusion[XL]ControlNet[Img2Img|Inpaint])."""
    if kind == "txt2img" and controlnet is None:
        return pipe
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting, AutoPipelineForText2Image

    cls = {"txt2img": AutoPipelineForText2Image, "img2img": AutoPipelineForImage2Image,
           "inpaint": AutoPipelineForInpainting}[kind]
    sub = cls.from_pipe(pipe) if controlnet is None else cls.from_pipe(pipe, controlnet=controlnet)
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
        return _open_image(path, field, mode)
    raise DiffspeedError(f"{field} must be an image file path, a PIL image or an array; got "
                         f"{type(value).__name__}", field=field)


def _open_image(path: Path, field: str, mode: str) -> Image.Image:
    """Decode ``path``, refusing what PIL flags as a decompression bomb: a small file that would expand to
    gigabytes of pixels (PIL only warns below twice its limit; that is an error here too)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return im.convert(mode)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise DiffspeedError(f"{field}: {path} has more than {Image.MAX_IMAGE_PIXELS:,} pixels (the "
                             f"decompression-bomb limit); give a smaller image", field=field) from err
    except (OSError, ValueError, SyntaxError, EOFError) as err:  # PIL's plugins raise all of these on bad data
        raise DiffspeedError(f"{field}: cannot read {path} as an image ({err})", field=field) from err


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
        with torch.no_grad():  # (as a decorator, torch.no_grad would import torch with this module)
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
        return torch.nn.functional.interpolate(latents, size=(h, w), mode="bilinear", antialias=True)
    if mode == "nearest":
        return torch.nn.functional.interpolate(latents, size=(h, w), mode="nearest")
    return torch.nn.functional.interpolate(latents, size=(h, w), mode=mode, align_corners=False)


def upscale_images(images: list[Image.Image], size: tuple[int, int], mode: str) -> list[Image.Image]:
    resample = {"lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST}[mode]
    return [im.resize(size, resample) for im in images]


# ------------------------------------------------------------------------------------------------ ControlNet
SHIPPED_CONTROLNETS = {"tiny-sd-controlnet-mask": "sd", "tiny-sdxl-controlnet-mask": "sdxl"}  # name -> family


def controlnet_dir(spec: str | Path) -> Path:
    """The folder of a ControlNet given as a shipped name or a path; a clear error if it is not one."""
    from diffspeed.pipelines.load import shipped_path

    path = (shipped_path(str(spec), field="controlnet") if str(spec) in SHIPPED_CONTROLNETS
            else Path(spec).expanduser())
    if not (path / "config.json").is_file():
        hint = (f" (not in this install: tools/train_tiny_extras.py controlnet --family "
                f"{SHIPPED_CONTROLNETS[str(spec)]} trains it there)" if str(spec) in SHIPPED_CONTROLNETS else "")
        raise DiffspeedError(f"controlnet: no diffusers ControlNetModel folder (with config.json) at {path}{hint}; "
                             f"give such a folder or a shipped name: {', '.join(SHIPPED_CONTROLNETS)}",
                             field="controlnet")
    return path


def load_controlnet(spec, pipe):
    """A ``ControlNetModel`` for ``pipe``: ``spec`` is a loaded one, a shipped name or a folder. Loaded in the
    UNet's dtype on its device, and checked to fit the UNet (a ControlNet adds residuals to its blocks)."""
    from diffusers import ControlNetModel

    if isinstance(spec, ControlNetModel):
        model = spec
    else:
        path = controlnet_dir(spec)
        try:
            model = ControlNetModel.from_pretrained(path, dtype=pipe.unet.dtype)
        except (OSError, ValueError, KeyError) as err:
            raise DiffspeedError(f"controlnet: could not load {path}: {err}", field="controlnet") from err
    want, got = pipe.unet.config, model.config
    for key in ("cross_attention_dim", "block_out_channels", "addition_embed_type"):
        if _as_tuple(want.get(key)) != _as_tuple(got.get(key)):
            raise DiffspeedError(f"controlnet {spec if isinstance(spec, (str, Path)) else type(spec).__name__} "
                                 f"does not fit this model: its {key} is {got.get(key)}, the UNet's is "
                                 f"{want.get(key)} (a ControlNet is made for one model family)", field="controlnet")
    if model.dtype != pipe.unet.dtype:  # (a dtype in to() makes diffusers warn even when nothing changes)
        model = model.to(dtype=pipe.unet.dtype)
    return model.to(device=pipe.unet.device)


def _as_tuple(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value


# ------------------------------------------------------------------------------------------------ refiner
def is_sdxl(pipe) -> bool:
    return getattr(pipe.unet.config, "addition_embed_type", None) == "text_time"


def refiner_dir(spec: str | Path) -> Path:
    """The diffusers folder of a refiner given as a shipped name or a path; a clear error if it is not one."""
    from diffspeed.pipelines.load import SHIPPED, shipped_path

    path = shipped_path(str(spec), field="refiner") if str(spec) in SHIPPED else Path(spec).expanduser()
    if not (path / "model_index.json").is_file():
        raise DiffspeedError(f"refiner: no diffusers pipeline folder (with model_index.json) at {path}; give an "
                             f"SDXL refiner folder or the shipped tiny-sdxl-refiner", field="refiner")
    return path


def load_refiner(spec, base):
    """An SDXL img2img pipeline for the refiner pass of ``base`` (an SDXL pipeline).

    ``spec`` is a loaded pipeline, a shipped name or a folder. A loaded refiner shares ``base``'s current VAE
    (the latents handed over must decode with the VAE that made them -- also a tiny VAE an optimization swapped
    in) and ``base``'s text_encoder_2 when the two folders hold identical weights (as SDXL 1.0 base and
    refiner do), so neither is loaded twice. Its other modules go to ``base``'s device and dtype.
    """
    from diffusers import AutoPipelineForImage2Image, DiffusionPipeline

    if not is_sdxl(base):
        raise DiffspeedError("refiner: the refiner pass needs an SDXL base model; this model is not SDXL "
                             "(SD 1.x/2.x have no refiner -- use hires fix or img2img instead)", field="refiner")
    if isinstance(spec, DiffusionPipeline):
        refiner = spec
    else:
        from diffspeed.pipelines.load import SHIPPED, ModelInfo, model_hash

        path = refiner_dir(spec)
        shared = {"vae": base.vae}
        base_dir = getattr(getattr(base, "diffspeed_model", None), "path", None)
        te2 = [d / "text_encoder_2" for d in (Path(base_dir) if base_dir else None, path) if d is not None]
        if (len(te2) == 2 and all(d.is_dir() for d in te2) and _weight_bytes(te2[0]) == _weight_bytes(te2[1])
                and model_hash(te2[0]) == model_hash(te2[1])):
            shared["text_encoder_2"] = base.text_encoder_2
        try:
            refiner = DiffusionPipeline.from_pretrained(path, dtype=base.unet.dtype, local_files_only=True,
                                                        **shared)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise DiffspeedError(f"refiner: could not load {path}: {err}", field="refiner") from err
        for module in refiner.components.values():
            if isinstance(module, torch.nn.Module) and all(module is not m for m in shared.values()):
                module.to(base._execution_device)
        shipped = str(spec) in SHIPPED
        refiner.diffspeed_model = ModelInfo(str(spec) if shipped else path.name, path,
                                            "shipped" if shipped else "directory")
    if not is_sdxl(refiner) or getattr(refiner, "text_encoder_2", None) is None:
        raise DiffspeedError("refiner: the refiner must be an SDXL pipeline (text_encoder_2 and text_time "
                             "conditioning)", field="refiner")
    if refiner.unet.config.in_channels != base.unet.config.in_channels:
        raise DiffspeedError(f"refiner: its UNet takes {refiner.unet.config.in_channels} latent channels, the "
                             f"base makes {base.unet.config.in_channels}", field="refiner")
    if not type(refiner).__name__.endswith("Img2ImgPipeline"):
        info = getattr(refiner, "diffspeed_model", None)
        refiner = AutoPipelineForImage2Image.from_pipe(refiner)
        if info is not None:
            refiner.diffspeed_model = info
    return refiner


def _weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.suffix in (".safetensors", ".bin") and p.is_file())
