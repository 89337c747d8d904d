"""deepcache: DeepCache (Ma, Fang and Wang, CVPR 2024) -- reuse the deep UNet features across denoiser calls.

Adjacent denoising steps change the deep, low-resolution features of the UNet very little. Every
``interval``-th denoiser call runs in full and keeps the feature that enters the up-path layer consuming skip
feature ``branch`` (see :mod:`diffspeed.core.unet_units`); the calls in between run only the shallow part --
``conv_in``, the down layers producing skip features 1..branch, then the up layers from that consumer on --
and take the deep feature from the cache. ``branch`` 0 is the shallowest boundary (the skip of ``conv_in``).

How it avoids the failures of the published helper (seed 000 and the DeepCache package):
- the call index comes from :class:`~diffspeed.core.RunState` (denoiser calls are counted), never from
  ``scheduler.timesteps.index(t)``, so samplers that repeat timesteps (Heun, DPM2, DPM++ SDE) follow the
  schedule -- which is in denoiser calls, as their cost is;
- skipped modules are wrapped per instance and return placeholders (zero-stride views, no memory) of the
  shape they returned on the last full call, so no diffusers ``forward`` is copied;
- the cache follows the batch when classifier-free guidance is cut off (it keeps the conditional half);
- with a ControlNet on the running pipeline, the ControlNet's deep blocks, mid block and their zero
  convolutions are skipped on cached calls too: their residuals would land on skipped layers;
- state (cache, schedule, counters) belongs to one call and is reset before the next.

``stats``: ``deepcache_full_calls``, ``deepcache_cached_calls`` (the "cache rate" of seed 000 is
cached / all), ``deepcache_total_macs`` (UNet multiply-accumulates had every call run in full) and
``deepcache_skipped_macs``; the theoretical speed-up is total / (total - skipped).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import numpy as np

from diffspeed._lazy import lazy_import
from diffspeed.adapters import adapter_for
from diffspeed.core import Edits, Optimization, RunState, param, register
from diffspeed.core.guards import CachingConfig
from diffspeed.core.unet_units import Unit, consumer_index, down_units, grid_at, n_branches, up_units
from diffspeed.errors import DiffspeedError

torch = lazy_import("torch")
F = lazy_import("torch.nn.functional")

SCHEDULES = ("uniform", "non-uniform")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeepCacheConfig(CachingConfig):
    name = "deepcache"
    interval: int = param(3, "a full UNet pass every N denoiser calls (1 = never reuse; 3-5 are typical)",
                          range=(1, 100))
    branch: int | None = param(None, "skip feature at the cache boundary, 0 = shallowest (fastest); default "
                               "per model family (diffspeed.adapters)", range=(0, 64), kind=int)
    schedule: str = param("uniform", "uniform: every interval-th call in full; non-uniform: full passes "
                          "packed around `center` (the paper's quadratic schedule)", choices=SCHEDULES)
    center: float = param(0.6, "non-uniform: where full passes are densest, as a fraction of the calls",
                          range=(0.0, 1.0))
    power: float = param(1.4, "non-uniform: how strongly full passes crowd the centre (1 = uniform)",
                         range=(1.0, 4.0))
    start: float = param(0.0, "fraction of the calls at the start that always run in full (the web-UI "
                         "extension caches nothing in the first part)", range=(0.0, 1.0))
    end: float = param(1.0, "fraction of the calls after which every call runs in full", range=(0.0, 1.0))
    max_timestep_jump: int | None = param(None, "also refresh when the timestep moved more than this (train "
                                          "timesteps) since the last full pass; reads t on the host",
                                          range=(1, 1000), kind=int)
    hires_reuse: bool = param(False, "hires fix: the second pass starts from the first pass's last deep feature "
                              "(resized) instead of a full call (the web-UI extension's hires reuse)")

    def checks(self):
        if self.start >= self.end:
            return [("end", f"deepcache.end must be greater than start ({self.start}), got {self.end}")]
        return []


@dataclasses.dataclass
class _Plan:
    """What runs on a cached call, found once from the model's modules."""

    skipped: list[torch.nn.Module]  # whole blocks or single modules that return placeholders
    cache_point: torch.nn.Module  # its output is the cached deep feature
    skipped_ids: set[int]  # every module (with descendants) not run on a cached call


