"""Text-to-image generation with validated, web-UI-style settings and PNG output that carries them."""

from __future__ import annotations

import copy
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from diffspeed import __version__
from diffspeed.errors import DiffspeedError, check_range
from diffspeed.pipelines.lora import lora_parameters
from diffspeed.pipelines.samplers import get_sampler
from diffspeed.pipelines.workflows import (
    canonical_upscaler,
    controlnet_dir,
    fit_size,
    hires_upscaler,
    load_controlnet,
    load_image,
    load_refiner,
    paste_outside_mask,
    prepare_mask,
    refiner_dir,
    upscale_images,
    upscale_latents,
    vae_round_trip,
    workflow_pipeline,
)
from diffspeed.pngmeta import format_parameters, save_png

MAX_SEED = 2**32 - 1
REFINER_MODES = ("ensemble", "img2img")


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
    # img2img / inpaint: an init image (path, PIL image or array) and, for inpaint, a mask (white = repaint)
    init_image: Any = None
    mask_image: Any = None
    denoising_strength: float | None = None  # 0..1; None: 0.75 for img2img / inpaint, 0.7 for the hires pass
    mask_blur: int = 4  # pixels of Gaussian blur on the mask edge, 0..64 (the web UI's "Mask blur")
    inpaint_overlay: bool = True  # paste the original back outside the (blurred) mask, as the web UI does
    # hires fix (txt2img only): a first pass at width x height, upscale, then an img2img pass at the new size
    hires_scale: float = 1.0  # 1 = off; 1..4
    hires_steps: int = 0  # second-pass steps, 0 = the same as steps
    hires_upscaler: str = "Latent"  # see diffspeed.pipelines.workflows.HIRES_UPSCALERS
    # ControlNet (any workflow): a control image (path, PIL image or array) and the ControlNet that reads it --
    # a diffusers ControlNetModel folder, a shipped name ("tiny-sd-controlnet-mask") or a loaded ControlNetModel
    control_image: Any = None
    controlnet: Any = None
    control_scale: float = 1.0  # 0..2, the web UI's "Control Weight"; 0 = the plain image
    control_start: float = 0.0  # 0..1, fraction of the steps before control starts ("Starting Control Step")
    control_end: float = 1.0  # 0..1, fraction of the steps after which control stops ("Ending Control Step")
    # SDXL refiner (txt2img): a shipped name ("tiny-sdxl-refiner"), an SDXL folder or a loaded pipeline
    refiner: Any = None  # None: off
    refiner_switch_at: float = 0.8  # 0.01..1, fraction of the steps after which the refiner takes over; 1 = off
    refiner_mode: str = "ensemble"  # "ensemble": hand over the noisy latents; "img2img": refine the finished image

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
        if self.denoising_strength is not None:
            check_range("denoising_strength", self.denoising_strength, 0.0, 1.0, kind=float)
        check_range("mask_blur", self.mask_blur, 0, 64)
        check_range("hires_scale", self.hires_scale, 1.0, 4.0, kind=float)
        check_range("hires_steps", self.hires_steps, 0, 1000)
        hires_upscaler(self.hires_upscaler)
        for name in ("init_image", "mask_image"):  # fail before any model is loaded
            value = getattr(self, name)
            if isinstance(value, (str, Path)) and not Path(value).expanduser().is_file():
                raise DiffspeedError(f"{name}: no such image file: {value}", field=name)
        if self.mask_image is not None and self.init_image is None:
            raise DiffspeedError("mask_image needs an init_image to inpaint", field="mask_image")
        if self.hires_scale > 1 and self.init_image is not None:
            raise DiffspeedError("hires fix (hires_scale > 1) is a txt2img option; with an init_image use "
                                 "img2img at the size you want", field="hires_scale")
        self._check_controlnet()
        self._check_refiner()

    def _check_controlnet(self) -> None:
        check_range("control_scale", self.control_scale, 0.0, 2.0, kind=float)
        check_range("control_start", self.control_start, 0.0, 1.0, kind=float)
        check_range("control_end", self.control_end, 0.0, 1.0, kind=float)
        if self.control_start >= self.control_end:
            raise DiffspeedError(f"control_end must be greater than control_start ({self.control_start}), got "
                                 f"{self.control_end}", field="control_end")
        if self.control_image is not None and self.controlnet is None:
            raise DiffspeedError("control_image needs a controlnet to read it", field="control_image")
        if self.controlnet is not None and self.control_image is None:
            raise DiffspeedError("controlnet needs a control_image", field="controlnet")
        if isinstance(self.control_image, (str, Path)) and not Path(self.control_image).expanduser().is_file():
            raise DiffspeedError(f"control_image: no such image file: {self.control_image}", field="control_image")
        if isinstance(self.controlnet, (str, Path)):
            controlnet_dir(self.controlnet)  # fail before any model is loaded

    def _check_refiner(self) -> None:
        check_range("refiner_switch_at", self.refiner_switch_at, 0.01, 1.0, kind=float)
        if self.refiner_mode not in REFINER_MODES:
            raise DiffspeedError(f"refiner_mode must be one of {', '.join(REFINER_MODES)}; got "
                                 f"{self.refiner_mode!r}", field="refiner_mode")
        if self.refiner is None:
            return
        if isinstance(self.refiner, (str, Path)):
            refiner_dir(self.refiner)
        if self.init_image is not None or self.hires_scale > 1:
            raise DiffspeedError("refiner runs with txt2img; leave out init_image, mask_image and hires_scale",
                                 field="refiner")

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


