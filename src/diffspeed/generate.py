"""Text-to-image generation with validated, web-UI-style settings and PNG output that carries them."""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from PIL import Image, ImageOps

from diffspeed import __version__
from diffspeed._io import write_beside
from diffspeed._lazy import lazy_import
from diffspeed.errors import DiffspeedError, DiffspeedRuntimeError
from diffspeed.pipelines.lora import lora_parameters
from diffspeed.pipelines.samplers import check_eta, get_sampler
from diffspeed.pipelines.workflows import (
    canonical_upscaler,
    fit_size,
    hires_upscaler,
    paste_outside_mask,
    prepare_mask,
    upscale_images,
    upscale_latents,
    vae_round_trip,
    workflow_pipeline,
)
from diffspeed.pngmeta import format_parameters, save_png
from diffspeed.request import MAX_SEED, REFINER_MODES, GenerateRequest, RequestError  # noqa: F401 (re-exported)

torch = lazy_import("torch")  # validating a request must not load torch (the CLI's fast error path)

DEFAULT_STEPS = 20
DEFAULT_SAMPLER = "DPM++ 2M"
DEFAULT_CFG = 7.0  # the web UI's default, for models without a card that recommends another


@dataclass
class GenerateResult:
    images: list
    seeds: list[int]
    parameters: list[str]  # the web-UI "parameters" text of each image
    seconds: float
    steps_per_second: float
    stats: dict = field(default_factory=dict)  # the runner's statistics, summed over every pass
    events: list[str] = field(default_factory=list)  # notes: NaN fallbacks, no effect, a prompt cut at 77 tokens
    request: GenerateRequest | None = None  # the request as it ran: seed, steps, sampler and cfg_scale filled in

    @property
    def seconds_per_image(self) -> float:
        return self.seconds / len(self.images)


class Sampling(NamedTuple):
    """What one call samples with; see :func:`resolve_sampling`."""

    sampler: str
    steps: int
    cfg_scale: float
    eta: float | None = None  # the call's eta, for samplers that read one (DDIM, TCD); None otherwise


def recipe_sampler(recipe):
    """The config of ``recipe``'s ``sampler`` optimization, or None."""
    return next((c for c in getattr(recipe, "optimizations", ()) if c.name == "sampler"), None)


def recipe_accelerator(recipe):
    """The config of ``recipe``'s ``accelerator`` optimization, or None."""
    return next((c for c in getattr(recipe, "optimizations", ()) if c.name == "accelerator"), None)


def recipe_sets_scheduler(recipe) -> bool:
    """Whether the recipe puts its own scheduler in place (a sampler optimization naming one, an accelerator),
    which a call then keeps instead of building the request's sampler."""
    return getattr(recipe_sampler(recipe), "sampler", None) is not None or recipe_accelerator(recipe) is not None


def resolve_sampling(request: GenerateRequest, recipe=None, pipe=None) -> Sampling:
    """The one rule for the sampler, the step count, the CFG scale and eta of a call (CLI, Python and server).

    A value the request gives is used, unless the recipe's ``sampler`` optimization sets a different one: that
    is an error naming both, since neither can be right silently. A value only the recipe sets is the
    recipe's. A value nobody sets is the default: 20 steps, DPM++ 2M, and the CFG scale the shipped model's
    card recommends (:func:`default_cfg`).

    A recipe's ``accelerator`` (a step-distilled LoRA) sets the sampler it was distilled for -- a request naming
    another is an error -- and recommends steps, CFG and eta: the request's own steps, CFG scale and eta win
    (:func:`sampling_notes` says so in the result's events).
    """
    acc = recipe_accelerator(recipe)
    if acc is not None:
        from diffspeed.optim.accelerator import recommended

        rec = recommended(acc)
        sampler = _pick("sampler", _canonical(request.sampler), rec.sampler, rec.sampler,
                        f"the recipe's accelerator ({acc.method}, distilled for it)")
        steps = request.steps if request.steps is not None else rec.steps
        cfg = request.cfg_scale if request.cfg_scale is not None else rec.cfg_scale
        eta = request.eta if request.eta is not None else rec.eta
    else:
        config = recipe_sampler(recipe)
        sampler = _pick("sampler", _canonical(request.sampler), _canonical(getattr(config, "sampler", None)),
                        DEFAULT_SAMPLER)
        steps = _pick("steps", request.steps, getattr(config, "steps", None), DEFAULT_STEPS)
        cfg = request.cfg_scale if request.cfg_scale is not None else default_cfg(pipe)
        eta = request.eta
    check_eta(sampler, eta)
    return Sampling(sampler, steps, float(cfg), eta if eta is not None else get_sampler(sampler).eta)


