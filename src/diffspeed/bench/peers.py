"""Peers: other projects' implementations of the same tricks, benchmarked in the same run as diffspeed's.

A peer is a name plus ``enable(pipe) -> disable`` (or, for ``static_call`` peers, ``enable(pipe, call)`` with the
bench call's width, height, steps and CFG known ahead). ``enable`` may instead return an :class:`Enabled`: a peer
that brings its own pipeline object (optimum-intel's OpenVINO pipeline) names it as the ``call`` the bench times,
and any peer can leave facts for the row in ``events`` (the precision used, how many hooks it placed). A peer runs
only when its package imports and, for the CUDA-only ones, on a CUDA device; otherwise it is reported as skipped.
A peer whose package cannot live beside diffspeed's (optimum-intel pins an older transformers) runs in a second
interpreter named by ``DIFFSPEED_PEER_PYTHON`` (``tools/peer_venv.sh`` makes one): :meth:`Peer.missing` with
``python`` tries the import there. Their code is used as published, through their public entry points. ``PEERS``
maps each peer's key (what a bench entry names) to a factory taking the peer's settings, so a bench worker in
another process can rebuild it.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

PEER_PYTHON_ENV = "DIFFSPEED_PEER_PYTHON"  # the interpreter of a second environment for peers (tools/peer_venv.sh)
PEER_VENV_HINT = (f"make a separate environment for it with tools/peer_venv.sh and set {PEER_PYTHON_ENV} to its "
                  "bin/python")


@dataclass
class Enabled:
    """What ``enable`` returns for a peer that does more than patch the pipeline in place."""

    disable: Callable[[], None]
    call: Callable | None = None  # called instead of the pipeline, with the same arguments (a peer's own pipeline)
    events: list[str] = field(default_factory=list)  # facts for the row: precision used, hooks placed, timings


class NotApplicable(Exception):
    """The peer ran but reaches nothing in this pipeline: the entry is skipped with this reason, not timed."""


@dataclass(frozen=True)
class Peer:
    name: str
    package: str  # the import name that must be installed
    enable: Callable  # enable(pipe) -> disable() or Enabled; enable(pipe, call) when static_call
    settings: dict = field(default_factory=dict)
    key: str = ""  # the PEERS key that rebuilds it
    cuda_only: bool = False
    cpu_only: bool = False
    check: str = ""  # statements that must run for the peer to work: a package can be installed yet not import
    versions: tuple[str, ...] = ()  # distributions whose versions the row records, besides torch/diffusers/...
    install: str = "pip install 'diffspeed[peers]'"
    static_call: bool = False  # enable(pipe, call): it compiles for the call's shapes ahead (static shapes)

    def missing(self, device: str = "cpu", python: str | None = None, env: dict | None = None) -> str | None:
        """Why the peer cannot run on ``device``: its device, then its package. ``python`` None: in this process
        (``check`` is run here, as the worker that runs the peer would); an interpreter: in a fresh process of it,
        with ``env`` (the import is tried there, and diffspeed's bench worker with it), except that for a peer
        without ``check`` this very interpreter is asked without a process (is the package there)."""
        why = self.device_problem(device)
        if why or python is None or (python == sys.executable and not self.check):
            return why or self._missing_here()
        if python == sys.executable and self._not_installed():  # no process needed to say so
            return self._not_installed()
        why = interpreter_problem(python, self.check or f"import {self.package}", tuple(sorted((env or {}).items())))
        return f"{why}; {self.install}" if why and python == sys.executable else why

    def device_problem(self, device: str) -> str | None:
        if self.cuda_only and not str(device).startswith("cuda"):
            return f"{self.name} needs a CUDA device"
        if self.cpu_only and not str(device).startswith("cpu"):
            return f"{self.name} runs on the CPU only; this bench runs on {device}"
        return None

    def _not_installed(self) -> str | None:
        try:
            found = importlib.util.find_spec(self.package) is not None
        except ImportError:  # a dotted name whose parent package is missing
            found = False
        return None if found else f"peer package {self.package!r} is not installed ({self.install})"

    def _missing_here(self) -> str | None:
        if self._not_installed():
            return self._not_installed()
        if self.check:
            try:
                exec(self.check, {})  # noqa: S102 -- the peer's own import line, a constant of this file
            except Exception as err:  # noqa: BLE001 -- any failure to import is the reason it is skipped
                return f"{self.package} does not import here ({type(err).__name__}: {err}); {self.install}"
        return None


_PROBE = "import sys\nexec(sys.argv[1])\nimport diffspeed.bench.worker\n"


@functools.lru_cache(maxsize=32)
def interpreter_problem(python: str, check: str, env: tuple = ()) -> str | None:
    """Why ``check`` (then diffspeed's bench worker) does not import in a fresh process of ``python``; None if
    it does. One process per interpreter and check, cached: the answer is the same for every entry of a run."""
    try:
        proc = subprocess.run([python, "-c", _PROBE, check], capture_output=True, text=True, timeout=600,
                              env=dict(env) or None)
    except (OSError, subprocess.SubprocessError) as err:
        return f"cannot run {python}: {type(err).__name__}: {err}"
    if proc.returncode == 0:
        return None
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    return f"{check!r} fails under {python}: {lines[-1] if lines else f'exit status {proc.returncode}'}"


def activate(peer: Peer, pipe, call: dict | None = None) -> Enabled:
    """``peer.enable`` on ``pipe`` (with ``call`` for a static-shapes peer), as an :class:`Enabled`."""
    out = peer.enable(pipe, call or {}) if peer.static_call else peer.enable(pipe)
    return out if isinstance(out, Enabled) else Enabled(out)


# ------------------------------------------------------------------------------ weights parked / restored
def _tensors(pipe):
    """Every parameter and buffer of the pipeline's torch modules, by component-qualified name, ties included."""
    import torch

    for comp, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            for name, t in itertools.chain(module.named_parameters(remove_duplicate=False),
                                           module.named_buffers(remove_duplicate=False)):
                yield f"{comp}.{name}", t


def _stash(pipe, path: Path) -> None:
    """The pipeline's weights, exactly as they are (dtype, strides, ties), in ``path``; :func:`_unstash` puts
    them back bit for bit, whatever was cast or re-laid in between."""
    import torch

    torch.save({k: t.detach() for k, t in _tensors(pipe)}, path)


def _unstash(pipe, path: Path) -> None:
    import torch

    saved = torch.load(path, weights_only=True)
    for k, t in _tensors(pipe):
        t.data = saved[k]


def deepcache_package(interval: int = 3, branch: int = 0) -> Peer:
    """The DeepCache authors' ``DeepCacheSDHelper`` (pip ``DeepCache``) at the same interval and branch."""

    def enable(pipe):
        from DeepCache import DeepCacheSDHelper

        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=interval, cache_branch_id=branch)
        helper.enable()
        return helper.disable

    return Peer(f"DeepCache package interval {interval} branch {branch}", "DeepCache", enable,
                {"interval": interval, "branch": branch}, "deepcache_package")


def tomesd_package(ratio: float = 0.5) -> Peer:
    """``tomesd.apply_patch`` (Bolya and Hoffman 2023) at the same merge ratio."""

    def enable(pipe):
        import tomesd

        tomesd.apply_patch(pipe, ratio=ratio)
        return lambda: tomesd.remove_patch(pipe)

    return Peer(f"tomesd ratio {ratio}", "tomesd", enable, {"ratio": ratio}, "tomesd_package")


# each plain diffusers switch: (on the pipeline or its VAE, the call, the call that turns it off; None: no undo,
# the bench worker's process ends with it). diffusers 0.42 keeps VAE slicing/tiling on the VAE itself.
_DIFFUSERS = {
    "enable_attention_slicing": ("pipe", "enable_attention_slicing", "disable_attention_slicing"),
    "enable_vae_slicing": ("vae", "enable_slicing", "disable_slicing"),
    "enable_vae_tiling": ("vae", "enable_tiling", "disable_tiling"),
    "enable_freeu": ("pipe", "enable_freeu", "disable_freeu"),
    "enable_model_cpu_offload": ("pipe", "enable_model_cpu_offload", None),
    "enable_sequential_cpu_offload": ("pipe", "enable_sequential_cpu_offload", None),
}
_CUDA_ONLY = {"enable_model_cpu_offload", "enable_sequential_cpu_offload"}


def diffusers_switch(method: str, **kwargs) -> Peer:
    """One of diffusers' own ``enable_*`` calls (the diffusers "memory and speed" page, seed 003)."""
    if method not in _DIFFUSERS:
        raise ValueError(f"diffusers_switch: {method!r} is not one of {', '.join(_DIFFUSERS)}")
    where, on, off = _DIFFUSERS[method]

    def enable(pipe):
        call = dict(kwargs)
        if method == "enable_freeu" and not call:  # the family's published values, as diffspeed's freeu uses
            from diffspeed.adapters import adapter_for

            call = dict(adapter_for(pipe).freeu)
        target = pipe.vae if where == "vae" else pipe
        getattr(target, on)(**call)
        return (lambda: getattr(target, off)()) if off else (lambda: None)

    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    label = f"pipe.vae.{on}({args})" if where == "vae" else f"pipe.{on}({args})"
    return Peer(f"diffusers {label}", "diffusers", enable, {"method": method, **kwargs},
                "diffusers_switch", cuda_only=method in _CUDA_ONLY)


def diffusers_compile(mode: str = "reduce-overhead", fullgraph: bool = True) -> Peer:
    """The diffusers docs' recipe: ``pipe.unet = torch.compile(pipe.unet, mode=..., fullgraph=...)`` (CUDA)."""

    def enable(pipe):
        import torch

        original = pipe.unet
        pipe.unet = torch.compile(original, mode=mode, fullgraph=fullgraph)

        def disable():
            pipe.unet = original

        return disable

    return Peer(f"diffusers torch.compile(unet, mode={mode})", "torch", enable,
                {"mode": mode, "fullgraph": fullgraph}, "diffusers_compile", cuda_only=True)


def openvino_pipeline() -> Peer:
    """optimum-intel's ``OVStableDiffusionPipeline``, the engine FastSD CPU runs, exported from the very pipeline
    the bench loaded (same weights, same scheduler) and used the way FastSD CPU uses it: ``save_pretrained`` to a
    spill folder, ``from_pretrained(..., export=True, compile=False)``, ``reshape`` to the bench call's batch and
    size (static shapes; the batch doubles for CFG, and stays dynamic when CFG is off), then ``compile()``. The
    export and compile are setup time. OpenVINO's CPU plugin picks its own precision (bf16 on CPUs with AVX512-BF16
    or AMX, f32 elsewhere); that default is kept, as FastSD CPU users get it, and the ``INFERENCE_PRECISION_HINT``
    each part compiled with is in the row's events. Its thread count is set to torch's, so both engines get the
    same cores. While it runs, the PyTorch pipeline's weights are parked in a spill file (a FastSD CPU process
    does not hold them: the row's memory is the OpenVINO pipeline's), and put back by ``disable``.

    optimum-intel 2.2 does not import beside diffspeed's transformers: the bench runs this entry in the interpreter
    named by ``DIFFSPEED_PEER_PYTHON`` (``tools/peer_venv.sh``)."""
    return Peer("openvino pipeline (optimum-intel, FastSD CPU's engine)", "optimum.intel", _openvino_enable, {},
                "openvino_pipeline", cpu_only=True, check="from optimum.intel import OVStableDiffusionPipeline",
                versions=("optimum-intel", "optimum", "openvino", "openvino-tokenizers", "transformers"),
                install=f"optimum-intel 2.2 does not import with diffspeed's transformers: {PEER_VENV_HINT}",
                static_call=True)


def _openvino_enable(pipe, call: dict) -> Enabled:
    import torch
    from optimum.intel import OVStableDiffusionPipeline

    from diffspeed.core.spill import make_spill_dir, remove_spill_dir

    folder = make_spill_dir()
    try:
        t0 = time.perf_counter()
        pipe.save_pretrained(folder / "diffusers")
        threads = torch.get_num_threads()
        ov = OVStableDiffusionPipeline.from_pretrained(folder / "diffusers", export=True, compile=False,
                                                       ov_config={"INFERENCE_NUM_THREADS": threads})
        shutil.rmtree(folder / "diffusers")
        exported = time.perf_counter() - t0
        ov.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)  # the bench's sampler
        ov.set_progress_bar_config(disable=True)
        width = call.get("width") or pipe.unet.config.sample_size * pipe.vae_scale_factor
        height = call.get("height") or pipe.unet.config.sample_size * pipe.vae_scale_factor
        cfg = call.get("guidance_scale", 7.5) > 1 and pipe.unet.config.time_cond_proj_dim is None
        # reshape doubles the UNet's batch for CFG; without CFG the batch stays dynamic rather than wrong
        ov.reshape(batch_size=1 if cfg else -1, height=height, width=width, num_images_per_prompt=1)
        t0 = time.perf_counter()
        ov.compile()
        events = _openvino_events(ov, f"exported in {exported:.1f} s, compiled in {time.perf_counter() - t0:.1f} s "
                                      f"for {width}x{height}, batch {'1 (UNet 2, CFG)' if cfg else 'dynamic (no CFG)'}")
        _stash(pipe, folder / "originals.pt")  # last: nothing after it can fail with the weights gone
        for _, t in _tensors(pipe):
            t.data = torch.empty(0, dtype=t.dtype, device=t.device)
    except BaseException:
        remove_spill_dir(folder)
        raise

    def disable():
        try:
            _unstash(pipe, folder / "originals.pt")
        finally:
            remove_spill_dir(folder)

    return Enabled(disable, ov, events)


