"""openvino: run the UNet (whole, or its blocks) and optionally the VAE decode and text encoders on OpenVINO.

OpenVINO is the CPU engine FastSD CPU builds on (it reports ~2x over PyTorch on the CPU). Each part is exported
from the pipeline's own weights with ``openvino.convert_model`` (TorchScript tracing of the module as it is now,
other optimizations' static changes included) and compiled for the request's exact input shapes:

- Static shapes: one compiled model per input signature (shapes, dtypes and the call's non-tensor settings),
  kept in memory for the pipeline's life. A new size or batch compiles another, announced in the events.
- Disk cache (``cache_dir``): the exported model is saved as OpenVINO IR under a key made of the weights'
  fingerprint, the module's class, the input signature and the openvino/torch/diffspeed versions, and
  OpenVINO's own ``CACHE_DIR`` keeps the compiled blobs, so a second process loads instead of re-exporting.
- Compile time is reported apart, as ``compile``'s is: ``stats["compile_ms"]`` (export + compile, or the disk
  load) and ``stats["compiled_graphs"]``, with an event per compiled model.
- ``regional=True`` exports the UNet's blocks one by one -- each layer's resnet and transformer, each down- and
  upsampler, the mid block (:mod:`diffspeed.core.unet_units`) -- *beneath* other optimizations' wrappers
  (:meth:`~diffspeed.core.Edits.wrap_beneath`): the per-call decisions of ``deepcache`` or ``cfg_cutoff`` stay
  eager Python on top, and a cached call runs the compiled shallow blocks only. The glue between blocks
  (conv_in, time embedding, conv_out) stays in PyTorch.
- ``precision``: OpenVINO's CPU plugin computes in bf16 by default on CPUs with native bf16 (AVX512-BF16, AMX)
  and in f32 elsewhere; ``auto`` keeps that default (what FastSD CPU users get), the others force a hint. The
  hint actually used is in the events.
- Calls the engine cannot take (an argument that is neither a tensor nor plain data) run in PyTorch, noted
  once in the events. remove() puts the very same methods back.

Measured (benchmarks/random-sd15-256-openvino): see the README's OpenVINO section.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import time
from pathlib import Path

from diffspeed._lazy import lazy_import
from diffspeed.core import Edits, OptConfig, Optimization, RunState, param, register
from diffspeed.core.unet_units import down_units, up_units
from diffspeed.errors import DiffspeedError

torch = lazy_import("torch")
np = lazy_import("numpy")

PRECISIONS = ("auto", "f32", "bf16", "f16")
DEFAULT_CACHE = "~/.cache/diffspeed/openvino"
_PLAIN = (bool, int, float, str, type(None))
# VAEs whose decode takes a ``generator`` argument and never reads it (diffusers 0.42): dropped, not traced
_DECODE_IGNORES = ("AutoencoderKL", "AutoencoderTiny")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OpenVINOConfig(OptConfig):
    name = "openvino"
    regional: bool = param(False, "export the UNet's blocks one by one instead of the whole UNet: needed under "
                           "deepcache or cfg_cutoff (their per-call decisions stay eager Python); the glue "
                           "between blocks stays in PyTorch")
    vae: bool = param(False, "also run vae.decode on OpenVINO")
    text_encoder: bool = param(False, "also run the text encoder(s) on OpenVINO (a small part of a run)")
    precision: str = param("auto", "OpenVINO's inference precision: auto = its default (bf16 on CPUs with native "
                           "bf16, f32 elsewhere); f32 for the closest match to PyTorch", choices=PRECISIONS)
    cache_dir: str | None = param(DEFAULT_CACHE, "where exported models (OpenVINO IR) and compiled blobs are kept "
                                  "between processes; empty = memory only", kind=str)
    device: str = param("CPU", "the OpenVINO device (CPU; GPU or NPU where OpenVINO has a plugin for it)")

    def checks(self):
        if not self.device or not self.device.replace(".", "").replace(":", "").isalnum():
            return [("device", f"openvino.device must be an OpenVINO device name such as CPU, got {self.device!r}")]
        return []


# ------------------------------------------------------------------------------------------ call layout
def _flatten(value, tensors: list, where: str = "") -> object:
    """``value`` as a hashable layout, with its tensors appended to ``tensors`` (replaced by their index).
    Raises TypeError for anything that is neither a tensor, plain data, nor a list/tuple/dict of them."""
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        return ("T", len(tensors) - 1, tuple(value.shape), str(value.dtype))
    if isinstance(value, _PLAIN):
        return ("V", value)
    if isinstance(value, (list, tuple)):
        return ("L" if isinstance(value, list) else "U", tuple(_flatten(v, tensors, where) for v in value))
    if isinstance(value, dict):
        return ("D", tuple((k, _flatten(v, tensors, where)) for k, v in value.items()))
    raise TypeError(f"{where}: a {type(value).__name__} argument")


def _rebuild(layout, tensors):
    kind = layout[0]
    if kind == "T":
        return tensors[layout[1]]
    if kind == "V":
        return layout[1]
    if kind in ("L", "U"):
        items = [_rebuild(x, tensors) for x in layout[1]]
        return items if kind == "L" else tuple(items)
    return {k: _rebuild(v, tensors) for k, v in layout[1]}


def _out_layout(out, tensors: list):
    """The structure of an output (tensor, tuple/list, a diffusers BaseOutput or transformers ModelOutput), as
    JSON-able data; its tensors are appended to ``tensors``."""
    if isinstance(out, torch.Tensor):
        tensors.append(out)
        return {"t": len(tensors) - 1}
    if isinstance(out, (tuple, list)) and not hasattr(out, "keys"):
        return {"seq": [_out_layout(o, tensors) for o in out], "list": isinstance(out, list)}
    if hasattr(out, "keys") and hasattr(out, "to_tuple"):
        cls = type(out)
        return {"cls": f"{cls.__module__}:{cls.__qualname__}",
                "fields": {k: _out_layout(out[k], tensors) for k in out.keys()}}
    if out is None:
        return {"none": True}
    raise TypeError(f"an output of type {type(out).__name__}")


def _out_rebuild(layout, tensors):
    if "t" in layout:
        return tensors[layout["t"]]
    if "seq" in layout:
        items = [_out_rebuild(x, tensors) for x in layout["seq"]]
        return items if layout["list"] else tuple(items)
    if "none" in layout:
        return None
    module, qualname = layout["cls"].split(":")
    cls = importlib.import_module(module)
    for part in qualname.split("."):
        cls = getattr(cls, part)
    return cls(**{k: _out_rebuild(v, tensors) for k, v in layout["fields"].items()})


def _traceable(owner, fn, layout):
    """``fn`` (a method of ``owner``) as a module taking only tensors, for ``openvino.convert_model``; its
    ``out_layout`` is the output's structure once it has run. (A class made here: torch loads on first use.)"""

    class Traceable(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.owner = owner  # a submodule: its weights are the traced graph's constants
            self.out_layout = None

        def forward(self, *tensors):
            args, kwargs = _rebuild(layout, tensors)
            out = fn(*args, **kwargs)
            flat: list = []
            self.out_layout = _out_layout(out, flat)
            return tuple(flat)

    return Traceable()


def fingerprint(module) -> str:
    """A cheap digest of a module's weights: names, shapes, dtypes, each tensor's sum and a strided sample.
    Any weight change a user makes (a fused LoRA, another checkpoint) changes it."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            flat = t.detach().reshape(-1)
            step = max(1, flat.numel() // 64)
            h.update(f"{name}{tuple(t.shape)}{t.dtype}{float(flat.float().sum()):.6e}".encode())
            h.update(flat[::step].float().cpu().numpy().tobytes())
    return h.hexdigest()[:24]


class _Engine:
    """One module's compiled models, by input signature."""

    def __init__(self, opt: OpenVINO, part: str, owner, fn):
        self.opt, self.part, self.owner, self.fn = opt, part, owner, fn
        self.models: dict = {}  # signature -> (compiled model, infer request, output layout)
        self.eager_noted = False
        self._fingerprint: str | None = None
        self._modules = list(owner.modules())
        self._walk = False
        self._hooks = self._hook_count()
        self._weights = self._weights_state()
        self._versions = self._versions_now()

    def _weights_state(self) -> tuple:
        """Once per generation (``OpenVINO._reset``): which tensors the module holds and unfused LoRA layers'
        active adapters and scales -- what the exported graphs baked in. Walks every module (a LoRA loaded since
        adds modules), which costs milliseconds: too much for every UNet call of a small model."""
        modules = list(self.owner.modules())
        self._params = [p for m in modules for p in m.parameters(recurse=False)]
        params = tuple(id(p) for p in self._params)
        loras = tuple((tuple(m.active_adapters), repr(m.scaling), getattr(m, "merged", False),
                       getattr(m, "disable_adapters", False)) for m in modules
                      if hasattr(m, "scaling") and hasattr(m, "active_adapters"))
        return params, loras

    def _versions_now(self) -> tuple:
        """Every call: the in-place version counters of the tensors found at the last walk (a fused LoRA or a
        weight copied in bumps them; microseconds)."""
        return tuple(p._version for p in self._params)

    def new_generation(self) -> None:
        """Walk the module again before the next call (a LoRA may have been loaded in between)."""
        self._walk = True

    def _hook_count(self) -> int:
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in self._modules)

    def __call__(self, *args, **kwargs):
        if self.part == "vae decode" and "generator" in kwargs and type(self.owner).__name__ in _DECODE_IGNORES:
            kwargs = {k: v for k, v in kwargs.items() if k != "generator"}
        if self._hook_count() != self._hooks:  # hooks added since (deepcache's MAC count of one call): they
            return self.fn(*args, **kwargs)  # must see the modules run, so this call runs in PyTorch
        weights = self._weights_state() if self._walk else self._weights
        self._walk = False
        versions = self._versions_now()
        if weights != self._weights or versions != self._versions:  # re-export: the compiled graphs hold the
            self._weights, self._versions, self._fingerprint = weights, versions, None  # old weights / scales
            self.models.clear()
            self.opt.state.events.append(f"openvino: {self.part} weights or LoRA scales changed; exporting again")
        tensors: list = []
        try:
            layout = _flatten((args, kwargs), tensors, self.part)
        except TypeError as err:
            return self._eager(err, args, kwargs)
        if any(t.device.type != "cpu" or t.dtype == torch.bfloat16 for t in tensors):
            return self._eager("a CUDA or bfloat16 input", args, kwargs)
        entry = self.models.get(layout)
        if entry is None:
            entry = self.models[layout] = self.opt._build(self, layout, tensors, args, kwargs)
        compiled, request, out_layout = entry
        inputs = [t.detach().contiguous().numpy() for t in tensors]
        result = request.infer(inputs, share_inputs=True)
        outs = [torch.from_numpy(np.array(result[compiled.output(i)])) for i in range(len(compiled.outputs))]
        return _out_rebuild(out_layout, outs)

    def _eager(self, why, args, kwargs):
        if not self.eager_noted:
            self.eager_noted = True
            self.opt.state.events.append(f"openvino: {self.part} runs in PyTorch for calls with {why}")
        return self.fn(*args, **kwargs)

    def key(self, layout) -> str:
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.owner)
        import openvino

        import diffspeed

        text = json.dumps([self._fingerprint, type(self.owner).__qualname__, repr(layout), openvino.__version__,
                           torch.__version__, diffspeed.__version__, self.part])
        return hashlib.sha256(text.encode()).hexdigest()[:32]