def sampling_notes(request: GenerateRequest, recipe=None) -> list[str]:
    """Events for a request that overrides what the recipe's accelerator recommends (the request wins)."""
    acc = recipe_accelerator(recipe)
    if acc is None:
        return []
    from diffspeed.optim.accelerator import METHODS, recommended

    rec, notes = recommended(acc), []
    for label, asked, own in (("steps", request.steps, rec.steps), ("cfg_scale", request.cfg_scale, rec.cfg_scale),
                              ("eta", request.eta, rec.eta)):
        if asked is not None and own is not None and asked != own:
            notes.append(f"accelerator {acc.method}: {label} {asked} as asked, instead of the recommended {own} "
                         f"({METHODS[acc.method].source})")
    return notes


def _canonical(name: str | None) -> str | None:
    return None if name is None else get_sampler(name).name


def _pick(name: str, asked, recipe_value, default, who: str = "the recipe's sampler optimization"):
    if asked is not None and recipe_value is not None and asked != recipe_value:
        raise DiffspeedError(f"{name}: the request asks for {asked!r} but {who} sets {recipe_value!r}; leave one "
                             "out", field=name)
    return asked if asked is not None else recipe_value if recipe_value is not None else default


def default_cfg(pipe) -> float:
    """The CFG scale a shipped model's card recommends, else the web UI's 7."""
    info = getattr(pipe, "diffspeed_model", None)
    if info is None or info.kind != "shipped" or info.path is None:
        return DEFAULT_CFG
    return _card_cfg(str(info.path))


def _card_cfg(folder: str) -> float:
    """The card's recommended guidance (:func:`card_recommended_cfg`), else the web UI's 7."""
    cfg = card_recommended_cfg(folder)
    return DEFAULT_CFG if cfg is None else cfg


@functools.lru_cache(maxsize=16)
def card_recommended_cfg(folder: str) -> float | None:
    """``training.json`` -> ``final_check.recommended_cfg``: the guidance at which the trained tiny model
    passed its acceptance check (tiny-sd: 3; its card's guidance sweep shows shapes fail at 7.5); None when the
    folder's card names none."""
    try:
        card = json.loads((Path(folder) / "training.json").read_text())
    except (OSError, ValueError):
        return None
    cfg = card.get("final_check", {}).get("recommended_cfg")
    return None if cfg is None else float(cfg)


def native_size(pipe) -> tuple[int, int]:
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return (size, size) if isinstance(size, int) else tuple(size)


def generate(pipe, request: GenerateRequest, *, progress: bool = True, runner=None, preset: str | None = None,
             resolver=None, on_step=None) -> GenerateResult:
    """Run ``request`` on ``pipe``: txt2img, img2img, inpaint or hires fix, whichever its fields ask for, each
    with a ControlNet if the request names one, and txt2img with an SDXL refiner pass.

    ``runner`` is an :class:`~diffspeed.core.accelerate.Accelerated` wrapping ``pipe`` (or any callable like
    the pipeline, for txt2img only). Sampler, steps and CFG scale follow :func:`resolve_sampling`; the
    scheduler is swapped for the sampler for this call only, unless the runner's recipe chose the sampler
    (then the recipe's scheduler runs). ``result.stats`` sums the runner's statistics over every pass (hires
    fix makes two). The refiner has its own UNet, so the recipe does not apply to it: its pass runs directly
    and its UNet calls are counted in ``stats["refiner_denoiser_calls"]``. ``preset``: the name of the preset
    the runner's recipe came from, for the infotext (which records the recipe itself either way).

    ``resolver``: the :class:`~diffspeed.resolve.Resolver` that turns the request's images, ControlNet and
    refiner into objects (a fresh one, accepting paths, if None). ``on_step(i, n)``: called after every
    denoising step (``i`` of ``n`` in the current pass); if it returns true the call stops early: the rest of
    each pass is skipped and the images are decoded from where it stopped (the web UI's interrupt).

    A call whose VAE decode returned NaN/inf and left an image black raises ``DiffspeedRuntimeError``.
    """
    return generate_batch(pipe, [request], progress=progress, runner=runner, preset=preset, resolver=resolver,
                          on_step=on_step)[0]


