"""accelerator: a step-distilled LoRA (LCM, TCD, Hyper-SD, SDXL-Lightning) or UNet, fused exactly-reversibly, with
the sampler, step count and guidance its authors recommend.

Since the seeds were written the largest speed-ups people use are step distillation: the same UNet, nudged by a
LoRA, draws in 2-8 steps instead of 20-30, usually without classifier-free guidance (one UNet pass per step
instead of two). Each method was distilled for one sampler and needs it:

========== ================================ ===================== ======================================
method     sampler (diffspeed name)          steps                 guidance
========== ================================ ===================== ======================================
lcm        LCM (LCMScheduler)                4 (2-8)               1 (1-2; 1 skips the unconditional pass)
tcd        TCD (TCDScheduler, eta/gamma 0.3) 4                     0 (none)
hyper-sd   DDIM Trailing                     the file's N-step     0 (none)
lightning  Euler Trailing                    the file's N-step     0 (none)
========== ================================ ===================== ======================================

("N-step" is read from the file name, e.g. ``Hyper-SD15-8steps-lora.safetensors``, ``sdxl_lightning_4step_lora``.)
A step count or CFG scale given by the call (``--steps``, ``--cfg-scale``) wins, with a note in the result's events.

The LoRA is read in any layout diffusers reads (its own, peft's, kohya's with ``.alpha``, with diffusers or SGM
block names): diffusers converts the keys (``lora_state_dict`` / ``convert_unet_state_dict_to_peft``); the delta
``up @ down * alpha / rank * weight`` is added to each base weight and the original tensors are kept (in memory,
or with ``originals="disk"`` in files), so ``remove()`` puts back the exact original weights -- peft's own
unfuse subtracts the delta again and leaves rounding residue. Other LoRAs loaded with ``--lora`` stay loaded and
unfused on top (peft's base layers are the very tensors changed here). ``unet=`` loads a full distilled UNet
checkpoint of the same architecture instead (same exact restore). Nothing is fused into a text encoder unless the
file has text-encoder layers.

``lora=None`` uses the LoRA shipped for the loaded model (``tiny-sd`` + ``lcm``: ``tiny-sd-lcm-lora``, distilled by
``tools/train_tiny_lcm.py``); for other models give the file.

Few-step runs and the other optimizations: the step-skipping and guidance-skipping ones have nothing left to skip
and are rejected (see ``conflicts``); DeepCache refuses runs under its own few-step guard at call time.
"""

from __future__ import annotations

import dataclasses
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from diffspeed._lazy import lazy_import
from diffspeed.core import Edits, OptConfig, Optimization, RunState, param, register
from diffspeed.errors import DiffspeedError

torch = lazy_import("torch")


@dataclass(frozen=True)
class Method:
    sampler: str
    steps: int  # recommended; for N-step files, the fallback when the file name does not say
    cfg: float
    source: str  # where the numbers come from
    steps_from_name: bool = False


METHODS: dict[str, Method] = {
    "lcm": Method("LCM", 4, 1.0, "LCM-LoRA (Luo et al. 2023): 2-8 steps, guidance 1-2"),
    "tcd": Method("TCD", 4, 0.0, "TCD (Zheng et al. 2024): 4-8 steps, no guidance, gamma (eta) 0.3"),
    "hyper-sd": Method("DDIM Trailing", 8, 0.0, "Hyper-SD (Ren et al. 2024): the N-step LoRA at N steps, DDIM "
                       "with trailing timesteps, no guidance", steps_from_name=True),
    "lightning": Method("Euler Trailing", 4, 0.0, "SDXL-Lightning (Lin et al. 2024): the N-step LoRA at N steps, "
                        "Euler with trailing timesteps, no guidance", steps_from_name=True),
}

# (shipped model, method) -> the LoRA shipped for it
SHIPPED: dict[tuple[str, str], str] = {("tiny-sd", "lcm"): "tiny-sd-lcm-lora"}

_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