@register
class OpenVINO(Optimization):
    Config = OpenVINOConfig
    summary = "run the UNet (whole or block by block), VAE decode and text encoders on OpenVINO (CPU engine)"
    last = True
    noop = None  # OpenVINO's kernels reorder sums: no config is bit-identical to PyTorch
    example = {"precision": "f32"}
    contract_slow = True  # every contract run exports a UNet
    conflicts = {"compile": "both replace the UNet's forward with a compiled graph; use one",
                 "offload": "OpenVINO runs on the CPU; offload moves components to an accelerator"}

    @classmethod
    def requirements(cls, config, pipe=None) -> list[str]:
        out = []
        if importlib.util.find_spec("openvino") is None:
            out.append("needs the openvino package (pip install 'diffspeed[openvino]')")
        if pipe is not None:
            unet = getattr(pipe, "unet", None)
            if unet is None:
                out.append("needs a pipeline with a UNet (pipe.unet)")
            elif next(unet.parameters()).device.type != "cpu":
                out.append(f"OpenVINO runs PyTorch-side inputs on the CPU; the UNet is on "
                           f"{next(unet.parameters()).device.type} (load it on the CPU)")
            elif next(unet.parameters()).dtype == torch.bfloat16:
                out.append("the UNet is bfloat16 (precision): OpenVINO sets its own compute precision; use "
                           "openvino.precision=bf16 on a float32 pipeline instead")
            if config.vae and getattr(pipe, "vae", None) is None:
                out.append("openvino.vae needs a pipeline with a VAE")
        return out

    # ------------------------------------------------------------------------------------------ apply
    def _apply(self, pipe, state: RunState, edits: Edits) -> None:
        import openvino

        c = self.config
        self._core = openvino.Core()
        self._dir = Path(os.path.expanduser(c.cache_dir)) if c.cache_dir else None
        if self._dir is not None:
            try:
                (self._dir / "ir").mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise DiffspeedError(f"openvino.cache_dir: cannot create {self._dir}: {err.strerror}",
                                     field="cache_dir") from err
            self._core.set_property({"CACHE_DIR": str(self._dir / "blobs")})
        self.engines: list[_Engine] = []
        unet = pipe.unet
        if c.regional:
            mid = [unet.mid_block] if unet.mid_block is not None else []
            units = [m for u in [*down_units(unet), *up_units(unet)] for m in u.modules] + mid
            for i, module in enumerate(units):
                edits.wrap_beneath(module, "forward", lambda fn, m=module, i=i: self._engine(f"unet block {i}", m, fn))
        else:
            edits.wrap_beneath(unet, "forward", lambda fn: self._engine("unet", unet, fn))
        if c.vae:
            edits.wrap_beneath(pipe.vae, "decode", lambda fn: self._engine("vae decode", pipe.vae, fn))
        if c.text_encoder:
            for name in ("text_encoder", "text_encoder_2"):
                enc = getattr(pipe, name, None)
                if enc is not None:
                    edits.wrap_beneath(enc, "forward", lambda fn, e=enc, n=name: self._engine(n, e, fn))

    def _reset(self) -> None:
        for engine in getattr(self, "engines", []):
            engine.new_generation()

    def _engine(self, part, owner, fn) -> _Engine:
        engine = _Engine(self, part, owner, fn)
        self.engines.append(engine)
        return engine

    def _properties(self) -> dict:
        props = {"INFERENCE_NUM_THREADS": torch.get_num_threads(), "PERFORMANCE_HINT": "LATENCY"}
        if self.config.precision != "auto":
            props["INFERENCE_PRECISION_HINT"] = self.config.precision
        return props

    def _build(self, engine: _Engine, layout, tensors, args, kwargs):
        """Export (or load from the disk cache) and compile ``engine``'s module for this call's layout."""
        import openvino

        t0 = time.perf_counter()
        key = engine.key(layout)
        xml = self._dir / "ir" / f"{key}.xml" if self._dir else None
        meta = xml.with_suffix(".json") if xml else None
        source = "exported"
        if xml is not None and xml.exists() and meta.exists():
            model, out_layout = self._core.read_model(str(xml)), json.loads(meta.read_text())
            source = "loaded from the disk cache"
        else:
            traceable = _traceable(engine.owner, engine.fn, layout)
            with torch.no_grad():
                model = openvino.convert_model(traceable, example_input=tuple(tensors))
                if traceable.out_layout is None:  # convert_model traced without calling forward in Python
                    traceable(*tensors)
            out_layout = traceable.out_layout
            if xml is not None:
                openvino.save_model(model, str(xml), compress_to_fp16=False)
                meta.write_text(json.dumps(out_layout))
        compiled = self._core.compile_model(model, self.config.device, self._properties())
        seconds = time.perf_counter() - t0
        state = self.state
        state.stats["compile_ms"] += round(seconds * 1000)
        state.stats["compiled_graphs"] += 1
        shape = next((tuple(t.shape) for t in tensors), ())
        precision = compiled.get_property("INFERENCE_PRECISION_HINT") if self.config.device == "CPU" else "?"
        precision = precision.get_type_name() if hasattr(precision, "get_type_name") else precision
        if len(self.engines) == 1 or not engine.part.startswith("unet block") or engine.part == "unet block 0":
            state.events.append(f"openvino: {engine.part} {source} and compiled for input {shape} in {seconds:.1f} s "
                                f"(precision {precision})")
        return compiled, compiled.create_infer_request(), out_layout
