"""Text-to-image generation with validated, web-UI-style settings and PNG output that carries them."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from diffspeed import __version__
from diffspeed.errors import DiffspeedError, check_range
from diffspeed.pipelines.samplers import get_sampler
from diffspeed.pngmeta import format_parameters, save_png

MAX_SEED = 2**32 - 1


@dataclass(frozen=True, kw_only=True)
class GenerateRequest:
    prompt: str
    negative_prompt: str = ""
    seed: int = -1  # -1: a random seed, reported in the result and the PNG
    steps: int = 20  # denoising steps, 1..1000 (the schedules are trained with 1000)
    cfg_scale: float = 7.0  # classifier-free guidance scale, 0..50; <= 1 disables the unconditional pass
    width: int | None = None  # pixels, a multiple of 8 in 64..2048; None: the model's native size
    height: int | None = None
    batch_size: int = 1  # images per call, 1..64, seeds seed, seed+1, ...
    sampler: str = "DPM++ 2M"  # a web-UI sampler name, see diffspeed.pipelines.samplers.SAMPLERS

    def __post_init__(self):
        if not isinstance(self.prompt, str):
            raise DiffspeedError(f"prompt must be text, got {type(self.prompt).__name__}", field="prompt")
        check_range("seed", self.seed, -1, MAX_SEED)
        check_range("steps", self.steps, 1, 1000)
        check_range("cfg_scale", self.cfg_scale, 0.0, 50.0, kind=float)
        check_range("batch_size", self.batch_size, 1, 64)
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None:
                check_range(name, value, 64, 2048)
                if value % 8:
                    raise DiffspeedError(f"{name} must be a multiple of 8 in [64, 2048], got {value}", field=name)
        get_sampler(self.sampler)


@dataclass
class GenerateResult:
    images: list
    seeds: list[int]
    parameters: list[str]  # the web-UI "parameters" text of each image
    seconds: float
    steps_per_second: float
    stats: dict = field(default_factory=dict)

    @property
    def seconds_per_image(self) -> float:
        return self.seconds / len(self.images)


def native_size(pipe) -> tuple[int, int]:
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return (size, size) if isinstance(size, int) else tuple(size)


def generate(pipe, request: GenerateRequest, *, progress: bool = True, runner=None) -> GenerateResult:
    """Run ``request`` on ``pipe`` (or on ``runner``, a callable like it, e.g. an accelerated pipeline).

    The pipeline's scheduler is swapped for the requested sampler for this call only.
    """
    w0, h0 = native_size(pipe)
    width, height = request.width or w0, request.height or h0
    seed = request.seed if request.seed >= 0 else random.randint(0, MAX_SEED - request.batch_size)
    seeds = [(seed + i) % (MAX_SEED + 1) for i in range(request.batch_size)]
    device = pipe._execution_device
    gens = [torch.Generator("cpu" if device.type == "mps" else device).manual_seed(s) for s in seeds]
    sampler = get_sampler(request.sampler)
    original = pipe.scheduler
    pipe.scheduler = sampler.build(original.config)
    pipe.set_progress_bar_config(disable=not progress)
    try:
        t0 = time.perf_counter()
        out = (runner or pipe)(
            prompt=[request.prompt] * request.batch_size,
            negative_prompt=[request.negative_prompt] * request.batch_size if request.negative_prompt else None,
            num_inference_steps=request.steps, guidance_scale=request.cfg_scale, width=width, height=height,
            generator=gens)
        seconds = time.perf_counter() - t0
    finally:
        pipe.scheduler = original
    info = getattr(pipe, "diffspeed_model", None)
    params = [format_parameters(request.prompt, request.negative_prompt, {
        "Steps": request.steps, "Sampler": sampler.name, "CFG scale": request.cfg_scale, "Seed": s,
        "Size": f"{width}x{height}", **({"Model hash": info.hash, "Model": info.name} if info else {}),
        "Version": f"diffspeed {__version__}"}) for s in seeds]
    return GenerateResult(list(out.images), seeds, params, seconds, request.steps / seconds)


def save_images(result: GenerateResult, folder: str | Path) -> list[Path]:
    """Write each image as ``NNNNN-<seed>.png`` with its parameters chunk; never overwrites a file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n = len(list(folder.glob("*.png")))
    paths = []
    for image, seed, params in zip(result.images, result.seeds, result.parameters, strict=True):
        while (path := folder / f"{n:05d}-{seed}.png").exists():
            n += 1
        paths.append(save_png(image, path, params))
        n += 1
    return paths
