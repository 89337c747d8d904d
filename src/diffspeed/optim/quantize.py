"""quantize: store weights in 8 bits, per component, leaving the sensitive layers alone; exactly reversible.

Methods (``method``):

- ``fp8`` / ``fp8_e5m2``: diffusers' layerwise casting (``diffusers.hooks.layerwise_casting``): the weights of
  each Linear / Conv / ConvTranspose layer are stored in float8 (e4m3fn: 3 mantissa bits, range +-448; e5m2:
  2 mantissa bits, range +-57344) and each layer casts its own weights back up for its forward and down after
  it, so one layer's full-precision copy is alive at a time. A quarter of fp32's bytes, half of bf16's; the
  price is one weight cast per layer per call (two in fact: diffusers casts back down after the forward). Works
  on every device torch has float8 for (CPU, CUDA). On a CPU the e4m3 -> fp32 cast is the slow part (about 3x
  the time of bf16 -> fp32 per element on the 2-core EPYC of benchmarks/quantize; e5m2, a truncated fp16,
  casts about as fast as bf16): fp8 buys memory with speed there.
  Layers compute in the dtype the component runs in -- the dtype their weights have when quantize is applied:
  diffusers' hook casts weights, not inputs, so any other dtype would meet the activations with a mismatch. For
  bf16/fp16 compute, list ``precision`` (e.g. ``unet = "bf16"``, which casts the component and its inputs)
  before quantize; ``precision.compute`` on a component quantize covers is rejected (both would upcast).
- ``int8_weight_only`` / ``int8_dynamic``: torchao's ``quantize_`` (``Int8WeightOnlyConfig`` /
  ``Int8DynamicActivationInt8WeightConfig``, symmetric per output channel; the dynamic one quantizes each
  activation row too and multiplies in int8). torchao 0.18 quantizes ``nn.Linear`` layers only, so a UNet,
  two thirds of whose weights are convolutions (SD 1.5: 68.5 %), keeps those in full precision. Needs the
  ``[quant]`` extra (``pip install 'diffspeed[quant]'``).

``skip`` is one regular expression searched (``re.search``) in the dotted path of each layer and of its parents
inside the component, as ``skip_modules_pattern`` is in diffusers: a match leaves the layer -- or the whole
subtree -- in full precision. The default keeps the layers quantization hurts most and saves least on: norms,
the embeddings (time, added-condition, class, position, patch and the resnets' time projections), the first and
last convolution of every component (``conv_in`` / ``conv_out``), diffusers' top-level ``proj_in`` / ``proj_out``
(DEFAULT_SKIP_MODULES_PATTERN), and a loaded LoRA's own layers (``lora_A`` / ``lora_B``, always skipped: peft
casts their inputs to their weights' dtype).

Reversible: the original tensors are kept (in host memory, or with ``originals="disk"`` in a temporary file, so
the quantized weights really take less RAM while applied), the very ``Parameter`` objects are put back, and the
hooks, registries and instance attributes the methods add are removed: remove() restores every bit.
Apply it after optimizations that change weights (``precision``, ``accelerator``). torchao's quantized tensors
cannot be moved out by ``staged``'s release (rejected with int8 methods); fp8 weights can.

Each call's events say what was quantized: ``quantize: unet weights 3438.1 MB -> 943.8 MB (fp8, ...)``;
:func:`weight_bytes` measures a module (quantized tensors count their stored bytes).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import re
import tempfile
from importlib import metadata

from diffspeed._lazy import lazy_import
from diffspeed.core import Edits, OptConfig, Optimization, RunState, param, register
from diffspeed.errors import DiffspeedError

torch = lazy_import("torch")

METHODS = ("fp8", "fp8_e5m2", "int8_weight_only", "int8_dynamic")
COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "vae")
# norms; time/added/class/position/patch embeddings and the resnets' time_emb_proj; every conv_in/conv_out;
# diffusers' top-level proj_in/proj_out (its DEFAULT_SKIP_MODULES_PATTERN); a loaded LoRA's layers
DEFAULT_SKIP = r"norm|emb|(^|\.)conv_(in|out)$|^proj_(in|out)$|lora_"
_LORA = re.compile(r"lora_")  # peft casts a LoRA layer's input to its weight's dtype: never quantized
_HOOK = "layerwise_casting"  # diffusers' name: its own checks (_is_layerwise_casting_active) see these layers
_TORCHAO = "0.18"
_MISSING = object()


def _split(components: str) -> list[str]:
    return [c for c in re.split(r"[+,\s]+", components) if c]


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantizeConfig(OptConfig):
    name = "quantize"
    method: str = param("fp8", "fp8 (float8 e4m3 storage, each layer upcast to the component's dtype for its "
                        "forward: a quarter of fp32's weight bytes), fp8_e5m2 (wider range, coarser), "
                        "int8_weight_only or int8_dynamic (torchao, Linear layers only; needs diffspeed[quant])",
                        choices=METHODS)
    components: str = param("unet", "the components to quantize, joined by '+': unet, text_encoder, "
                            "text_encoder_2, vae (e.g. 'unet+text_encoder')")
    skip: str = param(DEFAULT_SKIP, "regular expression searched in each layer's dotted path (and its parents'): "
                      "matching layers stay in full precision; the default keeps norms, embeddings, conv_in/"
                      "conv_out and top-level proj_in/proj_out ('.' skips everything)")
    originals: str = param("memory", "where the original weights wait for remove(): memory (host RAM: quick to "
                           "restore, saves accelerator memory only) or disk (a temporary file, so the quantized "
                           "weights really take less RAM)", choices=("memory", "disk"))
    spill_dir: str | None = param(None, "originals=disk: folder of the temporary file (None: the system temp "
                                  "folder; put it on a disk, not a tmpfs)", kind=str)

    def checks(self) -> list[tuple[str, str]]:
        out = []
        names = _split(self.components)
        unknown = [c for c in names if c not in COMPONENTS]
        if not names or unknown:
            out.append(("components", f"quantize.components must name one or more of {', '.join(COMPONENTS)} "
                                      f"joined by '+'; got {self.components!r}"))
        elif len(set(names)) != len(names):
            out.append(("components", f"quantize.components names a component twice: {self.components!r}"))
        try:
            re.compile(self.skip)
        except re.error as err:
            out.append(("skip", f"quantize.skip is not a regular expression ({err}): {self.skip!r}"))
        return out

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(_split(self.components))


# ------------------------------------------------------------------------------------------------ measuring
def tensor_bytes(t) -> int:
    """Bytes ``t`` stores; a quantized tensor subclass (torchao) counts its inner tensors (data and scales)."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(inner) for n in names if (inner := getattr(t, n, None)) is not None)
    return t.numel() * t.element_size()