def _openvino_events(ov, what: str) -> list[str]:
    """What the row says of the OpenVINO pipeline: versions, shapes, the weights' element types in the IR, and the
    precision and threads each part was compiled with."""
    import importlib.metadata as md

    def prop(part, name):
        value = part.request.get_property(name)
        return value.get_type_name() if hasattr(value, "get_type_name") else str(value)

    parts = {n: getattr(ov, n) for n in ("text_encoder", "unet", "vae_decoder") if getattr(ov, n, None) is not None}
    weights = sorted({op.get_element_type().get_type_name() for op in ov.unet.model.get_ops()
                      if op.get_type_name() == "Constant" and op.get_element_type().is_real()})
    versions = ", ".join(f"{d} {md.version(d)}" for d in ("optimum-intel", "openvino"))
    hints = ", ".join(f"{n} {prop(p, 'INFERENCE_PRECISION_HINT')}" for n, p in parts.items())
    return [f"openvino: {versions}; {what}; IR weights {'/'.join(weights)}",
            f"openvino: INFERENCE_PRECISION_HINT {hints} (OpenVINO's default for this CPU, kept); "
            f"INFERENCE_NUM_THREADS {prop(parts['unet'], 'INFERENCE_NUM_THREADS')} (torch's)",
            "openvino: the PyTorch pipeline's weights are parked on disk while it runs"]


