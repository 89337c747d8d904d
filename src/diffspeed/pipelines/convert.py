"""``diffspeed convert``: any SD checkpoint (pickle or safetensors) -> one verified original-layout ``.safetensors``.

Why: pickle checkpoints (``.ckpt``/``.pt``/``.pth``/``.bin``) can run code when loaded, carry optimizer
state, EMA copies and trainer bookkeeping that inference never reads, and are often float32. The web UI's
"model toolkit" / ``prune.py`` scripts fix that with a full unpickle; here pickles are only ever read with
``torch.load(weights_only=True)``, which refuses any object that is not a tensor or plain data *before*
building it, so a malicious checkpoint is refused and nothing in it runs.

The output keeps the original SD / web-UI key layout (what ``diffspeed.load`` and the web UI read), is
written beside the target and renamed into place, and is loaded back through the single-file loader before
it gets its real name: a file that would not load is never left behind.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from diffspeed._io import write_beside
from diffspeed.errors import DiffspeedError
from diffspeed.pipelines.load import SINGLE_FILE_SUFFIXES
from diffspeed.pipelines.single_file import (
    UNET_PREFIX,
    VAE_PREFIX,
    _first_line,
    _is_pickle,
    _untied,
    detect_family,
    load_single_file,
    original_state_dict,
    read_weights_pickle,
    save_tensors,
)

EMA_PREFIX = "model_ema."
# Top-level entries PyTorch Lightning / the CompVis trainer save beside ``state_dict``: never read at inference.
TRAINING_KEYS = frozenset({
    "global_step", "epoch", "optimizer_states", "lr_schedulers", "callbacks", "loops", "hparams_name",
    "hyper_parameters", "hparams", "pytorch-lightning_version", "native_amp_scaling_state",
    "amp_scaling_state", "loss_scaler", "scaler", "optimizer", "scheduler", "lr_scheduler"})
# Tensors inside the state dict that only training uses: the autoencoder's LPIPS / discriminator loss.
LOSS_PREFIXES = ("loss.", VAE_PREFIX + "loss.")
VAE_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
# diffusers-layout VAE names (the original layout says ``down.N.block`` / ``up.N.block``).
_DIFFUSERS_VAE = re.compile(r"^(encoder\.down_blocks|decoder\.up_blocks|encoder\.mid_block|decoder\.mid_block)\.")


@dataclass(frozen=True)
class ConvertReport:
    """What ``convert_checkpoint`` did; ``dropped`` maps a reason to (entries, tensor bytes)."""

    source: Path
    output: Path
    family: str
    input_bytes: int
    output_bytes: int
    tensors_kept: int
    dropped: dict[str, tuple[int, int]] = field(default_factory=dict)
    dropped_keys: tuple[str, ...] = field(default=(), repr=False)
    cast_to_fp16: int = 0
    vae_tensors: int = 0  # first_stage_model.* tensors replaced from --vae
    ema_tensors: int = 0  # UNet tensors replaced by their EMA copies (use_ema)
    verified: bool = False

    def summary(self) -> str:
        """A few lines for the CLI."""
        lines = [f"wrote {self.output} ({self.family}): {_mb(self.output_bytes)} from {_mb(self.input_bytes)}, "
                 f"{self.tensors_kept} tensors"]
        done = [f"{self.cast_to_fp16} cast to fp16" if self.cast_to_fp16 else "",
                f"{self.vae_tensors} VAE tensors baked in" if self.vae_tensors else "",
                f"{self.ema_tensors} UNet tensors taken from EMA" if self.ema_tensors else ""]
        if any(done):
            lines.append("; ".join(d for d in done if d))
        for reason, (count, nbytes) in sorted(self.dropped.items()):
            lines.append(f"dropped {count} {reason} entries ({_mb(nbytes)})")
        lines.append("verified: loads back through the single-file loader with identical weights"
                     if self.verified else "not verified (--no-verify / verify=False)")
        return "\n".join(lines)


def convert_checkpoint(src: str | Path, dst: str | Path, *, fp16: bool = False, prune: bool = False,
                       vae: str | Path | None = None, force: bool = False, use_ema: bool = False,
                       config_dir: str | Path | None = None, verify: bool = True) -> ConvertReport:
    """Convert ``src`` to the ``.safetensors`` file ``dst`` in the original SD layout.

    ``prune`` drops EMA copies (``model_ema.*``), the VAE's training loss, ``global_step`` (unless it marks an
    SD 2 base model) and every other non-weight entry; trainer state (optimizers, epoch, callbacks, loss
    scaler) is dropped either way, since safetensors stores tensors only. ``use_ema`` replaces the UNet
    weights by their EMA copies (then drops those). ``fp16`` casts floating weights to float16, leaving
    integer tensors, ``position_ids`` and the module-less noise-schedule buffers (``alphas_cumprod`` ...)
    alone. ``vae`` bakes in an original-layout VAE file. ``config_dir`` describes the architecture for the
    verification load (as for :func:`~diffspeed.pipelines.single_file.load_single_file`).
    """
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    _check_paths(src, dst, force)
    if vae is not None and not Path(vae).expanduser().is_file():  # before the (possibly long) read of src
        raise DiffspeedError(f"vae: no such file: {vae}", field="vae")
    levels, metadata = read_checkpoint(src, "checkpoint")
    state, extras = _split(levels)
    try:
        family = detect_family(_with_step(state, extras.get("global_step")))
    except DiffspeedError as err:
        raise DiffspeedError(f"checkpoint: {src.name}: {err}", field="checkpoint") from err
    dropped: list[tuple[str, str, int]] = []  # (key, reason, bytes)
    ema = _take_ema(state, dropped) if use_ema else 0
    if prune:
        _prune(state, dropped)
    _keep_global_step(state, extras, family, dropped, prune)
    baked = _bake_vae(state, _read_vae(Path(vae).expanduser())) if vae is not None else 0
    cast = _to_fp16(state) if fp16 else 0
    _write(state, metadata, src, dst, force=force, verify=verify, config_dir=config_dir)
    reasons: dict[str, tuple[int, int]] = {}
    for _, reason, nbytes in dropped:
        count, total = reasons.get(reason, (0, 0))
        reasons[reason] = (count + 1, total + nbytes)
    return ConvertReport(source=src, output=dst, family=family, input_bytes=src.stat().st_size,
                         output_bytes=dst.stat().st_size, tensors_kept=len(state), dropped=reasons,
                         dropped_keys=tuple(key for key, _, _ in dropped), cast_to_fp16=cast, vae_tensors=baked,
                         ema_tensors=ema, verified=verify)


# ---------------------------------------------------------------------------------------------- reading


def read_checkpoint(path: Path, what: str) -> tuple[list[Mapping], dict[str, str]]:
    """The file's top-level mapping and each one nested under ``state_dict`` (outermost first), and its
    safetensors metadata; pickles are read with ``weights_only`` only, and every walk is bounded."""
    try:
        pickled = _is_pickle(path)
    except OSError as err:
        raise DiffspeedError(f"{what}: cannot read {path}: {err.strerror or err}", field=what) from err
    if pickled:
        return read_weights_pickle(path, f"{what}: {path.name}", what), {}
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
        return [load_file(str(path))], metadata
    except Exception as err:  # safetensors raises its own error types for every kind of bad file
        raise DiffspeedError(f"{what}: not a readable checkpoint: {_first_line(err)} ({path})",
                             field=what) from err


def _split(levels: list[Mapping]) -> tuple[dict[str, torch.Tensor], dict[object, object]]:
    """(weights, everything else) from the levels of a checkpoint; an outer level's extras win."""
    weights: dict[str, torch.Tensor] = {}
    extras: dict[object, object] = {}
    for level in levels:
        for key, value in level.items():
            if key == "state_dict" and isinstance(value, Mapping):
                continue
            if isinstance(value, torch.Tensor) and isinstance(key, str) and key not in TRAINING_KEYS:
                weights[key] = value
            else:  # a tensor under a non-text key has no name safetensors could store: it goes with the extras
                extras.setdefault(key, value)
    return weights, extras