def weight_bytes(module) -> int:
    """Bytes of ``module``'s parameters and buffers as stored now (shared tensors once)."""
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += tensor_bytes(t)
    return total


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


# ------------------------------------------------------------------------------------------------ targets
def targets(root, kinds: tuple, skip: str) -> list[tuple[str, object]]:
    """(path, layer) of each ``kinds`` layer under ``root`` whose path and parents' paths ``skip`` does not
    match; a matched parent keeps its whole subtree. Layers inside a chosen layer are part of it."""
    pattern = re.compile(skip)
    out = []

    def walk(module, path):
        if path and (pattern.search(path) or _LORA.search(path)):
            return
        if isinstance(module, kinds):
            out.append((path, module))
            return
        for name, child in module.named_children():
            walk(child, f"{path}.{name}" if path else name)

    walk(root, "")
    return out


def _float_weights(layer) -> bool:
    w = getattr(layer, "weight", None)
    return isinstance(w, torch.Tensor) and type(w.data) is torch.Tensor and w.is_floating_point()


def _storage_dtype(method: str):
    return torch.float8_e5m2 if method == "fp8_e5m2" else torch.float8_e4m3fn


# ------------------------------------------------------------------------------------------------ fp8
@functools.cache
def _hook_class():
    """diffusers' LayerwiseCastingHook made removable: its ``deinitalize_hook`` refuses, because casting the
    stored fp8 weights back would not give the originals; here the originals are kept and put back by the
    undo record, so detaching only has to leave the module alone."""
    from diffusers.hooks.layerwise_casting import LayerwiseCastingHook

    class RemovableLayerwiseCasting(LayerwiseCastingHook):
        def deinitalize_hook(self, module):
            return module

    return RemovableLayerwiseCasting


