"""compile: torch.compile the UNet (whole, or region by region) and optionally the VAE decode.

- Per instance, no class patching: the UNet's ``forward`` (the repeated blocks' ``forward`` when regional,
  ``vae.decode`` with ``vae=True``) becomes a compiled callable in the instance ``__dict__``, and remove() puts
  the very same bound methods back. torch.compile is lazy: nothing compiles before the first call.
- Compile time is reported apart from run time: a call during which dynamo compiled graphs (the first call,
  a new input shape, a failed guard) is timed into ``state.stats["compile_ms"]`` (wall time of that call:
  compiling plus one run) with ``state.stats["compiled_graphs"]``, and noted in ``state.events``.
- ``dynamic=False`` specializes on every shape (the fastest kernels): a new latent size or batch recompiles,
  announced by a warning when that input arrives. ``dynamic=True`` suits servers with varying sizes.
- ``regional=True`` compiles each repeated block (the UNet's transformer blocks and resnets, and whatever
  else the model lists in ``_repeated_blocks``) instead of the whole UNet: diffusers' ``compile_repeated_blocks`` and
  PyTorch's regional compilation recipe (docs.pytorch.org/tutorials/recipes/regional_compilation.html).
  Blocks of equal shape share one compiled graph, and the UNet-level Python of other optimizations (step
  counters, caches, CFG decisions) stays eager instead of becoming guards that recompile when they change.
  Measured on tiny-sd (CPU, 1 thread, 4 steps, batch 4): whole UNet 77 s to compile, 155 ms per run (eager
  205 ms); regional 43 s to compile (16 graphs) but 334 ms per run: each of the 28 compiled regions costs a
  guard check and a call per step, which only pays off when the blocks are big (real models, GPUs).
- It must come last in a recipe (``last``): it freezes what the other optimizations changed. Dynamo's cache
  belongs to the code object and the process, so the same architecture compiled again (another pipeline,
  or remove() then apply()) reuses the compiled graphs and reports little or no compile time.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import os
import shutil
import time
import warnings

from diffspeed._lazy import lazy_import
from diffspeed.core import Edits, OptConfig, Optimization, RunState, param, register
from diffspeed.errors import DiffspeedError

torch = lazy_import("torch")

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
BACKENDS = ("inductor", "aot_eager", "eager")
# Added to a model's own ``_repeated_blocks`` (diffusers' UNet2DConditionModel names only its transformer
# blocks): the resnets are half of a UNet's work and repeat too.
REPEATED_BLOCKS = ("BasicTransformerBlock", "ResnetBlock2D")
# A UNet's resnets come in a dozen (in, out, size) variants (SD 1.x: 12), more than dynamo's default cache
# of 8 graphs per function, past which it silently runs that function eagerly for the rest of the process.
REGIONAL_RECOMPILE_LIMIT = 64


@dataclasses.dataclass(frozen=True, kw_only=True)
class CompileConfig(OptConfig):
    name = "compile"
    mode: str = param("default", "inductor mode: default (quickest compile); reduce-overhead (CUDA graphs, for "
                      "small batches; no effect on the CPU); max-autotune (benchmarks kernels: much longer "
                      "compile, fastest run); max-autotune-no-cudagraphs", choices=MODES)
    fullgraph: bool = param(False, "raise on a graph break instead of splitting the graph (checks that every "
                            "compiled region compiles whole)")
    dynamic: bool = param(False, "compile for symbolic shapes: no recompile when size or batch changes; False "
                          "specializes on each shape (fastest kernels, one compile per shape)")
    vae: bool = param(False, "also compile vae.decode (matters for large images, where the decode is a "
                      "visible part of the run)")
    regional: bool = param(False, "compile the UNet's repeated blocks (transformer blocks, resnets) instead of "
                           "the whole UNet: less compile time (tiny-sd, CPU: 43 s instead of 77 s), but the glue "
                           "between blocks stays eager, which small models feel (tiny-sd CPU: slower than eager)")
    backend: str = param("inductor", "inductor generates kernels; aot_eager and eager only trace (debugging: "
                         "does a mismatch come from dynamo or from inductor?)", choices=BACKENDS)

    def checks(self):
        if self.backend != "inductor" and self.mode != "default":
            return [("mode", f"compile.mode {self.mode!r} needs backend 'inductor'; got backend "
                             f"{self.backend!r} (use mode 'default')")]
        return []


def _graphs_compiled() -> int:
    """Graphs dynamo has compiled so far in this process (read only: the difference over a call tells
    whether that call compiled)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _sample_of(args: tuple, kwargs: dict):
    if args:
        return args[0]
    return next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)


def _names(model: torch.nn.Module) -> set[str]:
    return set(getattr(model, "_repeated_blocks", None) or ()) | set(REPEATED_BLOCKS)