def generate_batch(pipe, requests: list[GenerateRequest], *, progress: bool = True, runner=None,
                   preset: str | None = None, resolver=None, on_step=None) -> list[GenerateResult]:
    """Run several compatible requests (equal :meth:`GenerateRequest.batch_key`) as one pipeline call, each
    image with its own prompt and seed; one result per request, each as :func:`generate` gives it alone (the
    same latents; batched matrix products may round the last bit differently). Arguments as :func:`generate`.
    """
    if not requests:
        return []
    first = requests[0]
    for other in requests[1:]:
        if other.batch_key() != first.batch_key():
            raise DiffspeedError("generate_batch: the requests differ in more than prompt, negative prompt, seed "
                                 "and batch size; run them separately", field="requests")
    from diffspeed.resolve import Resolver

    resolver = resolver if resolver is not None else Resolver()
    resolver.check(first)
    recipe = getattr(runner, "recipe", None)
    sampling = resolve_sampling(first, recipe, pipe)
    kind = first.workflow
    notes = sampling_notes(first, recipe)
    if hasattr(runner, "check_workflows"):  # reject what the recipe cannot do before any work starts
        notes += runner.check_workflows([kind] + (["lora"] if lora_parameters(pipe) else [])
                                       + (["controlnet"] if first.controlnet is not None else [])
                                       + (["refiner"] if first.refiner is not None else []))
    resolved, groups = [], []
    for r in requests:
        seed = r.seed if r.seed >= 0 else random.randint(0, MAX_SEED - r.batch_size)
        resolved.append(r.replace(seed=seed, **sampling._asdict()))
        groups.append([(seed + i) % (MAX_SEED + 1) for i in range(r.batch_size)])
    request = resolved[0]
    seeds = [s for g in groups for s in g]
    cuts = [_long_prompts(pipe, r) for r in resolved]
    sampler = get_sampler(request.sampler)
    control = _Control.load(pipe, request, resolver) if request.controlnet is not None else None
    refiner = None  # loaded once per call; switch_at 1.0 means the refiner never runs
    if request.refiner is not None and request.refiner_switch_at < 1.0:
        refiner = resolver.refiner(request.refiner, pipe)
    run = _Runner(pipe, runner, seeds, control, on_step)
    negatives = [r.negative_prompt for r, g in zip(resolved, groups) for _ in g]
    common = dict(prompt=[r.prompt for r, g in zip(resolved, groups) for _ in g],
                  negative_prompt=negatives if request.negative_prompt else None,
                  guidance_scale=request.cfg_scale, **({"eta": request.eta} if request.eta is not None else {}))
    original = pipe.scheduler
    if not recipe_sets_scheduler(recipe):  # else the recipe's scheduler is in place
        pipe.scheduler = sampler.build(original.config)
    refiner_scheduler = refiner.scheduler if refiner is not None else None
    if refiner is not None:
        refiner.scheduler = sampler.build(refiner_scheduler.config)
    bars = _bar_configs(pipe, refiner)
    pipe.set_progress_bar_config(disable=not progress)
    try:
        with _NanWatch(pipe, refiner) as watch:
            t0 = time.perf_counter()
            if kind == "txt2img":
                width, height = _txt2img_size(pipe, request)
                images, steps_done, extra = _txt2img(pipe, request, run, common, (width, height), refiner)
            elif kind == "hires":
                images, (width, height), steps_done, extra = _hires(pipe, request, run, common)
            else:
                images, (width, height), steps_done, extra = _img2img(pipe, request, run, common, kind, resolver)
            seconds = time.perf_counter() - t0
    finally:
        pipe.scheduler = original
        if refiner is not None:
            refiner.scheduler = refiner_scheduler
        _restore_bar_configs(bars)
    watch.check(images)
    if control is not None:
        extra = {**extra, "ControlNet 0": control.parameters()}
    if request.refiner is not None and refiner is None:
        extra = {**extra, "Refiner switch at": 1.0}  # asked for, but switching at the very end: never ran
    images = list(images)
    stats = dict(run.stats)
    if run.stopped:  # the infotext says what was asked; the events say it did not all run
        run.events.append(f"stopped early at step {run.stopped_at[0]} of {run.stopped_at[1]} of a pass (interrupt)")
    if len(requests) > 1:
        stats["batched_requests"] = len(requests)
    results, at = [], 0
    for r, group, (truncated, cut_notes) in zip(resolved, groups, cuts):
        params = _infotext(pipe, r, group, (width, height), {**extra, **truncated}, recipe, preset)
        results.append(GenerateResult(images[at:at + len(group)], group, params, seconds,
                                      steps_done / seconds if seconds else 0.0, stats=dict(stats),
                                      events=notes + cut_notes + run.events, request=r))
        at += len(group)
    return results


