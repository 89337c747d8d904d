"""LoRA on a loaded pipeline: load (diffusers or kohya/web-UI ``.safetensors``), weigh, switch, fuse, unfuse.

diffusers (with peft) does the work; diffspeed adds what users of the web UI expect and what a benchmark needs:
- several LoRAs stay loaded and ``set_loras`` switches between them (or mixes them) without reloading the model;
- ``fuse_loras`` folds the active LoRAs into the weights for speed, and ``unfuse_loras`` restores the *exact*
  original weights -- subtracting the delta again (what peft does) leaves rounding residue, so the originals of
  every fused weight are kept and copied back;
- the web UI's short hash of each LoRA file, for the PNG "Lora hashes" entry.

State lives on the pipeline object (``pipe.diffspeed_loras``), never in module globals.
"""

from __future__ import annotations

import hashlib
import logging
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from diffspeed._lazy import lazy_import
from diffspeed.errors import DiffspeedError, check_range

torch = lazy_import("torch")  # parse_lora_spec and resolve_lora_path validate CLI input before torch loads

MAX_WEIGHT = 10.0


@dataclass
class LoraInfo:
    name: str
    path: Path
    hash: str
    weight: float


@dataclass
class _LoraState:
    loaded: dict[str, LoraInfo] = field(default_factory=dict)
    fused_originals: dict[str, torch.Tensor] | None = None  # parameter name -> original tensor (a copy)


def _state(pipe) -> _LoraState:
    if not hasattr(pipe, "diffspeed_loras"):
        pipe.diffspeed_loras = _LoraState()
    return pipe.diffspeed_loras


def parse_lora_spec(spec: str) -> tuple[str, float]:
    """``PATH[:WEIGHT]`` (the CLI's ``--lora``) -> (path, weight). A colon that belongs to the path is left alone:
    a Windows drive (``C:\\x.safetensors``, ``C:x.safetensors``), or one in the name of an existing file."""
    path, colon, text = spec.rpartition(":")
    if not colon or Path(spec).expanduser().exists():
        return spec, 1.0
    try:
        weight = float(text)
    except ValueError:
        if (len(path) == 1 and path.isalpha()) or re.search(r"[\\/]", text):  # the colon is a drive's
            return spec, 1.0
        raise DiffspeedError(f"lora weight {text!r} is not a number (give PATH[:WEIGHT], e.g. {path}:0.8)",
                             field="lora") from None
    check_range("lora weight", weight, -MAX_WEIGHT, MAX_WEIGHT, kind=float)
    return path, weight