def _with_step(state: Mapping, step) -> Mapping:
    return state if step is None else {**state, "global_step": step}


# ---------------------------------------------------------------------------------------------- editing


def _nbytes(value) -> int:
    """Tensor bytes in ``value`` and the containers under it, each object counted once: the unpickler's memo
    lets a crafted file hold a list that contains itself, or 2**100 paths to one tensor."""
    total, seen, todo = 0, set(), [value]
    while todo:
        item = todo.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, torch.Tensor):
            total += item.numel() * item.element_size()
        elif isinstance(item, Mapping):
            todo.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            todo.extend(item)
    return total


def _prune(state: dict[str, torch.Tensor], dropped: list) -> None:
    for key in [k for k in state if k.startswith(EMA_PREFIX)]:
        dropped.append((key, "EMA", _nbytes(state.pop(key))))
    for key in [k for k in state if k.startswith(LOSS_PREFIXES)]:
        dropped.append((key, "training-loss", _nbytes(state.pop(key))))


def _keep_global_step(state: dict, extras: dict, family: str, dropped: list, prune: bool) -> None:
    """``global_step`` is trainer bookkeeping, except that 875000 is how SD 2 *base* (epsilon) checkpoints are
    told from v-prediction ones; it survives pruning then, as a tensor (safetensors stores nothing else)."""
    step = extras.pop("global_step", None)
    for key, value in extras.items():
        reason = "training-state" if key in TRAINING_KEYS else "non-tensor"
        dropped.append((str(key), reason, _nbytes(value)))
    if step is None:
        return
    as_tensor = _step_tensor(step)
    if as_tensor is None or (prune and detect_family(state) == family):
        dropped.append(("global_step", "training-state", _nbytes(step)))
    else:
        state["global_step"] = as_tensor