def _bar_configs(*pipes) -> list[tuple[Any, Any]]:
    """Each pipeline's progress-bar setting, which a call changes (``progress``) and must give back."""
    return [(p, p.__dict__.get("_progress_bar_config", _UNSET)) for p in pipes if p is not None]


def _restore_bar_configs(saved: list[tuple[Any, Any]]) -> None:
    for p, bar in saved:
        if bar is _UNSET:
            p.__dict__.pop("_progress_bar_config", None)
        else:
            p._progress_bar_config = bar


_UNSET = object()


def _infotext(pipe, request: GenerateRequest, seeds: list[int], size: tuple[int, int], extra: dict, recipe,
              preset: str | None) -> list[str]:
    """Each image's parameters text: the web UI's entries, then what else changed the image -- LoRA weights,
    the preset and recipe, the device and load dtype -- so that :mod:`diffspeed.reproduce` can redo it."""
    info = getattr(pipe, "diffspeed_model", None)
    head = {"Steps": request.steps, "Sampler": request.sampler, "CFG scale": request.cfg_scale,
            **({"Eta": request.eta} if request.eta is not None and request.eta != get_sampler(request.sampler).eta
               else {})}
    tail = {**({"Model hash": info.hash, "Model": info.name} if info else {}), **extra, **lora_parameters(pipe)}
    if preset:
        tail["Diffspeed preset"] = preset
    if recipe is not None and recipe.optimizations:
        tail["Diffspeed recipe"] = json.dumps(recipe.to_dict()["optimization"], separators=(",", ":"))
    tail["Device"] = str(pipe._execution_device)
    dtype = _load_dtype(pipe, recipe)
    tail.update({"Dtype": dtype} if dtype else {})
    tail["Version"] = f"diffspeed {__version__}"
    batch = len(seeds) > 1
    return [format_parameters(request.prompt, request.negative_prompt, {
        **head, "Seed": s, "Size": f"{size[0]}x{size[1]}",
        **({"Batch size": len(seeds), "Batch pos": i} if batch else {}), **tail}) for i, s in enumerate(seeds)]


_DTYPE_NAMES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def _load_dtype(pipe, recipe) -> str | None:
    """The dtype the pipeline was loaded in (the ``--dtype`` that reproduces it): that of a component the
    recipe's precision optimization leaves alone; None when it casts them all."""
    precision = next((c for c in getattr(recipe, "optimizations", ()) if c.name == "precision"), None)
    for part in ("text_encoder", "text_encoder_2", "vae", "unet"):
        module = getattr(pipe, part, None)
        if module is not None and getattr(precision, part.removesuffix("_2"), None) is None:
            name = str(module.dtype).removeprefix("torch.")
            return _DTYPE_NAMES.get(name, name)
    return None


