"""Automatic colour check: does a generated image show what its prompt says?

Two measurements per image, both by nearest palette colour in RGB:
- background: the median colour of the pixels away from every named shape position (for a gradient, the top
  and bottom bands separately) must be the prompt's background colour;
- shape: at least ``SHAPE_FRACTION`` of a 9x9 patch at the stated position must be the stated shape colour.
Chance is ~1/9 for the background and ~1/8 for the shape (8 colours remain once the background is taken).

The image measures the tiny models' cards and tests report beside it (SSIM, saturation, mask IoU) are
:mod:`diffspeed.metrics`'s, imported here so that existing ``from diffspeed.tiny.check import ...`` keep working.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from diffspeed.metrics import foreground, mask_iou, saturation, ssim
from diffspeed.tiny.data import COLOURS, POSITIONS, SIZE, Scene

__all__ = ["foreground", "mask_iou", "saturation", "ssim", "nearest_colour", "score_image",
           "score_images", "run_colour_check", "CheckResult", "ImageScore", "SHAPE_FRACTION", "few_step_check",
           "SettingResult"]
SHAPE_FRACTION = 0.4
_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[n] for n in _NAMES], dtype=np.float32)


def nearest_colour(pixels: np.ndarray) -> np.ndarray:
    """Index into the palette of the nearest colour for each RGB row of ``pixels`` (N, 3)."""
    d = ((pixels[:, None, :].astype(np.float32) - _PALETTE[None]) ** 2).sum(-1)
    return d.argmin(1)


def _shape_mask(scene: Scene, radius: float) -> np.ndarray:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    mask = np.zeros((SIZE, SIZE), bool)
    for s in scene.shapes:
        cx, cy = POSITIONS[s.position]
        mask |= (xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2
    return mask


def _median_name(pixels: np.ndarray) -> str:
    return _NAMES[int(nearest_colour(np.median(pixels, axis=0, keepdims=True))[0])]


@dataclass(frozen=True)
class ImageScore:
    background_ok: bool
    shapes_ok: tuple[bool, ...]
    background_seen: str


def score_image(image: Image.Image | np.ndarray, scene: Scene) -> ImageScore:
    arr = np.asarray(image.convert("RGB").resize((SIZE, SIZE)) if isinstance(image, Image.Image) else image)
    free = ~_shape_mask(scene, radius=15.0)
    if len(scene.background) == 1:
        seen = _median_name(arr[free])
        bg_ok = seen == scene.background[0]
    else:
        band = np.zeros_like(free)
        band[:8] = True
        top = _median_name(arr[free & band])
        band = np.zeros_like(free)
        band[-8:] = True
        bottom = _median_name(arr[free & band])
        seen = f"{top}->{bottom}"
        bg_ok = (top, bottom) == tuple(scene.background)
    oks = []
    for s in scene.shapes:
        cx, cy = POSITIONS[s.position]
        patch = arr[cy - 4:cy + 5, cx - 4:cx + 5].reshape(-1, 3)
        frac = float((nearest_colour(patch) == _NAMES.index(s.colour)).mean())
        oks.append(frac >= SHAPE_FRACTION)
    return ImageScore(bg_ok, tuple(oks), seen)


@dataclass(frozen=True)
class CheckResult:
    images: int
    background_accuracy: float
    shape_accuracy: float

    def passes(self, background: float = 0.8, shape: float = 0.4) -> bool:
        return self.background_accuracy >= background and self.shape_accuracy >= shape


def score_images(images: list, scenes: list[Scene]) -> CheckResult:
    scores = [score_image(im, sc) for im, sc in zip(images, scenes, strict=True)]
    shapes = [ok for s in scores for ok in s.shapes_ok]
    return CheckResult(
        images=len(scores),
        background_accuracy=sum(s.background_ok for s in scores) / len(scores),
        shape_accuracy=sum(shapes) / len(shapes),
    )


def run_colour_check(pipe, scenes: list[Scene], *, steps: int = 25, guidance_scale: float = 7.5,
                     seed: int = 0, batch_size: int = 16) -> CheckResult:
    """Generate one image per scene's caption (seed ``seed + i``) with ``pipe`` and score them."""
    import torch

    images = []
    for start in range(0, len(scenes), batch_size):
        chunk = scenes[start:start + batch_size]
        gens = [torch.Generator("cpu").manual_seed(seed + start + i) for i in range(len(chunk))]
        out = pipe([s.caption() for s in chunk], num_inference_steps=steps, guidance_scale=guidance_scale,
                   generator=gens, output_type="pil")
        images.extend(out.images)
    return score_images(images, scenes)