@dataclass
class GenerateResult:
    images: list
    seeds: list[int]
    parameters: list[str]  # the web-UI "parameters" text of each image
    seconds: float
    steps_per_second: float
    stats: dict = field(default_factory=dict)  # the runner's statistics, summed over every pass
    events: list[str] = field(default_factory=list)  # notes from the optimizations (NaN fallbacks, no effect)

    @property
    def seconds_per_image(self) -> float:
        return self.seconds / len(self.images)


def native_size(pipe) -> tuple[int, int]:
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return (size, size) if isinstance(size, int) else tuple(size)


def generate(pipe, request: GenerateRequest, *, progress: bool = True, runner=None) -> GenerateResult:
    """Run ``request`` on ``pipe``: txt2img, img2img, inpaint or hires fix, whichever its fields ask for, each
    with a ControlNet if the request names one, and txt2img with an SDXL refiner pass.

    ``runner`` is an :class:`~diffspeed.core.accelerate.Accelerated` wrapping ``pipe`` (or any callable like
    the pipeline, for txt2img only). The pipeline's scheduler is swapped for the requested sampler for this
    call only. ``result.stats`` sums the runner's statistics over every pass (hires fix makes two). The
    refiner has its own UNet, so the recipe does not apply to it: its pass runs directly and its UNet calls are
    counted in ``stats["refiner_denoiser_calls"]``.
    """
    kind = request.workflow
    notes = []
    if hasattr(runner, "check_workflows"):  # reject what the recipe cannot do before any work starts
        notes = runner.check_workflows([kind] + (["lora"] if lora_parameters(pipe) else [])
                                       + (["controlnet"] if request.controlnet is not None else [])
                                       + (["refiner"] if request.refiner is not None else []))
    seed = request.seed if request.seed >= 0 else random.randint(0, MAX_SEED - request.batch_size)
    seeds = [(seed + i) % (MAX_SEED + 1) for i in range(request.batch_size)]
    sampler = get_sampler(request.sampler)
    control = _Control.load(pipe, request) if request.controlnet is not None else None
    refiner = None  # loaded once per call; switch_at 1.0 means the refiner never runs
    if request.refiner is not None and request.refiner_switch_at < 1.0:
        refiner = load_refiner(request.refiner, pipe)
    run = _Runner(pipe, runner, seeds, control)
    common = dict(prompt=[request.prompt] * request.batch_size,
                  negative_prompt=[request.negative_prompt] * request.batch_size if request.negative_prompt else None,
                  guidance_scale=request.cfg_scale)
    extra: dict[str, Any] = {}
    original = pipe.scheduler
    pipe.scheduler = sampler.build(original.config)
    refiner_scheduler = refiner.scheduler if refiner is not None else None
    if refiner is not None:
        refiner.scheduler = sampler.build(refiner_scheduler.config)
    pipe.set_progress_bar_config(disable=not progress)
    try:
        t0 = time.perf_counter()
        if kind == "txt2img":
            width, height = _txt2img_size(pipe, request)
            images, steps_done, extra = _txt2img(pipe, request, run, common, (width, height), refiner)
        elif kind == "hires":
            images, (width, height), steps_done, extra = _hires(pipe, request, run, common)
        else:
            images, (width, height), steps_done, extra = _img2img(pipe, request, run, common, kind)
        seconds = time.perf_counter() - t0
    finally:
        pipe.scheduler = original
        if refiner is not None:
            refiner.scheduler = refiner_scheduler
    info = getattr(pipe, "diffspeed_model", None)
    if control is not None:
        extra = {**extra, "ControlNet 0": control.parameters()}
    if request.refiner is not None and refiner is None:
        extra = {**extra, "Refiner switch at": 1.0}  # asked for, but switching at the very end: never ran
    params = [format_parameters(request.prompt, request.negative_prompt, {
        "Steps": request.steps, "Sampler": sampler.name, "CFG scale": request.cfg_scale, "Seed": s,
        "Size": f"{width}x{height}", **({"Model hash": info.hash, "Model": info.name} if info else {}),
        **extra, **lora_parameters(pipe), "Version": f"diffspeed {__version__}"}) for s in seeds]
    return GenerateResult(list(images), seeds, params, seconds, steps_done / seconds if seconds else 0.0,
                          stats=dict(run.stats), events=notes + run.events)


