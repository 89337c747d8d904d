"""``diffspeed.load``: one entry point for shipped models, diffusers folders, single files and hub ids."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from diffspeed.errors import DiffspeedError

MODELS_DIR = Path(__file__).resolve().parents[1] / "models"
SHIPPED = ("tiny-sd", "tiny-sdxl", "tiny-sdxl-refiner")
DEFAULT_MODEL = "tiny-sd"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
           "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ModelInfo:
    """Where a loaded pipeline came from; ``hash`` is the web UI's short model hash."""

    name: str
    path: Path | None
    kind: str  # "shipped", "directory", "single-file" or "hub"

    @property
    def hash(self) -> str:
        return model_hash(self.path) if self.path is not None else ""


def parse_dtype(dtype) -> torch.dtype | None:
    """A floating torch dtype from itself or a name: fp32/fp16/bf16, float16, torch.bfloat16, half ..."""
    if dtype is None:
        return None
    name = str(dtype).lower().removeprefix("torch.") if isinstance(dtype, str) else None
    value = _DTYPES.get(name, getattr(torch, name, None)) if name is not None else dtype
    if isinstance(value, torch.dtype) and value.is_floating_point:
        return value
    raise DiffspeedError(f"dtype must be fp32, fp16 or bf16 (or another floating-point torch dtype such as "
                         f"torch.float16); got {dtype!r}", field="dtype")


def resolve_dtype(dtype, device: str) -> torch.dtype:
    """``None`` means fp16 on an accelerator and fp32 on the CPU (where half matmuls are slow or missing)."""
    if dtype is None:
        return torch.float32 if device == "cpu" else torch.float16
    return parse_dtype(dtype)


def resolve_device(device) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    device = str(device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DiffspeedError(f"device {device!r} asked for, but no CUDA device is available; use cpu",
                             field="device")
    return device


@contextlib.contextmanager
def quiet_loading():
    """Silence the libraries' loading chatter (progress bars, deprecation and optional-backend notices) for
    a command-line run, whose stderr is kept for diffspeed's own one-line errors; restored afterwards."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    levels = dlog.get_verbosity(), tlog.get_verbosity()
    bars = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        dlog.set_verbosity(levels[0])
        tlog.set_verbosity(levels[1])
        for mod, on in zip((dlog, tlog), bars):
            (mod.enable_progress_bar if on else mod.disable_progress_bar)()


def shipped_path(name: str) -> Path:
    return MODELS_DIR / name


def load(source: str | Path = DEFAULT_MODEL, *, dtype=None, device=None, allow_pickle: bool = False,
         config_dir: str | Path | None = None, cache=None):
    """Return a ready diffusers pipeline for ``source``, offline unless ``source`` is a hub id.

    ``source`` is a shipped model name (``tiny-sd``, ``tiny-sdxl``), a diffusers folder, a single-file
    checkpoint in the original SD / web-UI layout, or a Hugging Face hub id (``org/name``). Pickle files
    (``.ckpt``, ``.pt``, ``.bin``) are refused unless ``allow_pickle=True``, and then read with
    ``weights_only=True``. The pipeline gets a ``diffspeed_model`` attribute (a :class:`ModelInfo`).
    ``cache`` (a :class:`~diffspeed.pipelines.cache.ModelCache`) keeps loaded models in RAM between calls.
    """
    if cache is not None:
        return cache.get(source, dtype=dtype, device=device, allow_pickle=allow_pickle, config_dir=config_dir)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    pipe, info = _load(str(source), torch_dtype, allow_pickle, config_dir)
    pipe.to(device)
    pipe.diffspeed_model = info
    return pipe


def _load(source: str, dtype: torch.dtype, allow_pickle: bool, config_dir):
    if source in SHIPPED:
        return _from_directory(shipped_path(source), dtype), ModelInfo(source, shipped_path(source), "shipped")
    path = Path(source).expanduser()
    if path.is_dir():
        return _from_directory(path, dtype), ModelInfo(path.name, path, "directory")
    if path.is_file():
        from diffspeed.pipelines.single_file import load_single_file

        pipe = load_single_file(path, dtype=dtype, config_dir=config_dir, allow_pickle=allow_pickle)
        return pipe, ModelInfo(path.stem, path, "single-file")
    if _looks_like_path(source):
        raise DiffspeedError(f"model: no such file or folder: {source} (give a shipped name "
                             f"{', '.join(SHIPPED)}, a diffusers folder or a checkpoint file)", field="model")
    return _from_hub(source, dtype), ModelInfo(source, None, "hub")


def _looks_like_path(source: str) -> bool:
    return (source.lower().endswith(SINGLE_FILE_SUFFIXES) or source.startswith((".", "/", "~"))
            or "\\" in source or source.count("/") != 1)


def _from_directory(path: Path, dtype: torch.dtype):
    from diffusers import DiffusionPipeline

    if not (path / "model_index.json").is_file():
        raise DiffspeedError(f"model: {path} is not a diffusers pipeline folder (no model_index.json)",
                             field="model")
    try:
        return DiffusionPipeline.from_pretrained(path, torch_dtype=dtype, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise DiffspeedError(f"model: could not load the diffusers folder {path}: {err}", field="model") from err


def _from_hub(repo_id: str, dtype: torch.dtype):
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.from_pretrained(repo_id, torch_dtype=dtype)
    except Exception as err:  # network, auth or missing repo: all mean "cannot get it from here"
        raise DiffspeedError(f"model: {repo_id!r} is not a shipped model, local path or reachable hub id "
                             f"({type(err).__name__})", field="model") from err


def model_hash(path: Path) -> str:
    """The web UI's short model hash: the first 10 hex digits of the file's SHA-256.

    For a diffusers folder, the SHA-256 runs over its weight files in sorted order (relative name and bytes).
    Memoized on (path, size, mtime) of every file, so an edited file is hashed again.
    """
    path = Path(path)
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.suffix in (".safetensors", ".bin") and p.is_file())
    return _hash_files(str(path), tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))


@functools.lru_cache(maxsize=64)
def _hash_files(root: str, files: tuple) -> str:
    h = hashlib.sha256()
    for name, _, _ in files:
        if name != root:
            h.update(str(Path(name).relative_to(root)).encode())
        with open(name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:10]