def diffusers_pab(skip_range: int = 2, timesteps: tuple[int, int] = (100, 800)) -> Peer:
    """Pyramid Attention Broadcast (Zhao et al. 2024), diffusers' ``apply_pyramid_attention_broadcast`` on the
    UNet, at the values of its docs' example (``spatial_attention_block_skip_range=2``, timesteps (100, 800)).
    It is the one diffusers cache hook that reaches a UNet: the others hook a transformer's blocks. It hooks the
    ``Attention`` modules whose name matches a transformer-block identifier (``transformer_blocks``) and that are
    not cross-attention: the UNet's ``attn1`` self-attentions; the row's events say how many, and an entry where it
    hooks none is skipped rather than timed as a no-op.

    The docs pass ``current_timestep_callback=lambda: pipe.current_timestep``, but StableDiffusionPipeline does not
    set ``current_timestep``; here a forward pre-hook on the UNet records the timestep argument of each call (one
    host sync per UNet call on a GPU) and the callback returns it. diffusers resets a cache's state at the end of
    each generation only for models with ``CacheMixin``, which the UNet lacks, so the bench's call resets the
    hooks' state before each generation (``HookRegistry.reset_stateful_hooks``), as a pipeline with it would.
    ``disable`` removes the hooks by name (``remove_hook(..., recurse=True)``) and the pre-hook, then the
    registries and instance ``forward`` attributes diffusers leaves behind on the modules it had hooked."""

    def enable(pipe):
        import torch
        from diffusers.hooks import HookRegistry, PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast
        from diffusers.hooks.pyramid_attention_broadcast import _PYRAMID_ATTENTION_BROADCAST_HOOK as HOOK

        unet = pipe.unet
        had_registry = {id(m) for m in unet.modules() if hasattr(m, "_diffusers_hook")}
        had_forward = {id(m) for m in unet.modules() if "forward" in vars(m)}
        now: dict = {"t": None}

        def record(module, args, kwargs):
            t = kwargs["timestep"] if "timestep" in kwargs else args[1]
            now["t"] = float(t.flatten()[0]) if torch.is_tensor(t) else float(t)

        handle = unet.register_forward_pre_hook(record, with_kwargs=True)
        apply_pyramid_attention_broadcast(unet, PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=skip_range, spatial_attention_timestep_skip_range=tuple(timesteps),
            current_timestep_callback=lambda: now["t"]))
        hooked = [n for n, m in unet.named_modules() if HOOK in getattr(getattr(m, "_diffusers_hook", None),
                                                                        "hooks", {})]
        registry = HookRegistry.check_if_exists_or_initialize(unet)

        def disable():
            handle.remove()
            registry.remove_hook(HOOK, recurse=True)
            for m in unet.modules():
                if id(m) not in had_registry and hasattr(m, "_diffusers_hook") and not m._diffusers_hook.hooks:
                    del m._diffusers_hook
                if id(m) not in had_forward and "forward" in vars(m):
                    del m.forward

        if not hooked:
            disable()
            raise NotApplicable("apply_pyramid_attention_broadcast hooked no attention module of this UNet")

        def call(*args, **kwargs):
            registry.reset_stateful_hooks(recurse=True)
            return pipe(*args, **kwargs)

        return Enabled(disable, call, [f"pyramid_attention_broadcast: {len(hooked)} self-attention modules hooked "
                                       f"(skip range {skip_range}, timesteps {tuple(timesteps)}): "
                                       + ", ".join(hooked)])

    return Peer(f"diffusers pab (pyramid attention broadcast, skip range {skip_range})", "diffusers", enable,
                {"skip_range": skip_range, "timesteps": list(timesteps)}, "diffusers_pab")