@dataclass
class _Control:
    """A loaded ControlNet with its control image and settings, for every pass of one call."""

    model: Any
    image: Image.Image
    name: str
    hash: str
    scale: float
    start: float
    end: float

    @classmethod
    def load(cls, pipe, request: GenerateRequest) -> _Control:
        from diffspeed.pipelines.load import model_hash

        spec = request.controlnet
        model = load_controlnet(spec, pipe)
        if isinstance(spec, (str, Path)):
            path = controlnet_dir(spec)
            name, digest = (str(spec) if path.name == str(spec) else path.name), model_hash(path)[:8]
        else:
            name, digest = Path(getattr(model.config, "_name_or_path", "") or type(model).__name__).name, ""
        return cls(model, load_image(request.control_image, "control_image"), name, digest,
                   request.control_scale, request.control_start, request.control_end)

    def kwargs(self, kind: str, size: tuple[int, int], n: int) -> dict:
        """The ControlNet arguments of a ``kind`` pass at ``size``: the control image resized to the output
        (the web UI's "Just Resize"), under the name that pipeline kind expects."""
        image = self.image if self.image.size == size else self.image.resize(size, Image.Resampling.BILINEAR)
        return {"image" if kind == "txt2img" else "control_image": [image] * n,
                "controlnet_conditioning_scale": self.scale, "control_guidance_start": self.start,
                "control_guidance_end": self.end}

    def parameters(self) -> str:
        """The web UI ControlNet extension's infotext entry (no preprocessor: "Module: none")."""
        model = f"{self.name} [{self.hash}]" if self.hash else self.name
        return (f"Module: none, Model: {model}, Weight: {self.scale}, Resize Mode: Just Resize, "
                f"Guidance Start: {self.start}, Guidance End: {self.end}")