def _hook_layer(layer, storage, compute, edits: Edits) -> None:
    """Register the casting hook on ``layer`` (already cast to ``storage``); undo detaches it and deletes the
    instance ``forward`` and ``_diffusers_hook`` the registry added, unless they were there before."""
    from diffusers.hooks import HookRegistry

    before = {k: layer.__dict__.get(k, _MISSING) for k in ("forward", "_diffusers_hook")}
    registry = HookRegistry.check_if_exists_or_initialize(layer)
    try:
        registry.register_hook(_hook_class()(storage, compute, non_blocking=False), _HOOK)
    except ValueError as err:  # a layerwise-casting hook is there already (enable_layerwise_casting)
        _put_back(layer, before, registry)
        raise DiffspeedError(f"quantize: {err}", field="method") from err

    def undo():
        registry.remove_hook(_HOOK, recurse=False)
        _put_back(layer, before, registry)

    edits.record(f"layerwise casting of {type(layer).__name__}", undo)
    edits.counts["hooks"] += 1


def _put_back(layer, before: dict, registry) -> None:
    if registry.hooks:  # someone else's hooks are still registered: their forward and registry stay
        return
    for k, v in before.items():
        if v is _MISSING:
            layer.__dict__.pop(k, None)
        else:
            layer.__dict__[k] = v


# ------------------------------------------------------------------------------------------------ int8
def _torchao_problem() -> str | None:
    if importlib.util.find_spec("torchao") is None:
        return "needs torchao (pip install 'diffspeed[quant]')"
    try:
        version = metadata.version("torchao")
    except metadata.PackageNotFoundError:
        version = "0"
    if tuple(int(x) for x in re.findall(r"\d+", version)[:2]) < tuple(int(x) for x in _TORCHAO.split(".")):
        return f"needs torchao >= {_TORCHAO} (installed: {version}; pip install 'diffspeed[quant]')"
    return None


def _ao_config(method: str):
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig

    # set_inductor_config=False: True would change torch._inductor's global settings, which remove() cannot see
    if method == "int8_dynamic":
        return Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)
    return Int8WeightOnlyConfig(set_inductor_config=False)