def diffusers_documented() -> Peer:
    """Plain diffusers with the settings its "Accelerate inference" guide recommends (docs/source/en/optimization/
    fp16.md, diffusers 0.42): a half dtype for the whole pipeline (``torch_dtype``), TF32 matmuls on NVIDIA
    (``torch.backends.cuda.matmul.allow_tf32 = True``), SDPA (PyTorch >= 2's default attention, "no additional
    changes are required": its processors are recorded, not changed) and ``channels_last`` on the UNet and the VAE.
    The guide's torch.compile is the ``diffusers_compile`` peer. On CUDA the half dtype is fp16, as in its SD
    examples; on a CPU, where the guide says only that "hardware support for bfloat16 varies", bf16 where the CPU
    computes it natively (AVX512-BF16 or AMX, :func:`diffspeed.hardware.native_bf16`) and fp32 elsewhere. The
    original weights are stashed in a spill file first, so ``disable`` restores them bit for bit."""

    def enable(pipe):
        import torch

        from diffspeed.core.spill import make_spill_dir, remove_spill_dir
        from diffspeed.hardware import detect_cpu, native_bf16

        device = str(pipe._execution_device)
        cuda = device.startswith("cuda")
        dtype, why = ((torch.float16, "fp16 (CUDA)") if cuda else
                      (torch.bfloat16, "bf16 (native bf16 on this CPU)") if native_bf16(detect_cpu()) else
                      (torch.float32, "fp32 (no native bf16 on this CPU)"))
        folder = make_spill_dir()
        try:
            _stash(pipe, folder / "originals.pt")
        except BaseException:
            remove_spill_dir(folder)
            raise
        tf32 = torch.backends.cuda.matmul.allow_tf32
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = True
        pipe.to(dtype=dtype)
        for module in (pipe.unet, pipe.vae):
            module.to(memory_format=torch.channels_last)
        processors = sorted({type(p).__name__ for p in pipe.unet.attn_processors.values()})

        def disable():
            torch.backends.cuda.matmul.allow_tf32 = tf32
            try:
                _unstash(pipe, folder / "originals.pt")
            finally:
                remove_spill_dir(folder)

        return Enabled(disable, events=[f"diffusers documented settings on {device}: {why}, channels_last UNet and "
                                        f"VAE{', TF32 matmuls' if cuda else ''}; attention {', '.join(processors)}"])

    return Peer("diffusers documented settings (dtype, channels_last, SDPA, TF32)", "diffusers", enable, {},
                "diffusers_documented")


