"""staged: encode every prompt, then denoise, then decode, freeing each component once its phase is over.

Seed 001's "batching" for a list of prompts (the SDXL optimization guide): all text encoding first, then the
text encoders are released; all denoising (``batch_size`` prompts at a time), then the UNet is released; then
the VAE decodes everything. The three big components are never needed at once, so the denoise phase runs
without the text encoders' weights and the decode phase without the UNet's: peak memory drops by their size.

Released components keep their very ``Parameter`` objects; only the storage behind them moves out, and the
same bytes, dtype and strides come back after the call (also when it fails):

- a component on an accelerator moves to host memory;
- a component on the CPU is written to a spill file (``spill_dir``) and its memory is given back to the OS --
  keeping the tensors anywhere else in the process would free nothing. Put the folder on a disk: on a tmpfs
  the bytes still occupy RAM (the "released" event says so).

Images: the pipeline itself runs each chunk (``prompt_embeds=...``, ``output_type="latent"``), and one more
pipeline call decodes all latents in one VAE call: its ``prepare_latents`` hands it the finished latents and its
``interrupt`` flag skips the denoising loop, so the decode, upcasting, watermark and safety checker are the
pipeline's own code (none of it is copied here; a diffusers release that stops honouring either hook makes the
call fail loudly, never decode differently). The images are the plain pipeline's for the same seeds: bit for
bit when one chunk holds every prompt (``batch_size`` >= their number); otherwise to float rounding, because CPU
GEMM/convolution kernels take different code paths at different batch sizes (measured on tiny-sd/tiny-sdxl:
max |diff| ~2e-5 on [0, 1] pixels, from the time embedding's Linear at batch 2 vs 6; GPU kernels may do the
same). Several chunks sharing one generator get the plain pipeline's initial noise (the first chunk's
``prepare_latents`` draws it for all prompts at once, as the plain call does); a sampler that draws fresh noise
every step then draws it per chunk, which an event reports -- pass one generator per prompt for the plain
pipeline's noise everywhere. Combine with ``vae_slicing`` to bound the decode's memory.

Each chunk is a fresh run for ``RunState`` (its step counter restarts); ``stats["denoiser_calls"]`` counts
them all. Stateful optimizations that cache across steps must key their caches on ``state.step``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import inspect
from pathlib import Path

from diffspeed._lazy import lazy_import
from diffspeed.core import Edits, OptConfig, Optimization, RunState, param, register
from diffspeed.core.spill import make_spill_dir, remove_spill_dir
from diffspeed.errors import DiffspeedError

torch = lazy_import("torch")

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
_ENCODE_ONLY = ("prompt", "prompt_2", "negative_prompt", "negative_prompt_2", "clip_skip")
# inputs that are batched per image in ways this file does not split: such calls run unstaged
_UNSPLIT = ("ip_adapter_image", "ip_adapter_image_embeds", "prompt_embeds", "negative_prompt_embeds",
            "pooled_prompt_embeds", "negative_pooled_prompt_embeds")


@dataclasses.dataclass(frozen=True, kw_only=True)
class StagedConfig(OptConfig):
    name = "staged"
    batch_size: int = param(1, "prompts denoised together; more is faster on GPUs, fewer keeps activations "
                               "small", range=(1, 64))
    release: bool = param(True, "free the text encoders while denoising and the UNet while decoding; False only "
                                "reorders the work")
    spill_dir: str | None = param(None, "folder for released CPU weights (None: the system temp folder); must be "
                                        "on a disk, not a tmpfs", kind=str)


# ------------------------------------------------------------------------------------------- releasing
class _Released:
    """One module's tensors moved out of its memory; ``restore()`` puts the same bytes back into the very same
    tensor objects. Storages are handled once each, so views and tied weights stay shared."""

    def __init__(self, module: torch.nn.Module, spill: Path):
        self.entries: list[tuple] = []  # (tensor, storage key, offset, size, stride)
        self.storages: dict[tuple, tuple] = {}  # key -> (device, nbytes, host copy or file offset)
        self.module_id = id(module)
        self.path = spill / f"{id(module):x}.bin"
        self.nbytes = 0
        seen = set()
        for t in [*module.parameters(), *module.buffers()]:
            data = t.data
            if id(t) in seen or data.numel() == 0 or data.device.type == "meta":
                continue
            seen.add(id(t))
            storage = data.untyped_storage()
            key = (storage.data_ptr(), str(data.device))
            if key not in self.storages:
                self.storages[key] = (data.device, storage.nbytes(), storage)
                self.nbytes += storage.nbytes()
            self.entries.append((t, key, data.storage_offset(), tuple(data.shape), data.stride()))
        self.where = "disk" if any(_to_disk(dev) for dev, _, _ in self.storages.values()) else "host memory"
        self._move_out()

    def _move_out(self) -> None:
        f, offset = None, 0
        try:
            for key, (dev, nbytes, storage) in self.storages.items():
                if _to_disk(dev):
                    f = f or open(self.path, "wb")
                    f.write(memoryview(_bytes_of(storage).numpy()))
                    self.storages[key] = (dev, nbytes, offset)
                    offset += nbytes
                else:
                    host = torch.UntypedStorage(nbytes)
                    _bytes_of(host).copy_(_bytes_of(storage))
                    self.storages[key] = (dev, nbytes, host)
        finally:
            if f is not None:
                f.close()
        for t, *_ in self.entries:  # the last references to the old storages: their memory is freed here
            t.data = torch.empty(0, dtype=t.dtype, device=t.device)

    def restore(self) -> None:
        rebuilt = {}
        f = open(self.path, "rb") if self.path.exists() else None
        try:
            for key, (dev, nbytes, where) in self.storages.items():
                if isinstance(where, int):
                    new = torch.UntypedStorage(nbytes)
                    f.seek(where)
                    _read_into(f, _bytes_of(new).numpy())
                else:
                    new = torch.UntypedStorage(nbytes, device=dev)
                    _bytes_of(new).copy_(_bytes_of(where))
                rebuilt[key] = new
        finally:
            if f is not None:
                f.close()
        for t, key, offset, size, stride in self.entries:
            t.data = torch.empty(0, dtype=t.dtype, device=t.device).set_(rebuilt[key], offset, size, stride)
        self.storages.clear()
        self.path.unlink(missing_ok=True)


def _to_disk(device: torch.device) -> bool:
    """Weights in host memory can only be freed by writing them out; accelerator weights wait in host memory."""
    return device.type == "cpu"


def _bytes_of(storage: torch.UntypedStorage) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


def _read_into(f, buf) -> None:
    view, done = memoryview(buf).cast("B"), 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            raise OSError(f"staged: spill file {f.name} ended early")
        done += n


def _give_back_to_os() -> None:
    """glibc keeps freed heap pages mapped; ``malloc_trim`` returns them, so the freed weights leave RSS."""
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _on_tmpfs(path: Path) -> bool:
    """Whether ``path`` lives on a RAM-backed file system (longest matching mount point in /proc/self/mounts)."""
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/self/mounts").read_text().splitlines()]
    except OSError:
        return False
    path, best = str(path.resolve()), ("", "")
    for point, kind in mounts:
        if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) > len(best[0]):
            best = (point, kind)
    return best[1] in ("tmpfs", "ramfs")


# ------------------------------------------------------------------------------------------- the call
def _family(pipe) -> str | None:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if isinstance(pipe, StableDiffusionXLPipeline):
        return "sdxl"
    if isinstance(pipe, StableDiffusionPipeline):
        return "sd"
    return None


@register
class Staged(Optimization):
    Config = StagedConfig
    summary = "for a list of prompts: encode all, free text encoders, denoise all, free UNet, decode all"
    conflicts = {"offload": "offload already moves whole components in and out of accelerator memory per phase"}
    no_effect = {
        "img2img": "it stages the text-to-image pipeline only; img2img runs unstaged",
        "inpaint": "it stages the text-to-image pipeline only; inpainting runs unstaged",
        "controlnet": "it stages the text-to-image pipeline only; the ControlNet pipeline runs unstaged",
    }
    call_effect = ("staged_chunks",)
    stands_aside = 'a single prompt, or a pipeline it does not stage, runs unstaged (with a note)'
    noop = None  # every setting restructures the call (the images stay the same: see tests/optim/test_staged.py)
    example = {"batch_size": 2}

    @classmethod
    def requirements(cls, config, pipe=None) -> list[str]:
        problems = []
        if config.spill_dir is not None and not Path(config.spill_dir).is_dir():
            problems.append(f"staged.spill_dir {config.spill_dir!r} is not a folder")
        if pipe is not None and _family(pipe) is None:
            problems.append(f"staged runs Stable Diffusion / SDXL text-to-image pipelines, not {type(pipe).__name__}")
        return problems

    def _apply(self, pipe, state: RunState, edits: Edits) -> None:
        self.changes = {"call wrapped": 1}  # nothing changes until a call with a list of prompts goes through it

    def wrap_call(self, call):
        def staged_call(*args, **kwargs):
            running = self.state.pipeline
            if running is not None and running is not self.pipe:  # img2img / inpaint / hires second pass
                self.state.events.append(f"staged: ran unstaged ({type(running).__name__} is not the "
                                         "text-to-image pipeline it stages)")
                return call(*args, **kwargs)
            try:
                kw = self._bind(args, kwargs)
            except TypeError:
                return call(*args, **kwargs)  # let the pipeline report its own argument error
            reason = self._why_unstaged(kw)
            if reason is None:
                return self._run(call, kw)
            if isinstance(kw.get("prompt"), list):
                self.state.events.append(f"staged: ran unstaged ({reason})")
            return call(*args, **kwargs)

        return staged_call

    def _bind(self, args, kwargs) -> dict:
        """The call's arguments by name (only those given; :meth:`_default` has the rest)."""
        bound = inspect.signature(self.pipe.__call__).bind(*args, **kwargs)
        kw = dict(bound.arguments)
        for name, p in bound.signature.parameters.items():
            if p.kind is p.VAR_KEYWORD:
                kw.update(kw.pop(name, {}))
        return kw

    def _default(self, kw: dict, name: str):
        if name in kw:
            return kw[name]
        p = inspect.signature(self.pipe.__call__).parameters.get(name)
        return None if p is None or p.default is p.empty else p.default

    def _why_unstaged(self, kw) -> str | None:
        if not isinstance(kw.get("prompt"), list) or not kw["prompt"]:
            return "the prompt is not a list"
        if _family(self.pipe) is None:
            return f"{type(self.pipe).__name__} is not a Stable Diffusion / SDXL text-to-image pipeline"
        given = [k for k in _UNSPLIT if kw.get(k) is not None]
        if given:
            return f"{', '.join(given)} given"
        gen, rows = kw.get("generator"), len(kw["prompt"]) * (kw.get("num_images_per_prompt") or 1)
        if isinstance(gen, list) and len(gen) != rows:
            return "the generator list does not match the number of images"  # the pipeline raises its error
        return None

    def _run(self, call, kw: dict):
        with torch.no_grad():  # as the pipeline's own __call__
            return self._run_phases(call, kw)

    def _run_phases(self, call, kw: dict):
        c = self.config
        released: list[tuple[str, _Released]] = []
        # named for this pid: removed on exit and SIGTERM, swept by the next process if this one is killed
        spill = make_spill_dir(c.spill_dir) if c.release else None
        try:
            embeds, cfg = self._encode(kw)
            if c.release:
                self._release(TEXT_ENCODERS, spill, released)
            latents = self._denoise(call, kw, embeds, cfg)
            if c.release:
                self._release(("unet",), spill, released)
            return self._decode(call, kw, embeds, latents)
        finally:
            self._restore(released)
            remove_spill_dir(spill)

    # -------------------------------------------------------------------------------------- phases
    def _encode(self, kw) -> tuple[dict, bool]:
        """Every prompt through the pipeline's public ``encode_prompt``; also returns whether guidance is on (the
        pipelines' rule, which :meth:`_denoise` checks against the pipeline's own answer)."""
        pipe, prompts = self.pipe, kw["prompt"]
        cfg = self._default(kw, "guidance_scale") > 1 and pipe.unet.config.time_cond_proj_dim is None
        lora_scale = (kw.get("cross_attention_kwargs") or {}).get("scale")
        common = dict(device=pipe._execution_device, num_images_per_prompt=1, do_classifier_free_guidance=cfg,
                      negative_prompt=kw.get("negative_prompt"), lora_scale=lora_scale, clip_skip=kw.get("clip_skip"))
        if _family(pipe) == "sdxl":
            pe, npe, ppe, nppe = pipe.encode_prompt(prompt=prompts, prompt_2=kw.get("prompt_2"),
                                                    negative_prompt_2=kw.get("negative_prompt_2"), **common)
            embeds = {"prompt_embeds": pe, "negative_prompt_embeds": npe, "pooled_prompt_embeds": ppe,
                      "negative_pooled_prompt_embeds": nppe}
        else:
            pe, npe = pipe.encode_prompt(prompts, **common)
            embeds = {"prompt_embeds": pe, "negative_prompt_embeds": npe}
        self.state.stats["staged_prompts"] += len(prompts)
        self.state.events.append(f"staged: encoded {len(prompts)} prompts")
        return embeds, cfg

    def _release(self, names, spill: Path, released: list) -> None:
        done = []
        for name in names:
            module = getattr(self.pipe, name, None)
            if isinstance(module, torch.nn.Module) and all(r.module_id != id(module) for _, r in released):
                released.append((name, _Released(module, spill)))
                done.append(released[-1])
        if not done:
            return
        _give_back_to_os()
        nbytes = sum(r.nbytes for _, r in done)
        where = ", ".join(sorted({r.where for _, r in done}))
        if "disk" in where and _on_tmpfs(spill):
            where += f"; {spill.parent} is a tmpfs, so they still occupy RAM"
        self.state.stats["staged_released_bytes"] += nbytes
        self.state.events.append(f"staged: released {', '.join(n for n, _ in done)} "
                                 f"({nbytes / 2**20:.1f} MiB to {where})")

    def _restore(self, released: list) -> None:
        errors = []
        for _, r in reversed(released):
            try:
                r.restore()
            except Exception as err:  # restore the others anyway; the first failure is re-raised below
                errors.append(err)
        if released:
            self.state.events.append(f"staged: restored {', '.join(n for n, _ in reversed(released))}")
        if errors:
            raise errors[0]

    def _denoise(self, call, kw: dict, embeds: dict, cfg: bool) -> torch.Tensor:
        """Each chunk is one pipeline call with ``output_type="latent"``. With one generator shared by several
        chunks, the first chunk's ``prepare_latents`` draws the noise for every image at once, as the plain
        pipeline does, and every chunk takes its rows of it (:func:`_noise_for_all`)."""
        pipe, state, b = self.pipe, self.state, self.config.batch_size
        n, k = len(kw["prompt"]), kw.get("num_images_per_prompt") or 1
        rest = {key: v for key, v in kw.items() if key not in _ENCODE_ONLY}
        rest.update(output_type="latent", return_dict=False)
        gen, latents = kw.get("generator"), kw.get("latents")
        noise = {}  # rows of the current chunk; the noise for all images and the RNG state after drawing it
        edits = Edits("staged (denoise)")
        if not isinstance(gen, list) and n > b and latents is None:
            edits.wrap_method(pipe, "prepare_latents", _noise_for_all(n * k, noise, lambda: _rng_state(gen, pipe)))
        out = []
        try:
            for i in range(0, n, b):
                rows = noise["rows"] = slice(i * k, min(i + b, n) * k)
                chunk = {key: (v[i:i + b] if v is not None else None) for key, v in embeds.items()}
                if isinstance(gen, list):
                    chunk["generator"] = gen[rows]
                if latents is not None:
                    chunk["latents"] = latents[rows]
                state.step, state.total_steps, state.cfg = -1, 0, False  # each chunk is a fresh schedule
                out.append(call(**{**rest, **chunk})[0])
                if i == 0:
                    self._check_first_chunk(cfg, noise, gen)
                state.stats["staged_chunks"] += 1
                state.events.append(f"staged: denoised prompts {i + 1}-{min(i + b, n)} of {n}")
        finally:
            edits.undo()
        return torch.cat(out)

    def _check_first_chunk(self, cfg: bool, noise: dict, gen) -> None:
        pipe = self.pipe
        if bool(pipe.do_classifier_free_guidance) != cfg:  # the prompts were encoded by the other rule
            raise DiffspeedError(f"staged: {type(pipe).__name__}.do_classifier_free_guidance is "
                                 f"{pipe.do_classifier_free_guidance}, but staged encoded the prompts for "
                                 f"guidance={cfg}; this diffusers version decides guidance differently")
        if "rng" in noise and not torch.equal(noise["rng"], _rng_state(gen, pipe)):
            self.state.events.append("staged: the sampler drew noise per step from one shared generator, so "
                                     "later chunks differ from the plain pipeline; pass one generator per prompt")

    def _decode(self, call, kw: dict, embeds: dict, latents: torch.Tensor):
        """One more pipeline call decodes every chunk's latents at once, so its own code does the work (fp16 VAE
        upcasting, latents mean/std, decode, watermark, safety checker, postprocessing, output class): its
        ``prepare_latents`` hands over the finished latents and raises the ``interrupt`` flag that the
        denoising loop checks before every step (diffusers' documented way to stop a pipeline early), so the
        loop runs no step. Should a diffusers release stop doing either, the UNet hook raises rather than
        letting the call denoise again."""
        pipe, edits, handed = self.pipe, Edits("staged (decode)"), []

        def hand_over(inner, batch_size, *args, **kwargs):
            if batch_size != latents.shape[0]:
                raise DiffspeedError(f"staged: the decode call asked prepare_latents for {batch_size} rows, "
                                     f"staged holds {latents.shape[0]}; this diffusers version batches differently")
            handed.append(batch_size)
            edits.set_attr(pipe, "_interrupt", True)  # after __call__ cleared it; undone below
            return latents

        def no_denoising(*_):
            raise DiffspeedError(f"staged: {type(pipe).__name__} ran its UNet in the decode call: this diffusers "
                                 "version no longer stops the denoising loop on pipe.interrupt or no longer takes "
                                 "its latents from prepare_latents, so staged cannot decode through it")

        edits.wrap_method(pipe, "prepare_latents", hand_over)
        edits.forward_pre_hook(pipe.unet, no_denoising)
        rest = {key: v for key, v in kw.items() if key not in _ENCODE_ONLY and key != "latents"}
        self.state.step, self.state.total_steps, self.state.cfg = -1, 0, False
        try:
            out = call(**rest, **embeds)
        finally:
            edits.undo()
        if handed != [latents.shape[0]]:
            raise DiffspeedError(f"staged: {type(pipe).__name__}.__call__ called prepare_latents {len(handed)} "
                                 "times in the decode call (expected once); this diffusers version is not supported")
        self.state.events.append(f"staged: decoded {latents.shape[0]} images")
        return out


def _noise_for_all(rows: int, noise: dict, rng_state):
    """A ``prepare_latents`` wrapper: the first call draws the initial latents of all ``rows`` images with the
    pipeline's own method (after its scheduler is set, so ``init_noise_sigma`` is this schedule's); every call
    returns the rows ``noise["rows"]`` of that draw."""

    def prepare(inner, batch_size, *args, **kwargs):
        if "all" not in noise:
            noise["all"] = inner(rows, *args, **kwargs)
            noise["rng"] = rng_state()
        part = noise["all"][noise["rows"]]
        if part.shape[0] != batch_size:
            raise DiffspeedError(f"staged: the pipeline asked prepare_latents for {batch_size} rows, the chunk has "
                                 f"{part.shape[0]}; this diffusers version batches differently")
        return part

    return prepare


def _rng_state(gen, pipe) -> torch.Tensor:
    """State of the one generator a call with ``generator=None`` or a single generator draws from."""
    if isinstance(gen, torch.Generator):
        return gen.get_state()
    device = pipe._execution_device
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()