def _long_prompts(pipe, request: GenerateRequest) -> tuple[dict, list[str]]:
    """Infotext entries and events for a prompt longer than the text encoder reads (CLIP: 77 tokens with the
    start and end tokens); diffusers cuts it silently, the web UI would have chunked it."""
    tokenizers = [t for t in (getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_2", None)) if t is not None]
    if not tokenizers:
        return {}, []
    limit = min(t.model_max_length for t in tokenizers)
    entries, events = {}, []
    for label, text in (("Prompt", request.prompt), ("Negative prompt", request.negative_prompt)):
        n = len(tokenizers[0].tokenize(text)) + tokenizers[0].num_special_tokens_to_add() if text else 0
        if n > limit:
            entries[f"{label} truncated"] = f"{n} tokens"
            events.append(f"{label.lower()} is {n} tokens; the text encoder reads the first {limit}, the rest is "
                          f"ignored")
    return entries, events


class _NanWatch:
    """Notes whether a VAE decode of the call returned NaN/inf (a forward hook on each VAE's decoder, removed
    on exit), and makes black images from such a call an error instead of a success.

    NaN pixels turn black when diffusers converts the decoded image to 8 bits, so "black and the decoder saw
    NaN/inf" is the failure, while a black image from a finite decode is just a black image. The precision
    optimization's ``nan_guard`` re-decodes such images in fp32; its images are not black, so that documented
    re-run stays a success.
    """

    def __init__(self, *pipes):
        decoders = [getattr(getattr(p, "vae", None), "decoder", None) for p in pipes if p is not None]
        self.decoders = list({id(d): d for d in decoders if d is not None}.values())
        self.nonfinite = False

    def __enter__(self) -> _NanWatch:
        self.handles = [d.register_forward_hook(self._seen) for d in self.decoders]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()

    def _seen(self, module, args, out) -> None:
        sample = out if isinstance(out, torch.Tensor) else out[0]
        if not self.nonfinite and not bool(torch.isfinite(sample).all()):
            self.nonfinite = True

    def check(self, images) -> None:
        if not self.nonfinite:
            return
        black = [i for i, im in enumerate(images) if isinstance(im, Image.Image) and im.getbbox() is None]
        if black:
            raise DiffspeedRuntimeError(
                f"{len(black)} of {len(images)} image(s) came out black: the VAE decode returned NaN/inf, a "
                f"numerical overflow (most often a half-precision VAE); decode in fp32 -- the precision "
                f"optimization with vae = \"fp32\" or nan_guard = true -- or run with --dtype fp32")


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
    def load(cls, pipe, request: GenerateRequest, resolver) -> _Control:
        from diffspeed.pipelines.load import model_hash

        spec = request.controlnet
        model = resolver.controlnet(spec, pipe)
        path = Path(getattr(model.config, "_name_or_path", "") or "")
        if (path / "config.json").is_file():
            name, digest = (spec if Path(spec).name == spec else path.name), model_hash(path)[:8]
        else:  # a loaded model registered under a name
            name, digest = spec, ""
        return cls(model, resolver.image(request.control_image, "control_image"), name, digest,
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

    def __init__(self, pipe, runner, seeds: list[int], control: _Control | None = None, on_step=None):
        self.pipe, self.runner, self.seeds, self.control, self.on_step = pipe, runner, seeds, control, on_step
        self.stopped = False  # on_step asked to stop: every later pass stops at its first step too
        self.stopped_at = (0, 0)
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
            return refiner(**kwargs, **self._callback(), generator=self._generators())
        finally:
            handle.remove()
            self.stats.update(calls)

    def _generators(self) -> list[torch.Generator]:
        return [torch.Generator(self.gen_device).manual_seed(s) for s in self.seeds]

    def _callback(self) -> dict:
        """diffusers' ``callback_on_step_end`` reporting each step to ``on_step`` and stopping the pass (its
        ``_interrupt`` flag: the remaining steps are skipped, the latents so far are decoded) when asked."""
        if self.on_step is None:
            return {}

        def step_end(pipeline, i, t, tensors):
            n = getattr(pipeline, "_num_timesteps", None) or i + 1
            if self.stopped or self.on_step(i + 1, n):
                if not self.stopped:
                    self.stopped, self.stopped_at = True, (i + 1, n)
                pipeline._interrupt = True
            return tensors

        return {"callback_on_step_end": step_end}

    def __call__(self, target, continues: bool = False, more: bool = False, **kwargs):
        """Run one pass; ``continues`` marks a pass that carries on from the previous one (hires fix's second
        pass), which optimizations may use (deepcache's ``hires_reuse``); ``more``: another pass continues this one
        (the runner's effect check waits for it)."""
        gens = self._generators()
        kwargs.update(self._callback())
        target.set_progress_bar_config(disable=self.pipe._progress_bar_config.get("disable", False))
        if self.runner is None:
            return target(**kwargs, generator=gens)
        if hasattr(self.runner, "run"):
            out = self.runner.run(target, **kwargs, generator=gens, continues=continues, check_effect=not more)
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


def _img2img(pipe, request: GenerateRequest, run: _Runner, common: dict, kind: str, resolver):
    init = resolver.image(request.init_image, "init_image")
    size = fit_size(init, request.width, request.height)
    _check_multiple(pipe, size)
    if init.size != size:
        init = init.resize(size, Image.Resampling.LANCZOS)  # the web UI's "Just resize"
    strength = request.strength
    n = len(run.seeds)
    extra: dict[str, Any] = {"Denoising strength": strength}
    mask = None
    if kind == "inpaint":
        mask = resolver.image(request.mask_image, "mask_image", mode="L")
        if request.mask_invert:
            mask = ImageOps.invert(mask)
            extra["Mask mode"] = "Inpaint not masked"  # the web UI's words for an inverted mask
        mask = prepare_mask(mask, size, request.mask_blur)
        extra["Mask blur"] = request.mask_blur
        if not request.inpaint_overlay:
            extra["Inpaint overlay"] = False  # changes the pixels outside the mask, so the infotext says it
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
    steps2, strength = request.hires_steps or request.steps, request.strength
    if _denoising_steps(steps2, strength) < 1:  # diffusers' img2img cannot run a pass of no steps
        raise DiffspeedError(f"denoising_strength: the hires pass would run int({steps2} steps x {strength:g}) = 0 "
                             f"steps; raise denoising_strength or hires_steps", field="denoising_strength")
    _check_multiple(pipe, big)
    kind, mode = hires_upscaler(request.hires_upscaler)
    first = run(run.pipeline("txt2img"), more=True, **common, num_inference_steps=request.steps, width=width,
                height=height,
                output_type="latent" if kind == "latent" else "pil",
                **run.control_kwargs("txt2img", (width, height))).images
    if kind == "latent":
        f = pipe.vae_scale_factor
        image = upscale_latents(first, (big[0] // f, big[1] // f), mode)
    else:
        image = upscale_images(list(first), big, mode)
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
    """Write each image as ``NNNNN-<seed>.png`` with its parameters chunk; never overwrites a file, also when
    several processes write into one folder: each name is taken with an exclusive create (the check and the
    take are one step), the PNG is written under a temporary name in the folder and renamed onto it, so the
    name never holds half an image. A failed write removes both and raises ``DiffspeedRuntimeError``."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        n = _next_number(folder)
    except OSError as err:
        raise DiffspeedRuntimeError(f"out: cannot write into {folder}: {err.strerror or err}", field="out") from err
    paths = []
    for image, seed, params in zip(result.images, result.seeds, result.parameters, strict=True):
        path, n = _reserve(folder, n, seed)
        _write_onto(path, image, params)
        paths.append(path)
        n += 1
    return paths


_NUMBERED = re.compile(r"(\d{5,})-")


def _next_number(folder: Path) -> int:
    """One past the highest ``NNNNN-`` number in ``folder`` (counting files would reuse a number after a
    deletion); only a starting point, the exclusive create decides."""
    with os.scandir(folder) as entries:
        return 1 + max((int(m.group(1)) for e in entries if (m := _NUMBERED.match(e.name))), default=-1)


def _reserve(folder: Path, n: int, seed: int) -> tuple[Path, int]:
    """Take the first free name ``NNNNN-<seed>.png`` from number ``n`` on, with O_CREAT | O_EXCL."""
    while True:
        path = folder / f"{n:05d}-{seed}.png"
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return path, n
        except FileExistsError:
            n += 1
        except OSError as err:
            raise DiffspeedRuntimeError(f"out: cannot create {path}: {err.strerror or err}", field="out") from err


def _write_onto(path: Path, image, params: str) -> None:
    """Write the PNG beside the reserved ``path`` and rename it onto it; on failure the reservation goes too."""
    try:
        write_beside(path, lambda partial: save_png(image, partial, params), field="out")
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