def _plan(model, branch: int, *, with_up: bool) -> _Plan:
    """Skip down units ``branch..`` and the mid block; with ``with_up`` also the up units before the layer
    consuming skip feature ``branch``, the last of which becomes the cache point (the mid block if there is
    none). Blocks whose every unit is skipped are skipped whole (less Python, no concatenated placeholders)."""
    down = _skip_list(down_units(model)[branch:])
    up = _skip_list(up_units(model)[:consumer_index(model, branch)]) if with_up else []
    mid = [model.mid_block] if model.mid_block is not None else []
    skipped = down + mid + up
    cache_point = (up or mid)[-1] if with_up else None
    return _Plan(skipped, cache_point, {id(m) for s in skipped for m in s.modules()})


def _skip_list(units: list[Unit]) -> list[torch.nn.Module]:
    out: list[torch.nn.Module] = []
    by_block: dict[int, list[Unit]] = {}
    for u in units:
        by_block.setdefault(id(u.block), []).append(u)
    for us in by_block.values():
        block = us[0].block
        n_units = len(block.resnets) + len(getattr(block, "downsamplers", None) or []) + len(
            getattr(block, "upsamplers", None) or [])
        out += [block] if len(us) == n_units else [m for u in us for m in u.modules]
    return out


@dataclasses.dataclass(frozen=True)
class _Spec:
    """A tensor's shape, dtype and device, as a skipped module returned it on the last full call."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device


@dataclasses.dataclass(frozen=True)
class _OutputSpec:
    """A diffusers ``BaseOutput`` whose fields are specs."""

    cls: type
    fields: dict


def _template(out):
    """The structure of ``out`` with each tensor replaced by a :class:`_Spec`."""
    if isinstance(out, torch.Tensor):
        return _Spec(tuple(out.shape), out.dtype, out.device)
    if isinstance(out, (tuple, list)):
        return type(out)(_template(o) for o in out)
    if hasattr(out, "to_tuple"):  # a diffusers BaseOutput
        return _OutputSpec(type(out), {k: _template(v) for k, v in out.items()})
    raise TypeError(f"deepcache: cannot stand in for a {type(out).__name__} output")


def _placeholder(tpl, batch: int, tensor=None, real: bool = False):
    """A stand-in built from :func:`_template` with ``batch`` rows: ``tensor`` as the first output, zeros
    elsewhere -- zero-stride views (no memory), or ``real`` zeros where a block writes into its input in place
    (FreeU scales half the channels of an up layer's input in place)."""
    if isinstance(tpl, _Spec):
        if tensor is not None:
            return tensor
        if real:
            return torch.zeros((batch, *tpl.shape[1:]), dtype=tpl.dtype, device=tpl.device)
        return torch.zeros((), dtype=tpl.dtype, device=tpl.device).expand(batch, *tpl.shape[1:])
    if isinstance(tpl, _OutputSpec):
        return tpl.cls(**{k: _placeholder(v, batch, tensor, real) for k, v in tpl.fields.items()})
    first = [tensor] + [None] * (len(tpl) - 1)  # the cached tensor is the first output (hidden states)
    return type(tpl)(_placeholder(t, batch, x, real) for t, x in zip(tpl, first))


@dataclasses.dataclass(frozen=True)
class _Counted:
    """The modules whose multiply-accumulates are counted, found once at apply."""

    products: list[tuple[torch.nn.Module, int, bool]]  # conv / linear: (module, MACs per output element, skipped)
    attentions: list[tuple[torch.nn.Module, bool]]  # attention products: (module, skipped)


def _countable(model, skipped_ids: set[int]) -> _Counted:
    """Every conv, linear and attention module of ``model``; skipped: not run on a cached call."""
    from diffusers.models.attention_processor import Attention

    products, attentions = [], []
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            products.append((m, m.in_channels // m.groups * math.prod(m.kernel_size), id(m) in skipped_ids))
        elif isinstance(m, torch.nn.Linear):
            products.append((m, m.in_features, id(m) in skipped_ids))
        elif isinstance(m, Attention):
            attentions.append((m, id(m) in skipped_ids))
    return _Counted(products, attentions)


def _macs_hooks(edits: Edits, counted: _Counted, total: list[int], skipped: list[int]) -> None:
    """Forward hooks, recorded in ``edits`` as one step, that add each counted module's multiply-accumulates to
    ``total`` (and to ``skipped`` for the modules a cached call skips). Plain handles rather than one record each:
    they live for one full call, and a few hundred of them are put on and taken off per counted shape."""

    def product(k: int, skip: bool):
        def hook(module, args, out):
            n = out.numel() * k
            total[0] += n
            if skip:
                skipped[0] += n

        return hook

    def attention(skip: bool):
        def hook(module, args, kwargs, out):
            h = args[0] if args else kwargs["hidden_states"]
            ctx = kwargs.get("encoder_hidden_states")
            lq = h.shape[1] if h.dim() == 3 else math.prod(h.shape[2:])
            lk = lq if ctx is None else ctx.shape[1]
            n = 2 * h.shape[0] * lq * lk * module.inner_dim
            total[0] += n
            if skip:
                skipped[0] += n

        return hook

    handles: list = []
    edits.record("MAC-counting hooks", lambda: [h.remove() for h in handles])  # first: a failure half-way is undone
    for m, k, skip in counted.products:
        handles.append(m.register_forward_hook(product(k, skip)))
    for m, skip in counted.attentions:
        handles.append(m.register_forward_hook(attention(skip), with_kwargs=True))


def _resize_hw(hw, old_latent, new_latent) -> tuple[int, int]:
    """The spatial size at ``new_latent`` of a feature that had ``hw`` at ``old_latent`` (same UNet level)."""
    for level in range(8):
        if grid_at(old_latent, level) == tuple(hw):
            return grid_at(new_latent, level)
    raise ValueError(f"deepcache: no UNet level has a {tuple(hw)} grid for a {old_latent} latent")


def _remap(tpl, old_latent, new_latent):
    """A :func:`_template` with every 4-D tensor's spatial size moved from ``old_latent`` to ``new_latent``."""
    if isinstance(tpl, _Spec):
        if len(tpl.shape) != 4:
            return tpl
        return dataclasses.replace(tpl, shape=(*tpl.shape[:2], *_resize_hw(tpl.shape[2:], old_latent, new_latent)))
    if isinstance(tpl, _OutputSpec):
        return dataclasses.replace(tpl, fields={k: _remap(v, old_latent, new_latent) for k, v in tpl.fields.items()})
    return type(tpl)(_remap(t, old_latent, new_latent) for t in tpl)


def full_calls(total: int, c: DeepCacheConfig) -> set[int]:
    """The denoiser call indices (of ``total``) that run in full under config ``c``."""
    lo, hi = math.floor(c.start * total + 1e-9), math.ceil(c.end * total - 1e-9)
    full = set(range(lo)) | set(range(hi, total))
    window = hi - lo
    if window <= 0:
        return full
    if c.schedule == "uniform":
        return full | {lo + i for i in range(0, window, c.interval)}
    # non-uniform: as many full passes as the uniform schedule, at u -> centre + |u|^power spacing, so they
    # crowd around the centre and thin out towards both ends (DeepCache, section 4.3)
    k = math.ceil(window / c.interval)
    centre = c.center * (window - 1)
    u = np.linspace(-1.0, 1.0, k)
    pos = np.where(u < 0, centre - centre * np.abs(u) ** c.power, centre + (window - 1 - centre) * u ** c.power)
    return full | {lo} | {lo + int(round(p)) for p in pos}


class _RunCache:
    """One generation's cache and decisions."""

    def __init__(self):
        self.feature: torch.Tensor | None = None
        self.templates: dict[int, object] = {}
        self.decisions: dict[int, bool] = {}  # call index -> cached?
        self.schedule: set[int] | None = None
        self.last_full_t: float | None = None
        self.t: float | None = None
        self.cached = False  # the current UNet call runs the shallow path
        self.batch = 0
        self.counting: tuple[list[int], list[int]] | None = None  # MACs (all, skipped) of this full call
        self.counters: Edits | None = None  # the counting hooks, a per-call record (see Optimization.call_edits)
        self.latent: tuple[int, int] | None = None
        self.carry: _RunCache | None = None  # the previous pass's cache, for hires_reuse
        self.placeholders: dict[tuple, object] = {}


@register
class DeepCache(Optimization):
    Config = DeepCacheConfig
    call_effect = ('deepcache_cached_calls',)
    summary = "DeepCache: reuse deep UNet features between full passes (~2x at interval 3, small quality cost)"
    stateful = True
    noop = {"interval": 1}
    example = {"interval": 2, "min_steps": 1}

    @classmethod
    def clashes(cls, config, others) -> list[str]:
        return [f"{name}: DeepCache switches the UNet's path every call; a whole-UNet graph would recompile or "
                f"break on each switch; set {name}.regional=true (the blocks are then compiled beneath the cache's "
                f"skips, so a cached call runs compiled shallow blocks only)"
                for name in ("compile", "openvino") if name in others and not getattr(others[name], "regional", True)]

    def __init__(self, config=None, **fields):
        super().__init__(config, **fields)
        self._run = _RunCache()
        self._macs: dict[tuple, tuple[int, int]] = {}  # input shape -> (MACs of a full call, MACs skipped)

    @classmethod
    def requirements(cls, config, pipe=None) -> list[str]:
        if pipe is None or config.branch is None:
            return []
        n = n_branches(pipe.unet)
        return [] if config.branch < n else [f"branch {config.branch} is outside 0..{n - 1} for this UNet"]

    def branch(self, unet) -> int:
        return self.config.branch if self.config.branch is not None else adapter_for(unet).deepcache_branch

    def _apply(self, pipe, state: RunState, edits: Edits) -> None:
        unet = pipe.unet
        self._plan = _plan(unet, self.branch(unet), with_up=True)
        if self.config.max_timestep_jump:
            edits.forward_pre_hook(unet, self._see_timestep, with_kwargs=True)
        edits.forward_pre_hook(unet.conv_in, self._begin)
        edits.forward_hook(unet, self._end)
        self._counted = _countable(unet, self._plan.skipped_ids)
        blocks = {id(b) for b in [*unet.down_blocks, *unet.up_blocks, unet.mid_block]}
        in_up = {id(m) for b in unet.up_blocks for m in b.modules()}
        for module in self._plan.skipped:
            real = id(module) not in blocks and id(module) in in_up
            edits.wrap_method(module, "forward", self._skippable(module, module is self._plan.cache_point, real))

    def _reset(self) -> None:
        old = self._run
        self._run = _RunCache()
        if self.config.hires_reuse and self.state is not None and self.state.continues and old.feature is not None:
            self._run.carry = old

    def _adopt_carry(self, latent: tuple[int, int]) -> None:
        """hires_reuse: take the previous pass's deep feature and placeholder shapes, resized to ``latent``."""
        old = self._run.carry
        self._run.feature = F.interpolate(old.feature, size=_resize_hw(old.feature.shape[-2:], old.latent, latent),
                                          mode="bilinear", align_corners=False)
        self._run.templates = {k: _remap(t, old.latent, latent) for k, t in old.templates.items()}
        self._run.carry = None
        self.state.stats["deepcache_hires_reused"] += 1

    # ------------------------------------------------------------------------------------------ decisions
    def _decide(self, index: int, sample: torch.Tensor) -> bool:
        """Whether denoiser call ``index`` takes the shallow path; decided once per call, so a ControlNet
        (which runs first) and the UNet agree."""
        run = self._run
        if index in run.decisions:
            return run.decisions[index]
        batch = sample.shape[0]
        cached = False
        if index == 0 and run.carry is not None and run.carry.feature.shape[0] in (batch, 2 * batch):
            cached = self.config.caching_allowed(self.state, self.name)
        elif index >= 0 and run.feature is not None and self.config.interval > 1:
            if self.config.caching_allowed(self.state, self.name):
                if run.schedule is None:  # start / end are fractions of the schedule: it must be known
                    run.schedule = full_calls(self.state.require_schedule(self.name, "start"), self.config)
                jump = self.config.max_timestep_jump
                cached = (index not in run.schedule and run.feature.shape[0] in (batch, 2 * batch)
                          and not (jump and run.t is not None and run.last_full_t is not None
                                   and abs(run.t - run.last_full_t) > jump))
        if cached and run.carry is not None:
            self._adopt_carry(tuple(sample.shape[-2:]))
        run.decisions[index] = cached
        return cached

    def _see_timestep(self, module, args, kwargs):
        if self.config.max_timestep_jump:
            t = args[1] if len(args) > 1 else kwargs.get("timestep")
            self._run.t = float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t)

    def _begin(self, module, args):
        run, state = self._run, self.state
        run.batch = args[0].shape[0]
        run.cached = self._decide(state.step, args[0])
        run.latent = tuple(args[0].shape[-2:])
        if run.cached and run.feature.shape[0] not in (run.batch, 2 * run.batch):
            raise DiffspeedError("deepcache: the batch changed within a call in a way the cache cannot follow",
                                 field="deepcache")
        state.stats["deepcache_cached_calls" if run.cached else "deepcache_full_calls"] += 1
        key = tuple(args[0].shape)
        if key in self._macs:
            total, skipped = self._macs[key]
            state.stats["deepcache_total_macs"] += total
            state.stats["deepcache_skipped_macs"] += skipped if run.cached else 0
        elif not run.cached:  # count this full call's MACs once per input shape
            run.counting = ([0], [0])
            # per call: if the UNet fails before _end, the call's end (or remove()) takes these hooks off
            run.counters = self.call_edits.child("MAC counting")
            _macs_hooks(run.counters, self._counted, *run.counting)

    def _end(self, module, args, out):
        run = self._run
        if run.counters is not None:
            run.counters.undo()
            total, skipped = run.counting[0][0], run.counting[1][0]
            self._macs[tuple(args[0].shape)] = (total, skipped)
            self.state.stats["deepcache_total_macs"] += total
            run.counters = None
        if not run.cached:
            run.last_full_t = run.t
        run.cached = False

    # ------------------------------------------------------------------------------------------- wrappers
    def _skippable(self, module, is_cache_point: bool, real: bool):
        key = id(module)

        def forward(inner, *args, **kwargs):
            run = self._run
            if not run.cached:
                out = inner(*args, **kwargs)
                run.templates[key] = _template(out)
                if is_cache_point:  # a copy: the next layer may scale its input in place (FreeU)
                    run.feature = (out if isinstance(out, torch.Tensor) else out[0]).clone()
                return out
            if is_cache_point:
                feature = run.feature if run.feature.shape[0] == run.batch else run.feature[run.batch:]
                return _placeholder(run.templates[key], run.batch, feature.clone(), real)
            if real:  # written in place downstream: a fresh one each call
                return _placeholder(run.templates[key], run.batch, None, True)
            memo = run.placeholders.get((key, run.batch))
            if memo is None:  # zero-stride and read-only: one per module and batch serves every cached call
                memo = run.placeholders[key, run.batch] = _placeholder(run.templates[key], run.batch)
            return memo

        return forward

    # ------------------------------------------------------------------------------------------ ControlNet
    def wrap_call(self, call):
        """While a pipeline with a ControlNet runs, skip the ControlNet's deep half on cached calls."""

        def run(*args, **kwargs):
            cn = getattr(self.state.pipeline, "controlnet", None)
            if cn is None or not hasattr(cn, "controlnet_down_blocks"):
                return call(*args, **kwargs)
            with self._controlnet_hooks(cn):
                return call(*args, **kwargs)

        return run

    @contextlib.contextmanager
    def _controlnet_hooks(self, cn):
        branch = self.branch(self.pipe.unet)
        plan = _plan(cn, branch, with_up=False)
        skipped = plan.skipped + list(cn.controlnet_down_blocks[branch + 1:]) + [cn.controlnet_mid_block]
        edits = self.call_edits.child("ControlNet")
        state = {"cached": False}

        def begin(module, args, kwargs):
            sample = args[0] if args else kwargs["sample"]
            state["cached"] = self._decide(self.state.step + 1, sample)
            state["batch"] = sample.shape[0]

        def skippable(module):
            key = ("cn", id(module))

            def forward(inner, *args, **kwargs):
                if not state["cached"]:
                    out = inner(*args, **kwargs)
                    self._run.templates[key] = _template(out)
                    return out
                return _placeholder(self._run.templates[key], state["batch"])

            return forward

        edits.forward_pre_hook(cn, begin, with_kwargs=True)
        for m in skipped:
            edits.wrap_method(m, "forward", skippable(m))
        try:
            yield
        finally:
            edits.undo()