@dataclasses.dataclass(frozen=True, kw_only=True)
class AcceleratorConfig(OptConfig):
    name = "accelerator"
    method: str = param("lcm", "the distillation method: its sampler, steps and guidance (lcm, tcd, hyper-sd, "
                        "lightning)", choices=tuple(METHODS))
    lora: str | None = param(None, "the distilled LoRA: a .safetensors file, a folder holding one, or a shipped "
                             "name; None: the one shipped for the loaded model (tiny-sd: tiny-sd-lcm-lora)", kind=str)
    unet: str | None = param(None, "a full distilled UNet of the same architecture instead of a LoRA: a diffusers "
                             "UNet folder or a .safetensors file of its weights", kind=str)
    weight: float = param(1.0, "LoRA strength (1 = as distilled)", range=(0.0, 2.0))
    steps: int | None = param(None, "default steps; None: the method's (lcm/tcd 4, N-step files N)", range=(1, 50),
                              kind=int)
    cfg_scale: float | None = param(None, "default guidance; None: the method's (lcm 1, others 0 = none)",
                                    range=(0.0, 20.0), kind=float)
    eta: float | None = param(None, "TCD's gamma (stochasticity, 0..1); None: 0.3", range=(0.0, 1.0), kind=float)
    originals: str = param("memory", "where the original weights are kept for remove(): memory, or disk (files "
                           "in the temp folder, for large models)", choices=("memory", "disk"))

    def checks(self) -> list[tuple[str, str]]:
        out = []
        if self.lora is not None and self.unet is not None:
            out.append(("unet", "accelerator: give lora or unet, not both"))
        if self.unet is not None and self.weight != 1.0:
            out.append(("weight", "accelerator.weight scales a LoRA; a full UNet has no strength"))
        if self.eta is not None and self.method != "tcd":
            out.append(("eta", f"accelerator.eta is TCD's gamma; {self.method}'s sampler has none"))
        return out


def parse_accelerator(spec: str, lora: str | None = None, field: str = "accelerator") -> dict:
    """``NAME[:WEIGHT]`` (the CLI's ``--accelerator``) -> the recipe entry, validated (``lora``: its file)."""
    name, colon, text = str(spec).strip().partition(":")
    entry: dict = {"name": "accelerator", "method": name.lower()}
    if name.lower() not in METHODS:
        raise DiffspeedError(f"{field}: unknown method {name!r}; one of {', '.join(METHODS)}", field=field)
    if colon:
        try:
            entry["weight"] = float(text)
        except ValueError:
            raise DiffspeedError(f"{field}: weight {text!r} is not a number (give NAME[:WEIGHT], e.g. lcm:0.8)",
                                 field=field) from None
    if lora is not None:
        entry["lora"] = str(lora)
    try:
        AcceleratorConfig(**{k: v for k, v in entry.items() if k != "name"})
    except DiffspeedError as err:
        raise DiffspeedError(f"{field}: {err}", field=field) from None
    return entry


def steps_in_name(path: str | Path | None) -> int | None:
    """N of an "N-step" file name (``Hyper-SD15-8steps-lora``, ``sdxl_lightning_4step_lora``), else None."""
    if path is None:
        return None
    m = re.search(r"(\d+)[-_ ]?steps?(?![a-z])", Path(str(path)).name, re.IGNORECASE)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class Recommended:
    """What an accelerator runs with when the call does not say: the sampler (always), steps, guidance, eta."""

    sampler: str
    steps: int
    cfg_scale: float
    eta: float | None


def recommended(config: AcceleratorConfig, source: str | Path | None = None) -> Recommended:
    """The sampler, steps, CFG scale and eta ``config`` runs with (``source``: the LoRA/UNet file, whose name may
    say N-step)."""
    m = METHODS[config.method]
    steps = config.steps or (m.steps_from_name and steps_in_name(source or config.lora or config.unet)) or m.steps
    cfg = config.cfg_scale if config.cfg_scale is not None else m.cfg
    eta = (config.eta if config.eta is not None else 0.3) if config.method == "tcd" else None
    return Recommended(m.sampler, int(steps), float(cfg), eta)


def shipped_lora(pipe, method: str) -> str | None:
    info = getattr(pipe, "diffspeed_model", None)
    if info is None or getattr(info, "kind", None) != "shipped":
        return None
    return SHIPPED.get((info.name, method))