# ------------------------------------------------------------------------------------------ the optimization
@register
class Quantize(Optimization):
    Config = QuantizeConfig
    summary = "8-bit weights per component: fp8 storage with per-layer upcast (diffusers), int8 (torchao)"
    conflicts = {"openvino": "OpenVINO exports the weights into its own graph at their full precision: the "
                             "quantized PyTorch weights would save nothing there"}
    noop = {"skip": "."}  # every layer skipped: nothing quantized
    example = {"method": "fp8", "components": "unet+text_encoder+vae"}

    @classmethod
    def requirements(cls, config: QuantizeConfig, pipe=None) -> list[str]:
        out = []
        if config.method.startswith("int8") and (problem := _torchao_problem()):
            out.append(f"quantize.method {config.method!r} {problem}")
        if config.originals == "disk" and config.spill_dir is not None and not os.path.isdir(config.spill_dir):
            out.append(f"quantize.spill_dir {config.spill_dir!r} is not a folder")
        if pipe is not None:
            missing = [c for c in config.parts if getattr(pipe, c, None) is None]
            if missing:
                out.append(f"quantize.components names {', '.join(missing)}, which this pipeline "
                           f"({type(pipe).__name__}) does not have")
            if config.method.startswith("fp8"):
                devices = {next(m.parameters()).device.type for c in config.parts
                           if (m := getattr(pipe, c, None)) is not None and any(True for _ in m.parameters())}
                if "mps" in devices:
                    out.append(f"quantize.method {config.method!r}: torch has no float8 on MPS; use int8_weight_only")
        return out

    @classmethod
    def clashes(cls, config: QuantizeConfig, others: dict) -> list[str]:
        out = []
        if "staged" in others and config.method.startswith("int8"):
            out.append(f"staged: staged's release moves tensor storages out, which torchao's {config.method} "
                       "tensors do not expose; use quantize.method = \"fp8\" with staged")
        p = others.get("precision")
        if p is not None and p.compute is not None and config.method.startswith("fp8"):
            stored = {"unet": p.unet, "text_encoder": p.text_encoder, "text_encoder_2": p.text_encoder, "vae": p.vae}
            both = [c for c in config.parts if stored.get(c) is not None]
            if both:
                out.append(f"precision: both upcast the layers of {', '.join(both)} per call; fp8 layers compute "
                           f"in the dtype precision stores them in, so leave precision.compute unset or take "
                           f"{', '.join(both)} out of precision (fp8 alone then computes in fp32)")
        return out

    def _apply(self, pipe, state: RunState, edits: Edits) -> None:
        c = self.config
        spill = (c.spill_dir or tempfile.gettempdir()) if c.originals == "disk" else None
        self.weight_bytes: dict[str, tuple[int, int]] = {}
        self._computes: set[str] = set()  # the dtypes fp8 layers compute in, for the note
        layers = 0
        for part in c.parts:
            module = getattr(pipe, part)
            before = weight_bytes(module)
            if c.method.startswith("fp8"):
                layers += self._fp8(module, part, edits, spill)
            else:
                layers += self._int8(module, part, edits, spill)
            self.weight_bytes[part] = (before, weight_bytes(module))
        self.changes = {"layers quantized": layers}
        what = c.method + (f", computed in {'/'.join(sorted(self._computes))}" if self._computes else "")
        self.note = "; ".join(f"quantize: {part} weights {_mb(b)} -> {_mb(a)} ({what})"
                              for part, (b, a) in self.weight_bytes.items())
        self.note += f"; {layers} layers quantized"

    def _fp8(self, module, part: str, edits: Edits, spill) -> int:
        storage = _storage_dtype(self.config.method)
        kinds = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose1d,
                 torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)
        chosen = [(path, layer) for path, layer in targets(module, kinds, self.config.skip)
                  if _float_weights(layer) and layer.weight.dtype != storage]
        if not chosen:
            return 0
        compute = {id(layer): layer.weight.dtype for _, layer in chosen}  # the dtype its inputs arrive in
        self._computes |= {str(d).removeprefix("torch.") for d in compute.values()}
        seen = set()

        def casts():
            for _, layer in chosen:
                for t in [*layer.parameters(), *layer.buffers()]:
                    if t.is_floating_point() and id(t) not in seen:
                        seen.add(id(t))
                        yield t, t.data.to(storage)

        edits.set_tensors(casts(), spill_dir=spill, what=f"fp8 weights of {part}")
        for _, layer in chosen:
            _hook_layer(layer, storage, compute[id(layer)], edits)

        def settle():  # a call that failed inside a layer left its weights upcast: store them in fp8 again
            for _, layer in chosen:
                if layer.weight.dtype != storage:
                    layer.to(dtype=storage)

        edits.on_call_end(settle)
        root = module.__dict__.get("_diffusers_hook")
        if root is not None and hasattr(root, "invalidate_child_registries_cache"):
            root.invalidate_child_registries_cache()  # the component's own diffusers hooks see the new registries
        return len(chosen)

    def _int8(self, module, part: str, edits: Edits, spill) -> int:
        from torchao.quantization import quantize_

        chosen = [layer for _, layer in targets(module, (torch.nn.Linear,), self.config.skip)
                  if _float_weights(layer)]
        if not chosen:
            return 0
        config = _ao_config(self.config.method)
        swapped: list[tuple] = []  # (layer, its original weight Parameter, its extra_repr before)

        def unswap():
            while swapped:
                layer, weight, extra = swapped[-1]
                layer.weight = weight  # the very Parameter object, registered again
                if extra is _MISSING:
                    layer.__dict__.pop("extra_repr", None)
                else:
                    layer.__dict__["extra_repr"] = extra
                swapped.pop()

        edits.record(f"int8 weights of {part}", unswap)  # before quantizing: a failure half-way is undone too

        def quantized():
            for layer in chosen:
                weight = layer.weight
                swapped.append((layer, weight, layer.__dict__.get("extra_repr", _MISSING)))
                quantize_(layer, config, filter_fn=lambda m, fqn, target=layer: m is target)
                if spill is not None:  # the original's bytes go to the file as each layer is done
                    yield weight, torch.empty(0, dtype=weight.dtype, device=weight.device)

        if spill is None:
            for _ in quantized():
                pass
        else:
            counted = edits.counts["tensors changed"]
            edits.set_tensors(quantized(), spill_dir=spill, what=f"originals of the int8 layers of {part}")
            edits.counts["tensors changed"] = counted  # counted once, below: the swap is the change
        edits.counts["tensors changed"] += len(swapped)
        return len(swapped)

    def wrap_call(self, call):
        def noted(*args, **kwargs):
            if self.note not in self.state.events:  # once per run, also when staged calls the pipeline per chunk
                self.state.events.append(self.note)
            return call(*args, **kwargs)

        return noted