def repeated_blocks(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The outermost submodules whose class is a repeated block (the model's own, plus REPEATED_BLOCKS)."""
    names = _names(model)
    out: list[tuple[str, torch.nn.Module]] = []
    for path, module in model.named_modules():
        inside = any(path.startswith(p + ".") for p, _ in out)
        if path and not inside and type(module).__name__ in names:
            out.append((path, module))
    return out


def _device_of(module) -> str:
    param = next(module.parameters(), None) if isinstance(module, torch.nn.Module) else None
    if param is not None:
        return param.device.type
    return "cuda" if torch.cuda.is_available() else "cpu"


def _cxx_compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


@register
class Compile(Optimization):
    Config = CompileConfig
    summary = "torch.compile the UNet (whole or its repeated blocks) and optionally the VAE decode"
    last = True
    noop = None  # no config leaves the numbers bit-identical: compiled kernels reorder floating-point sums
    example = {}
    contract_slow = True  # every contract run would compile: tests/optim/test_contract.py marks it slow

    @classmethod
    def requirements(cls, config: CompileConfig, pipe=None) -> list[str]:
        out = []
        if not torch._dynamo.is_dynamo_supported():
            out.append("torch.compile does not support this Python or platform")
        if pipe is not None and getattr(pipe, "unet", None) is None:
            out.append("needs a pipeline with a UNet (pipe.unet)")
        if pipe is not None and config.vae and getattr(pipe, "vae", None) is None:
            out.append("compile.vae needs a pipeline with a VAE")
        if config.backend == "inductor":
            device = _device_of(getattr(pipe, "unet", None))
            if device == "cuda" and importlib.util.find_spec("triton") is None:
                out.append("inductor on CUDA needs the triton package (pip install triton)")
            if device == "cpu" and _cxx_compiler() is None:
                out.append("inductor on the CPU needs a C++ compiler (g++ or clang++ on PATH, or CXX set)")
        return out

    # ------------------------------------------------------------------------------------------ apply
    def _apply(self, pipe, state: RunState, edits: Edits) -> None:
        c = self.config
        self._seen: dict[str, set] = {}  # part -> (shape, dtype) of the inputs compiled for so far
        self._compile_s: dict[str, float] = {}  # part -> seconds its first compiling call took
        unet = pipe.unet
        if c.regional:
            blocks = repeated_blocks(unet)
            if not blocks:
                raise DiffspeedError(f"compile.regional: {type(unet).__name__} has none of the repeated blocks "
                                     f"{', '.join(sorted(_names(unet)))}; use regional=false", field="regional")
            for _, block in blocks:  # beneath other optimizations' wrappers: their per-call Python stays eager
                edits.wrap_beneath(block, "forward", lambda fn: self._compile(fn, REGIONAL_RECOMPILE_LIMIT))
            unet_fn = unet.forward  # eager: it calls the compiled blocks
        else:
            unet_fn = self._compile(unet.forward)
        edits.wrap_method(unet, "forward", lambda _, *a, **k: self._call("unet", unet_fn, a, k))
        if c.vae:
            vae_fn = self._compile(pipe.vae.decode)
            edits.wrap_method(pipe.vae, "decode", lambda _, *a, **k: self._call("vae decode", vae_fn, a, k))

    def _compile(self, fn, recompile_limit: int | None = None):
        c = self.config
        kw = dict(mode=c.mode, fullgraph=c.fullgraph, dynamic=c.dynamic, backend=c.backend)
        if recompile_limit and "recompile_limit" in inspect.signature(torch.compile).parameters:
            kw["recompile_limit"] = max(recompile_limit, torch._dynamo.config.recompile_limit)
        return torch.compile(fn, **kw)

    # ------------------------------------------------------------------------------------------- call
    def _call(self, part: str, fn, args: tuple, kwargs: dict):
        state = self.state
        x = _sample_of(args, kwargs)
        signature = (tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else None
        seen = self._seen.setdefault(part, set())
        if seen and signature not in seen and not self.config.dynamic:
            took = self._compile_s.get(part)
            msg = (f"compile: new {part} input shape {signature[0]} ({str(signature[1]).removeprefix('torch.')}) "
                   f"triggers a recompile" + (f" (~{took:.0f} s, as the first compile took)" if took else "")
                   + "; use compile.dynamic=true when sizes vary")
            state.events.append(msg)
            warnings.warn(msg, stacklevel=2)
        seen.add(signature)
        before = _graphs_compiled()
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        graphs = _graphs_compiled() - before
        if graphs:  # this call compiled: its time is compile time, not run time
            seconds = time.perf_counter() - t0
            self._compile_s.setdefault(part, seconds)
            state.stats["compile_ms"] += round(seconds * 1000)
            state.stats["compiled_graphs"] += graphs
            state.events.append(f"compile: {part} compiled {graphs} graph(s) for input "
                                f"{signature[0] if signature else '?'} in {seconds:.1f} s (compile + one run)")
        return out