def _step_tensor(step) -> torch.Tensor | None:
    if isinstance(step, torch.Tensor) and step.numel() == 1 and not step.is_floating_point():
        return step.reshape(()).to(torch.int64)
    if isinstance(step, int) and not isinstance(step, bool):
        return torch.tensor(step, dtype=torch.int64)
    return None


def _take_ema(state: dict[str, torch.Tensor], dropped: list) -> int:
    """Replace the UNet by its EMA copy. LDM's ``LitEma`` names each copy after the parameter with the
    dots removed: ``model.diffusion_model.out.2.weight`` -> ``model_ema.diffusion_modelout2weight``."""
    unet = [k for k in state if k.startswith(UNET_PREFIX)]
    pairs = {k: EMA_PREFIX + k.removeprefix("model.").replace(".", "") for k in unet}
    found = [k for k, ema in pairs.items() if ema in state]
    if not found:
        raise DiffspeedError("use_ema: the checkpoint has no EMA weights (model_ema.*)", field="use_ema")
    for key in found:
        if state[pairs[key]].shape != state[key].shape:
            raise DiffspeedError(f"use_ema: {pairs[key]} has shape {tuple(state[pairs[key]].shape)}, but "
                                 f"{key} has {tuple(state[key].shape)}", field="use_ema")
    for key in found:
        state[key] = state.pop(pairs[key]).to(state[key].dtype)
    for key in [k for k in state if k.startswith(EMA_PREFIX)]:  # decay, num_updates, non-UNet leftovers
        dropped.append((key, "EMA", _nbytes(state.pop(key))))
    return len(found)


def _read_vae(path: Path) -> dict[str, torch.Tensor]:
    """Original-layout VAE tensors (``encoder.*``, ``decoder.*``, ``quant_conv.*``, ``post_quant_conv.*``) from
    a VAE file, bare or under ``first_stage_model.``, possibly wrapped in ``state_dict``."""
    if not path.is_file():
        raise DiffspeedError(f"vae: no such file: {path}", field="vae")
    weights, _ = _split(read_checkpoint(path, "vae")[0])
    if any(k.startswith(VAE_PREFIX) for k in weights):
        vae = {k.removeprefix(VAE_PREFIX): t for k, t in weights.items() if k.startswith(VAE_PREFIX)}
    else:
        vae = dict(weights)
    vae = {k: t for k, t in vae.items() if k.startswith(VAE_PARTS)}
    if any(_DIFFUSERS_VAE.match(k) for k in vae):
        raise DiffspeedError(f"vae: {path.name} is in the diffusers layout (encoder.down_blocks.*); give a VAE "
                             "in the original layout (encoder.down.*), as the web UI reads", field="vae")
    if not vae:
        raise DiffspeedError(f"vae: no VAE weights in {path.name} (expected encoder.*/decoder.* or "
                             "first_stage_model.* keys)", field="vae")
    return vae


def _bake_vae(state: dict[str, torch.Tensor], vae: Mapping[str, torch.Tensor]) -> int:
    """Replace every ``first_stage_model.*`` weight; the sets of names must match exactly, so a VAE of
    another architecture is never half baked in. Baked tensors take the dtype of those they replace."""
    targets = {k.removeprefix(VAE_PREFIX) for k in state if k.startswith(VAE_PREFIX)
               and not k.startswith(LOSS_PREFIXES)}
    missing, extra = sorted(targets - vae.keys()), sorted(vae.keys() - targets)
    if missing or extra:
        raise DiffspeedError(f"vae: its weights do not match the checkpoint's VAE: {len(missing)} missing "
                             f"(e.g. {missing[:2]}), {len(extra)} unexpected (e.g. {extra[:2]})", field="vae")
    fitted = {}
    for key, tensor in vae.items():
        old = state[VAE_PREFIX + key]
        if tensor.shape != old.shape:
            # 1x1-conv vs linear attention weights differ only by trailing unit dimensions
            if tensor.numel() != old.numel() or tensor.squeeze().shape != old.squeeze().shape:
                raise DiffspeedError(f"vae: {key} has shape {tuple(tensor.shape)}, but the checkpoint's has "
                                     f"{tuple(old.shape)}", field="vae")
            tensor = tensor.reshape(old.shape)
        fitted[VAE_PREFIX + key] = tensor.to(old.dtype) if tensor.is_floating_point() else tensor
    state.update(fitted)
    return len(fitted)