PEERS: dict[str, Callable[..., Peer]] = {"deepcache_package": deepcache_package, "tomesd_package": tomesd_package,
                                         "diffusers_switch": diffusers_switch, "diffusers_compile": diffusers_compile,
                                         "openvino_pipeline": openvino_pipeline, "diffusers_pab": diffusers_pab,
                                         "diffusers_documented": diffusers_documented}


def build_peer(key: str, settings: dict) -> Peer:
    if key not in PEERS:
        raise ValueError(f"unknown peer {key!r}; known: {', '.join(PEERS)}")
    return PEERS[key](**settings)


def default_peers() -> list[Peer]:
    """What the bench compares with when nothing else is asked: each package at diffspeed's defaults, the diffusers
    switches that have a diffspeed counterpart (slicing, tiling, FreeU, offload, compile), diffusers' PAB hook and
    its documented settings, and optimum-intel's OpenVINO pipeline (CPU; a second interpreter, see
    ``tools/peer_venv.sh``)."""
    return [deepcache_package(3, 0), tomesd_package(0.5),
            # "max": one head at a time; the default "auto" divides by zero on models with one-head levels
            diffusers_switch("enable_attention_slicing", slice_size="max"), diffusers_switch("enable_vae_slicing"),
            diffusers_switch("enable_vae_tiling"),
            diffusers_switch("enable_freeu"),
            diffusers_switch("enable_model_cpu_offload"), diffusers_compile(),
            diffusers_pab(), diffusers_documented(), openvino_pipeline()]