class _Runner:
    """Calls a (workflow) pipeline directly or through the accelerated runner, with fresh seeded generators
    per pass, and sums the runner's statistics over the passes."""

    def __init__(self, pipe, runner, seeds: list[int], control: _Control | None = None):
        self.pipe, self.runner, self.seeds, self.control = pipe, runner, seeds, control
        self.stats: Counter = Counter()
        self.events: list[str] = []
        device = pipe._execution_device
        self.gen_device = "cpu" if device.type == "mps" else device

    def pipeline(self, kind: str):
        """The workflow pipeline of ``kind`` for this call, with the request's ControlNet if it has one."""
        return workflow_pipeline(self.pipe, kind, self.control.model if self.control else None)

    def control_kwargs(self, kind: str, size: tuple[int, int]) -> dict:
        return self.control.kwargs(kind, size, len(self.seeds)) if self.control else {}

    def refine(self, refiner, **kwargs):
        """The refiner pass. The refiner has its own UNet, which the accelerated runner's recipe was not applied
        to (``Accelerated.run`` only runs pipelines sharing its UNet), so it runs directly; its UNet calls are
        counted in ``stats["refiner_denoiser_calls"]``."""
        calls: Counter = Counter()
        handle = refiner.unet.register_forward_pre_hook(lambda *_: calls.update(["refiner_denoiser_calls"]))
        refiner.set_progress_bar_config(disable=self.pipe._progress_bar_config.get("disable", False))
        try:
            return refiner(**kwargs, generator=self._generators())
        finally:
            handle.remove()
            self.stats.update(calls)

    def _generators(self) -> list[torch.Generator]:
        return [torch.Generator(self.gen_device).manual_seed(s) for s in self.seeds]

    def __call__(self, target, continues: bool = False, **kwargs):
        """Run one pass; ``continues`` marks a pass that carries on from the previous one (hires fix's second
        pass), which optimizations may use (deepcache's ``hires_reuse``)."""
        gens = self._generators()
        target.set_progress_bar_config(disable=self.pipe._progress_bar_config.get("disable", False))
        if self.runner is None:
            return target(**kwargs, generator=gens)
        if hasattr(self.runner, "run"):
            out = self.runner.run(target, **kwargs, generator=gens, continues=continues)
            self.stats.update(getattr(self.runner, "stats", {}))
            self.events += getattr(self.runner, "events", [])
            return out
        if target is not self.pipe:
            raise DiffspeedError("a plain callable runner only runs plain txt2img; pass an Accelerated runner",
                                 field="runner")
        return self.runner(**kwargs, generator=gens)


def _txt2img(pipe, request: GenerateRequest, run: _Runner, common: dict, size: tuple[int, int], refiner):
    kwargs = dict(common, num_inference_steps=request.steps, width=size[0], height=size[1],
                  **run.control_kwargs("txt2img", size))
    target = run.pipeline("txt2img")
    if refiner is None:
        return run(target, **kwargs).images, request.steps, {}
    return _refined(request, run, target, kwargs, refiner, common)


def _refined(request: GenerateRequest, run: _Runner, target, kwargs: dict, refiner, common: dict):
    """The base pass, then the refiner (see ``GenerateRequest.refiner_mode``); the latents are handed over
    as they are in both modes, so no VAE round trip comes between the passes."""
    switch, steps = request.refiner_switch_at, request.steps
    info = getattr(refiner, "diffspeed_model", None)
    extra = {"Refiner": f"{info.name} [{info.hash}]" if info else type(refiner).__name__,
             "Refiner switch at": switch}
    if request.refiner_mode == "img2img":
        extra["Refiner mode"] = "img2img"
    if request.refiner_mode == "ensemble":
        if _steps_after(refiner.scheduler, steps, switch) == 0:  # the switch lies past the last step
            return run(target, **kwargs).images, steps, extra
        latents = run(target, **kwargs, denoising_end=switch, output_type="latent").images
        out = run.refine(refiner, **common, image=latents, num_inference_steps=steps, denoising_start=switch)
        return out.images, steps, extra
    strength = round(1.0 - switch, 9)  # 1 - 0.8 is 0.19999999999999996: 10 steps would refine only 1
    n_refine = _denoising_steps(steps, strength)
    if n_refine == 0:
        return run(target, **kwargs).images, steps, extra
    latents = run(target, **kwargs, output_type="latent").images
    out = run.refine(refiner, **common, image=latents, strength=strength, num_inference_steps=steps)
    return out.images, steps + n_refine, extra


def _steps_after(scheduler, steps: int, switch: float) -> int:
    """How many of ``steps`` timesteps fall after ``switch`` (diffusers' ``denoising_start`` cut-off)."""
    sched = copy.deepcopy(scheduler)
    sched.set_timesteps(steps, device="cpu")
    cutoff = round(sched.config.num_train_timesteps * (1 - switch))
    return int((sched.timesteps < cutoff).sum())