def lora_source(config: AcceleratorConfig, pipe) -> str | None:
    """The LoRA to fuse: the config's, else the one shipped for the loaded model (None: neither)."""
    return config.lora if config.lora is not None else shipped_lora(pipe, config.method)


# --------------------------------------------------------------------------------------------- the deltas
def _module(pipe, component: str, path: str):
    root = getattr(pipe, component, None)
    if root is None:
        return None
    try:
        m = root.get_submodule(path)
    except AttributeError:
        return None
    return m.get_base_layer() if hasattr(m, "get_base_layer") else m  # a user's LoRA (peft) wraps the module


def lora_deltas(pipe, path: Path, weight: float) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """(parameter, new value) for every layer the LoRA file at ``path`` changes, at strength ``weight``."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    from diffspeed.pipelines.lora import _read

    raw = _read(path)
    unet_config = getattr(getattr(pipe, "unet", None), "config", None)
    try:
        sd, alphas = type(pipe).lora_state_dict(raw, unet_config=unet_config)
    except (ValueError, KeyError, RuntimeError) as err:
        raise DiffspeedError(f"accelerator.lora: {path.name} is not a LoRA diffusers can read "
                             f"({type(err).__name__}: {str(err).splitlines()[0][:160]})", field="lora") from err
    # alpha names follow the converted key of the layer's down weight, which for attention layers is diffusers'
    # old ``processor.to_q_lora.down.weight``: map each to its module path the way the weights are mapped
    alpha_of: dict[str, float] = {}
    for key, value in (alphas or {}).items():
        comp, _, rest = key.removesuffix(".alpha").partition(".")
        rest = rest if rest.endswith(".weight") else rest + ".lora.down.weight"
        peft_key = next(iter(convert_unet_state_dict_to_peft({rest: 0})))
        alpha_of[f"{comp}.{peft_key.removesuffix('.lora_A.weight')}"] = float(value)
    by_component: dict[str, dict] = {}
    for key, value in sd.items():
        comp, _, rest = key.partition(".")
        if comp not in _COMPONENTS:
            raise DiffspeedError(f"accelerator.lora: {path.name} has a layer for {comp!r}, which this pipeline has "
                                 f"no part for ({key})", field="lora")
        by_component.setdefault(comp, {})[rest] = value
    out, unmatched = [], []
    for comp, state in by_component.items():
        state = convert_unet_state_dict_to_peft(state)  # every layout -> "<module>.lora_A/lora_B.weight"
        for key in sorted(k for k in state if k.endswith(".lora_A.weight")):
            mod_path = key[: -len(".lora_A.weight")]
            down, up = state[key], state.get(f"{mod_path}.lora_B.weight")
            module = _module(pipe, comp, mod_path)
            if up is None or module is None or not hasattr(module, "weight"):
                unmatched.append(f"{comp}.{mod_path}")
                continue
            rank = down.shape[0]
            alpha = alpha_of.get(f"{comp}.{mod_path}", rank)
            scale = float(alpha) / rank * weight
            w = module.weight
            d, u = down.float().flatten(1), up.float().flatten(1)
            delta = (u @ d) * scale
            if delta.numel() != w.numel():
                unmatched.append(f"{comp}.{mod_path} (LoRA {tuple(up.shape[:1])}x{tuple(down.shape[1:])} vs weight "
                                 f"{tuple(w.shape)})")
                continue
            new = (w.detach().float() + delta.reshape(w.shape).to(w.device)).to(w.dtype)
            out.append((w, new))
    if unmatched:
        raise DiffspeedError(f"accelerator.lora: {path.name} does not fit this model: {len(unmatched)} of its layers "
                             f"do not match the model's (e.g. {unmatched[0]})", field="lora")
    if not out:
        raise DiffspeedError(f"accelerator.lora: {path.name} holds no LoRA layers", field="lora")
    return out


def unet_tensors(pipe, source: str) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """(parameter, new value) for every UNet weight of a full distilled UNet checkpoint of the same architecture."""
    from safetensors.torch import load_file

    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise DiffspeedError(f"accelerator.unet: {path} holds {len(files)} .safetensors files; name one",
                                 field="unet")
        path = files[0]
    if not path.is_file() or path.suffix != ".safetensors":
        raise DiffspeedError(f"accelerator.unet: no such .safetensors file: {source}", field="unet")
    try:
        state = load_file(path)
    except Exception as err:  # noqa: BLE001 -- safetensors raises its own error types
        raise DiffspeedError(f"accelerator.unet: cannot read {path}: {err}", field="unet") from err
    unet = pipe.unet
    params = dict(unet.named_parameters())
    missing = sorted(set(params) - set(state))
    extra = sorted(set(state) - set(params))
    shapes = [k for k in params if k in state and tuple(state[k].shape) != tuple(params[k].shape)]
    if missing or extra or shapes:
        what = (f"{len(missing)} weights missing (e.g. {missing[0]})" if missing else
                f"{len(extra)} unknown weights (e.g. {extra[0]})" if extra else
                f"{len(shapes)} weights of another shape (e.g. {shapes[0]})")
        raise DiffspeedError(f"accelerator.unet: {path.name} is not a UNet of this architecture: {what}", field="unet")
    return [(p, state[k].to(p.device, p.dtype)) for k, p in params.items() if not torch.equal(state[k].to(p.dtype),
                                                                                               p.detach().cpu())]


# ------------------------------------------------------------------------------------------ the optimization
@register
class Accelerator(Optimization):
    Config = AcceleratorConfig
    summary = "step-distilled LoRA/UNet (LCM, TCD, Hyper-SD, Lightning) with its sampler, steps and guidance"
    conflicts = {
        "sampler": "the accelerator sets the sampler its weights were distilled for",
        "cfg_cutoff": "few-step runs use no guidance (or CFG 1-2 for lcm): there is no unconditional pass to cut",
        "tgate": "few-step runs have no late steps whose cross-attention could be cached",
    }
    unsupported = {"refiner": "the refiner's UNet is not distilled: its share of a 4-step run would be one or no "
                              "undistilled step with a sampler it was not trained for"}
    noop = None  # fusing the distilled weights and setting the sampler is the whole point
    example = {"method": "lcm"}

    @classmethod
    def requirements(cls, config: AcceleratorConfig, pipe=None) -> list[str]:
        if pipe is None or config.unet is not None or lora_source(config, pipe) is not None:
            return []
        model = getattr(getattr(pipe, "diffspeed_model", None), "name", "this model")
        have = ", ".join(f"{m} on {n}" for (n, m) in SHIPPED)
        return [f"no {config.method} LoRA is shipped for {model} (shipped: {have}); give the distilled LoRA's file, "
                f"e.g. accelerator.lora = 'lcm-lora-sdv1-5.safetensors'"]

    def _apply(self, pipe, state: RunState, edits: Edits) -> None:
        from diffspeed.pipelines.lora import resolve_lora_path
        from diffspeed.pipelines.samplers import get_sampler

        cfg = self.config
        if cfg.unet is not None:
            source = Path(cfg.unet)
            changes = unet_tensors(pipe, cfg.unet)
        else:
            source = resolve_lora_path(lora_source(cfg, pipe))
            changes = lora_deltas(pipe, source, cfg.weight)
        self.recommended = recommended(cfg, source)
        edits.set_tensors(changes, spill_dir=tempfile.gettempdir() if cfg.originals == "disk" else None,
                          what=f"{len(changes)} {cfg.method} weights")
        edits.set_attr(pipe, "scheduler", get_sampler(self.recommended.sampler).build(pipe.scheduler.config))
        self.changes = {"weights_changed": len(changes), "scheduler_swapped": 1}

    def wrap_call(self, call):
        rec = self.recommended

        def with_defaults(*args, **kwargs):
            kwargs.setdefault("num_inference_steps", rec.steps)
            kwargs.setdefault("guidance_scale", rec.cfg_scale)
            if rec.eta is not None:
                kwargs.setdefault("eta", rec.eta)
            return call(*args, **kwargs)

        return with_defaults