def _to_fp16(state: dict[str, torch.Tensor]) -> int:
    """Cast floating weights to float16; refuse values float16 cannot hold rather than writing infinities."""
    cast = 0
    for key, tensor in state.items():
        if ("." not in key or key.endswith("position_ids") or not tensor.is_floating_point()
                or tensor.dtype == torch.float16):
            continue
        half = tensor.to(torch.float16)
        if torch.isinf(half).any() and not torch.isinf(tensor).any():
            raise DiffspeedError(f"fp16: {key} holds values beyond float16's range (+-65504); convert without "
                                 "--fp16", field="fp16")
        state[key] = half
        cast += 1
    return cast


# ------------------------------------------------------------------------------------ writing, verifying


def _check_paths(src: Path, dst: Path, force: bool) -> None:
    if not src.exists():
        raise DiffspeedError(f"checkpoint: no such file: {src}", field="checkpoint")
    if not src.is_file() or not os.access(src, os.R_OK):
        raise DiffspeedError(f"checkpoint: {src} is not a readable file", field="checkpoint")
    if src.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise DiffspeedError(f"checkpoint: {src.name} must end in one of {', '.join(SINGLE_FILE_SUFFIXES)}",
                             field="checkpoint")
    if dst.suffix.lower() != ".safetensors":
        raise DiffspeedError(f"output: {dst.name} must end in .safetensors", field="output")
    if dst.is_dir():
        raise DiffspeedError(f"output: {dst} is a folder", field="output")
    if dst.exists() and not force:
        raise DiffspeedError(f"output: {dst} already exists; pass --force (force=True) to replace it",
                             field="output")


def _write(state: dict, metadata: dict, src: Path, dst: Path, *, force: bool, verify: bool, config_dir) -> None:
    """Write beside ``dst``, verify, rename (:func:`write_beside`: a failure leaves neither file nor new folder)."""
    tensors = _untied({k: t.contiguous() for k, t in state.items()})

    def write(partial: Path) -> None:
        save_tensors(tensors, partial, {**metadata, "format": "pt"})
        tensors.clear()  # the verification load needs the memory more
        if verify:
            verify_checkpoint(partial, config_dir=config_dir, shown_as=dst.name)
        if dst.exists() and not force:  # appeared while we worked
            raise DiffspeedError(f"output: {dst} already exists; pass --force (force=True) to replace it",
                                 field="output")

    write_beside(dst, write, field="output")


def verify_checkpoint(path: str | Path, *, config_dir=None, shown_as: str = "") -> None:
    """Load ``path`` through the single-file loader and check every weight the pipeline holds equals the
    file's: it proves the file is complete, well named and fits the architecture (``config_dir``)."""
    path = Path(path)
    shown_as = shown_as or path.name
    with safe_open(str(path), framework="pt") as handle:
        conv_in = UNET_PREFIX + "input_blocks.0.0.weight"
        dtype = handle.get_tensor(conv_in).dtype if conv_in in handle.keys() else torch.float32
    try:
        pipe = load_single_file(path, dtype=dtype, config_dir=config_dir)
    except DiffspeedError as err:
        raise DiffspeedError(f"output: verification failed, {shown_as} not written: {err}",
                             field=err.field or "output") from err
    loaded = original_state_dict(pipe)
    with safe_open(str(path), framework="pt") as handle:
        stored = set(handle.keys())
        common = [key for key in loaded if key in stored]
        different = [key for key in common if not _same(handle.get_tensor(key), loaded[key])]
    if not common or different:
        raise DiffspeedError(f"output: verification failed, {shown_as} not written: {len(different)} weights "
                             f"differ after loading (e.g. {different[:3]})", field="output")


def _same(stored: torch.Tensor, loaded: torch.Tensor) -> bool:
    if stored.numel() != loaded.numel():
        return False
    return torch.equal(stored.reshape(loaded.shape).to(loaded.dtype), loaded)


def _mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:.1f} MB"