@dataclass(frozen=True)
class SettingResult:
    """One setting of :func:`few_step_check`: adherence and end-to-end seconds per image."""

    name: str
    sampler: str
    steps: int
    cfg_scale: float
    background_accuracy: float
    shape_accuracy: float
    seconds_per_image: float
    denoiser_calls_per_image: float


def few_step_check(model: str = "tiny-sd", settings: dict | None = None, *, prompts: int = 60, seed: int = 0,
                   rounds: int = 1) -> list[SettingResult]:
    """The colour check of a few-step accelerator against the model's recommended setting, in one process.

    ``settings``: name -> (recipe configs, GenerateRequest fields); default: tiny-sd at its recommended 20
    DPM++ 2M steps (the card's CFG), the shipped LCM-LoRA at its 4 LCM steps, the same with the tiny VAE, and
    two controls without the LoRA (LCM sampler 4 steps; DPM++ 2M 4 steps). Every image is made with
    :func:`diffspeed.generate` (text encoding, denoising, VAE decode, PNG infotext: end to end) at batch size 1,
    prompt ``i`` with seed ``seed + i``; the seconds are the median over ``rounds`` passes of each setting's
    mean, the settings interleaved pass by pass so that machine drift hits them alike.
    """
    import statistics
    import time

    import diffspeed
    from diffspeed.core import Accelerated
    from diffspeed.generate import GenerateRequest, generate
    from diffspeed.optim.accelerator import AcceleratorConfig
    from diffspeed.optim.tiny_vae import TinyVaeConfig
    from diffspeed.tiny.data import held_out_scenes

    if settings is None:
        settings = {
            "tiny-sd, recommended (DPM++ 2M, 20 steps)": ((), {}),
            "lcm accelerator (4 steps)": ((AcceleratorConfig(method="lcm"),), {}),
            "lcm accelerator + tiny_vae": ((AcceleratorConfig(method="lcm"), TinyVaeConfig()), {}),
            "control: LCM sampler, no LoRA (4 steps, CFG 1)": ((), {"sampler": "LCM", "steps": 4, "cfg_scale": 1.0}),
            "control: DPM++ 2M, 4 steps": ((), {"steps": 4}),
        }
    scenes = held_out_scenes()[:prompts]
    pipe = diffspeed.load(model)
    pipe.set_progress_bar_config(disable=True)
    times: dict[str, list[float]] = {n: [] for n in settings}
    images: dict[str, list] = {}
    used: dict[str, tuple] = {}
    for _ in range(rounds):
        for name, (configs, fields) in settings.items():
            fast = Accelerated(pipe, list(configs))  # with no configs it only counts the denoiser calls
            try:
                out, calls, t0 = [], 0, time.perf_counter()
                for i, scene in enumerate(scenes):
                    r = generate(pipe, GenerateRequest(prompt=scene.caption(), seed=seed + i, **fields),
                                 runner=fast, progress=False)
                    out.append(r.images[0])
                    calls += r.stats.get("denoiser_calls", 0)
                times[name].append((time.perf_counter() - t0) / len(scenes))
                images[name] = out
                used[name] = (r.request.sampler, r.request.steps, r.request.cfg_scale, calls / len(scenes))
            finally:
                fast.remove()
    results = []
    for name in settings:
        check = score_images(images[name], scenes)
        sampler, steps, cfg, calls = used[name]
        results.append(SettingResult(name, sampler, steps, cfg, check.background_accuracy, check.shape_accuracy,
                                     statistics.median(times[name]), calls))
    return results