def lora_hash(path: Path) -> str:
    """The web UI's short hash of a LoRA: the first 12 hex digits of the SHA-256 of the whole file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


def _read(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix != ".safetensors":
        raise DiffspeedError(f"lora: {path.name} is not a .safetensors file (pickled LoRAs are not read; convert "
                             f"them with `diffspeed convert`)", field="lora")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError) as err:
        raise DiffspeedError(f"lora: cannot read {path}: {err}", field="lora") from err


def _one_layout(sd: dict) -> dict:
    """A diffusers-prefixed LoRA whose keys mix peft's ``lora_A/lora_B`` with the older ``lora.down/lora.up``
    (what diffusers' own ``convert_state_dict_to_diffusers`` wrote for attention layers) in peft's layout only:
    diffusers decides the layout from the first key, and silently skips the layers written the other way."""
    if not any(".lora_A." in k for k in sd) or not any(".lora.down." in k or ".lora.up." in k for k in sd):
        return sd
    return {k.replace(".lora.down.", ".lora_A.").replace(".lora.up.", ".lora_B."): v for k, v in sd.items()}


def _mismatched_keys(messages: list[str], adapter: str) -> list[str]:
    """The LoRA keys of ``adapter`` that diffusers reported as unexpected or missing. (Its own filter for
    missing keys tests ``adapter in key`` as a substring, so an adapter named "b" matches "down_blocks".)"""
    keys = []
    for msg in messages:
        for part in re.split(r"(?=Loading adapter weights)", msg):
            kind, _, listed = part.partition(":")
            found = [k.strip().rstrip(".") for k in listed.split(",") if ".lora_" in k]
            if "unexpected keys" in kind:
                keys += found
            elif "missing keys" in kind:
                keys += [k for k in found if f".{adapter}." in k]
    return keys


class _CaptureWarnings(logging.Handler):
    """Collect a library logger's warnings for the duration of a ``with`` block (this call only)."""

    def __init__(self, logger: str):
        super().__init__(logging.WARNING)
        self.logger = logging.getLogger(logger)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> _CaptureWarnings:
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        self.logger.removeHandler(self)


SHIPPED_LORAS = ("tiny-sd-lora-monochrome", "tiny-sd-lcm-lora")

# peft's warning (several KB: it lists every module) when the target-module *names* diffusers derives from a LoRA
# (to_k, conv1, ...) also match modules the LoRA has no weights for, e.g. attn1.to_k when it only trained attn2.
# Harmless: peft injects only the modules the state dict has weights for. Matched up to the end, so the other
# variant ("the state_dict contained additional target modules") still shows; keys that do not fit this model
# are caught through diffusers' own warnings (_mismatched_keys).
_PEFT_EXTRA_TARGETS = (r"While injecting the PEFT adapters, an inconsistency .* The PEFT config contained these "
                       r"additional target modules: \[[^\]]*\]\. ?$")


def resolve_lora_path(source: str | Path) -> Path:
    """The .safetensors file of a LoRA given as a file, a folder holding one, or a shipped name."""
    from diffspeed.pipelines.load import shipped_path

    if str(source) in SHIPPED_LORAS:
        if not shipped_path(str(source), field="lora").is_dir():
            raise DiffspeedError(f"lora: {source} is not shipped in this install (the shipped models "
                                 "come from tools/train_tiny_*.py)", field="lora")
        source = shipped_path(str(source), field="lora")
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise DiffspeedError(f"lora: {path} holds {len(files)} .safetensors files; name one", field="lora")
        path = files[0]
    if not path.is_file():
        raise DiffspeedError(f"lora: no such file: {source}", field="lora")
    return path


def load_lora(pipe, source: str | Path, *, weight: float = 1.0, name: str | None = None) -> str:
    """Load a LoRA (diffusers or kohya layout) as adapter ``name`` (default: the file's stem) and activate it
    with ``weight`` next to the ones already active. Returns the adapter name."""
    check_range("lora weight", weight, -MAX_WEIGHT, MAX_WEIGHT, kind=float)
    st = _state(pipe)
    if st.fused_originals is not None:
        raise DiffspeedError("lora: unfuse the fused LoRAs before loading another", field="lora")
    path = resolve_lora_path(source)
    # a folder (or shipped name) is named after itself: its file is usually diffusers' "pytorch_lora_weights"
    stem = Path(str(source)).name if path.name != Path(str(source)).name else path.stem
    name = name or re.sub(r"[^A-Za-z0-9_]", "_", stem)
    if name in st.loaded:
        raise DiffspeedError(f"lora: an adapter named {name!r} is already loaded", field="lora")
    with _CaptureWarnings("diffusers") as captured, warnings.catch_warnings():
        warnings.filterwarnings("ignore", _PEFT_EXTRA_TARGETS, RuntimeWarning)
        # peft warns whenever a second adapter joins the first; diffspeed keeps several by name on purpose
        # (set_loras switches and weighs them), so that is the intended state, not a mistake
        warnings.filterwarnings("ignore", r"Already found a `peft_config` attribute in the model", UserWarning)
        try:
            pipe.load_lora_weights(_one_layout(_read(path)), adapter_name=name)
        except (ValueError, KeyError, RuntimeError) as err:
            raise DiffspeedError(f"lora: {path.name} does not fit this model ({type(err).__name__}: "
                                 f"{str(err).splitlines()[0][:200]})", field="lora") from err
    mismatch = _mismatched_keys(captured.messages, name)
    if mismatch:  # diffusers only warns: half a LoRA would be applied -- a silently wrong image
        pipe.delete_adapters(name)
        raise DiffspeedError(f"lora: {path.name} does not fit this model: {len(mismatch)} of its layers do not "
                             f"match the model's (e.g. {mismatch[0]})", field="lora")
    st.loaded[name] = LoraInfo(name, path, lora_hash(path), weight)
    set_loras(pipe, {n: i.weight for n, i in st.loaded.items()})
    return name


def set_loras(pipe, weights: dict[str, float]) -> None:
    """Activate exactly these loaded adapters with these weights (others stay loaded but off): switching
    LoRAs without reloading anything."""
    st = _state(pipe)
    if st.fused_originals is not None:
        raise DiffspeedError("lora: unfuse before changing the active LoRAs", field="lora")
    unknown = sorted(set(weights) - set(st.loaded))
    if unknown:
        raise DiffspeedError(f"lora: not loaded: {', '.join(unknown)} (loaded: {', '.join(st.loaded) or 'none'})",
                             field="lora")
    for n, w in weights.items():
        check_range("lora weight", w, -MAX_WEIGHT, MAX_WEIGHT, kind=float)
        st.loaded[n].weight = w
    if weights:
        pipe.set_adapters(list(weights), adapter_weights=list(weights.values()))
    elif st.loaded:
        pipe.disable_lora()
    for n in st.loaded:
        if n not in weights:
            st.loaded[n].weight = 0.0


def active_loras(pipe) -> list[LoraInfo]:
    return [i for i in _state(pipe).loaded.values() if i.weight != 0.0]


def _lora_modules(pipe):
    from peft.tuners.lora import LoraLayer

    for comp in ("unet", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, comp, None)
        if module is None:
            continue
        for mname, m in module.named_modules():
            if isinstance(m, LoraLayer):
                yield f"{comp}.{mname}", m


def fuse_loras(pipe) -> None:
    """Fold the active LoRAs into the base weights (no LoRA matmuls left at run time); keeps the originals."""
    st = _state(pipe)
    if st.fused_originals is not None:
        raise DiffspeedError("lora: already fused", field="lora")
    if not active_loras(pipe):
        raise DiffspeedError("lora: no active LoRA to fuse", field="lora")
    originals = {}
    for name, m in _lora_modules(pipe):
        base = m.get_base_layer()
        originals[name + ".weight"] = base.weight.detach().clone()
        if getattr(base, "bias", None) is not None:
            originals[name + ".bias"] = base.bias.detach().clone()
    active = [i.name for i in active_loras(pipe)]
    pipe.fuse_lora(adapter_names=active, lora_scale=1.0)
    st.fused_originals = originals


def unfuse_loras(pipe) -> None:
    """Undo :func:`fuse_loras` bit for bit: unmerge, then copy the kept original tensors back."""
    st = _state(pipe)
    if st.fused_originals is None:
        raise DiffspeedError("lora: nothing is fused", field="lora")
    pipe.unfuse_lora()
    with torch.no_grad():
        for name, m in _lora_modules(pipe):
            base = m.get_base_layer()
            base.weight.copy_(st.fused_originals[name + ".weight"])
            if getattr(base, "bias", None) is not None:
                base.bias.copy_(st.fused_originals[name + ".bias"])
    st.fused_originals = None


def unload_loras(pipe) -> None:
    """Remove every LoRA: the modules are the original ones again."""
    st = _state(pipe)
    if st.fused_originals is not None:
        unfuse_loras(pipe)
    if st.loaded:
        pipe.unload_lora_weights()
    st.loaded.clear()


def lora_parameters(pipe) -> dict[str, str]:
    """The PNG entries for the active LoRAs (empty if none): the web UI's ``Lora hashes`` ("name: hash, ...")
    and ``Lora weights`` ("name: weight, ..."; the web UI writes ``<lora:name:weight>`` into the prompt instead,
    diffspeed keeps the prompt as given)."""
    if not hasattr(pipe, "diffspeed_loras"):  # none ever loaded: create no LoRA state on the pipeline
        return {}
    active = active_loras(pipe)
    if not active:
        return {}
    return {"Lora hashes": ", ".join(f"{i.name}: {i.hash}" for i in active),
            "Lora weights": ", ".join(f"{i.name}: {i.weight}" for i in active)}
