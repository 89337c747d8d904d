"""offload: keep weights in CPU memory and move them to the GPU only while they run (seeds 001-003).

Three granularities, all diffusers' own (through accelerate hooks or diffusers' hook registry):

- ``model``: ``enable_model_cpu_offload`` -- one whole component on the GPU at a time (text encoder, then
  UNet, then VAE); GPU memory ~ the largest component plus activations, at little speed cost.
- ``sequential``: ``enable_sequential_cpu_offload`` -- every leaf module's weights are copied in just before it
  runs; the least GPU memory, and slow (one transfer per layer per step).
- ``group``: ``enable_group_offload(offload_type="block_level")`` -- ``blocks_per_group`` blocks at a time;
  ``use_stream`` overlaps the next group's transfer with the current group's compute (pinned host copies).

Undo is exact: before enabling, every submodule's parameter and buffer slots (the very tensor objects), each
tensor's device and attributes, each submodule's instance attributes and the pipeline's offload attributes
are recorded. ``remove()`` takes the accelerate hooks off (``remove_hook_from_module(recurse=True)``) and the
diffusers group-offloading hooks out of every registry, puts the original tensor objects back (sequential
offload swaps in new meta-device parameters), moves them to their original devices and drops the attributes
the hooks added (``_hf_hook``, ``_old_forward``, instance ``forward``, ``_diffusers_hook``).
"""

from __future__ import annotations

import dataclasses
import re

from diffspeed._lazy import lazy_import
from diffspeed.core import Edits, OptConfig, Optimization, RunState, param, register

torch = lazy_import("torch")

MODES = ("model", "sequential", "group")
NO_CUDA = ("offload needs a CUDA device: it moves weights between GPU and CPU memory; on a CPU-only machine "
           "everything already lives in CPU memory")
_PIPE_ATTRS = ("_offload_gpu_id", "_offload_device", "_all_hooks")
_MISSING = object()


@dataclasses.dataclass(frozen=True, kw_only=True)
class OffloadConfig(OptConfig):
    name = "offload"
    mode: str = param("model", "model: one component on the GPU at a time; sequential: one layer at a time "
                               "(least memory, slow); group: blocks_per_group blocks at a time", choices=MODES)
    device: str = param("cuda", "the GPU that runs each part: cuda or cuda:N")
    blocks_per_group: int = param(1, "group mode: blocks moved together; more is faster, fewer is leaner",
                                  range=(1, 64))
    use_stream: bool = param(False, "group mode: prefetch the next group on a CUDA stream (needs pinned host "
                                    "memory as large as the offloaded weights)")

    def checks(self):
        out = []
        if not re.fullmatch(r"cuda(:\d+)?", self.device):
            out.append(("device", f"offload.device must be cuda or cuda:N, got {self.device!r}"))
        if self.use_stream and self.mode != "group":
            out.append(("use_stream", f"offload.use_stream only applies to mode 'group', not {self.mode!r}"))
        return out


def enable(pipe, mode: str, device: str, blocks_per_group: int = 1, use_stream: bool = False) -> None:
    """Switch on diffusers' offloading of ``mode`` with ``device`` as the execution device."""
    if mode == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif mode == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.enable_group_offload(onload_device=torch.device(device), offload_device=torch.device("cpu"),
                                  offload_type="block_level", num_blocks_per_group=blocks_per_group,
                                  use_stream=use_stream)


def _components(pipe) -> list[torch.nn.Module]:
    return [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]


class Placement:
    """Which tensor objects every submodule holds, where each lives, and the attributes around them;
    :meth:`restore` takes every offload hook off and puts all of it back."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.pipe_attrs = {k: pipe.__dict__.get(k, _MISSING) for k in _PIPE_ATTRS}
        self.modules: list[tuple] = []  # (module, instance attributes, parameter slots, buffer slots)
        self.tensors: dict[int, tuple] = {}  # id -> (tensor, device, tensor attributes)
        seen = set()
        for component in _components(pipe):
            for sub in component.modules():
                if id(sub) in seen:
                    continue
                seen.add(id(sub))
                self.modules.append((sub, dict(vars(sub)), dict(sub._parameters), dict(sub._buffers)))
                for t in [*sub._parameters.values(), *sub._buffers.values()]:
                    if t is not None and id(t) not in self.tensors:
                        self.tensors[id(t)] = (t, t.device, dict(t.__dict__))

    def restore(self) -> None:
        from accelerate.hooks import remove_hook_from_module
        from diffusers.hooks.group_offloading import (
            _GROUP_OFFLOADING,
            _LAYER_EXECUTION_TRACKER,
            _LAZY_PREFETCH_GROUP_OFFLOADING,
        )

        for component in _components(self.pipe):
            remove_hook_from_module(component, recurse=True)
        for sub, *_ in self.modules:
            registry = sub.__dict__.get("_diffusers_hook")
            for name in (_LAZY_PREFETCH_GROUP_OFFLOADING, _LAYER_EXECUTION_TRACKER, _GROUP_OFFLOADING):
                if registry is not None:
                    registry.remove_hook(name, recurse=False)
        for sub, _, params, buffers in self.modules:  # sequential offload put new meta parameters there
            sub._parameters.clear()
            sub._parameters.update(params)
            sub._buffers.clear()
            sub._buffers.update(buffers)
        for t, device, attrs in self.tensors.values():
            data = t.data
            if data.device != device:
                t.data = data.to(device)
            elif device.type == "cpu" and data.is_pinned():
                t.data = data.clone()  # group offload's pinned host copy: back to ordinary memory
            t.__dict__.clear()
            t.__dict__.update(attrs)  # accelerate pops ``_is_hf_initialized`` from the parameters it replaces
        for sub, attrs, _, _ in self.modules:
            _restore_dict(vars(sub), attrs)
        for k, v in self.pipe_attrs.items():
            if v is _MISSING:
                self.pipe.__dict__.pop(k, None)
            else:
                self.pipe.__dict__[k] = v


def _restore_dict(now: dict, before: dict) -> None:
    for k in [k for k in now if k not in before]:
        del now[k]
    for k, v in before.items():
        if now.get(k, _MISSING) is not v:
            now[k] = v


def _offloaded(pipe) -> bool:
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    return any(hasattr(m, "_hf_hook") for c in _components(pipe) for m in c.modules()) or any(
        _is_group_offload_enabled(c) for c in _components(pipe))


@register
class Offload(Optimization):
    Config = OffloadConfig
    summary = "keep weights in CPU memory, move them to the GPU per component, layer or block group"
    conflicts = {"staged": "staged already frees whole components between its phases"}
    noop = None  # every mode moves weights
    example = {"mode": "model"}

    @classmethod
    def requirements(cls, config, pipe=None) -> list[str]:
        if not torch.cuda.is_available():
            return [NO_CUDA]
        problems = []
        index = int(config.device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            problems.append(f"offload.device {config.device!r} does not exist; this machine has "
                            f"{torch.cuda.device_count()} CUDA device(s)")
        if pipe is not None:
            if config.mode == "model" and getattr(pipe, "model_cpu_offload_seq", None) is None:
                problems.append(f"{type(pipe).__name__} declares no model_cpu_offload_seq; use mode 'group'")
            if _offloaded(pipe):
                problems.append("the pipeline is already offloaded (accelerate or group-offload hooks); remove "
                                "those first")
        return problems

    def _apply(self, pipe, state: RunState, edits: Edits) -> None:
        c = self.config
        placement = Placement(pipe)
        edits.record("offload hooks and tensor placement", placement.restore)
        enable(pipe, c.mode, c.device, c.blocks_per_group, c.use_stream)