def _txt2img_size(pipe, request: GenerateRequest) -> tuple[int, int]:
    w0, h0 = native_size(pipe)
    return request.width or w0, request.height or h0


def _denoising_steps(steps: int, strength: float) -> int:
    """Steps an img2img pass actually runs (diffusers and the web UI both run ``int(steps * strength)``)."""
    return min(int(steps * strength), steps)


def _img2img(pipe, request: GenerateRequest, run: _Runner, common: dict, kind: str):
    init = load_image(request.init_image, "init_image")
    size = fit_size(init, request.width, request.height)
    _check_multiple(pipe, size)
    if init.size != size:
        init = init.resize(size, Image.Resampling.LANCZOS)  # the web UI's "Just resize"
    strength = request.strength
    n = request.batch_size
    extra: dict[str, Any] = {"Denoising strength": strength}
    mask = None
    if kind == "inpaint":
        mask = prepare_mask(load_image(request.mask_image, "mask_image", mode="L"), size, request.mask_blur)
        extra["Mask blur"] = request.mask_blur
    steps_done = _denoising_steps(request.steps, strength)
    if steps_done == 0:  # nothing to denoise: the init image through the VAE, as every step is skipped
        images = vae_round_trip(pipe, [init] * n)
    elif kind == "img2img" and strength >= 1.0:
        # full strength starts from pure noise, as txt2img does: diffusers' img2img would noise the init image
        # to its first timestep, where SD's schedule still keeps ~7-15 % of it
        images = run(run.pipeline("txt2img"), **common, num_inference_steps=request.steps, width=size[0],
                     height=size[1], **run.control_kwargs("txt2img", size)).images
    else:
        sub = run.pipeline(kind)
        kwargs = dict(common, image=[init] * n, strength=strength, num_inference_steps=request.steps,
                      **run.control_kwargs(kind, size))
        if kind == "inpaint":
            kwargs.update(mask_image=[mask] * n, width=size[0], height=size[1])
        images = run(sub, **kwargs).images
    if mask is not None and request.inpaint_overlay:
        images = [paste_outside_mask(init, im, mask) for im in images]
    return images, size, steps_done, extra


def _hires(pipe, request: GenerateRequest, run: _Runner, common: dict):
    width, height = _txt2img_size(pipe, request)
    big = (round(width * request.hires_scale / 8) * 8, round(height * request.hires_scale / 8) * 8)
    if max(big) > 2048:
        raise DiffspeedError(f"hires_scale {request.hires_scale} makes {big[0]}x{big[1]}; the hires size must "
                             f"be at most 2048x2048", field="hires_scale")
    _check_multiple(pipe, big)
    kind, mode = hires_upscaler(request.hires_upscaler)
    first = run(run.pipeline("txt2img"), **common, num_inference_steps=request.steps, width=width, height=height,
                output_type="latent" if kind == "latent" else "pil",
                **run.control_kwargs("txt2img", (width, height))).images
    if kind == "latent":
        f = pipe.vae_scale_factor
        image = upscale_latents(first, (big[0] // f, big[1] // f), mode)
    else:
        image = upscale_images(list(first), big, mode)
    steps2 = request.hires_steps or request.steps
    strength = request.strength
    second = run(run.pipeline("img2img"), continues=True, **common, image=image, strength=strength,
                 num_inference_steps=steps2, **run.control_kwargs("img2img", big)).images
    extra = {"Denoising strength": strength, "Hires upscale": request.hires_scale,
             **({"Hires steps": request.hires_steps} if request.hires_steps else {}),
             "Hires upscaler": canonical_upscaler(request.hires_upscaler)}
    return second, big, request.steps + _denoising_steps(steps2, strength), extra


def _check_multiple(pipe, size: tuple[int, int]) -> None:
    f = pipe.vae_scale_factor
    for name, v in zip(("width", "height"), size):
        if v % 8 or v % f:
            raise DiffspeedError(f"{name} must be a multiple of {max(8, f)}, got {v}", field=name)


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
