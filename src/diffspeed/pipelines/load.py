"""``diffspeed.load``: one entry point for shipped models, diffusers folders, single files and hub ids."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import importlib
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from diffspeed._lazy import lazy_import
from diffspeed.errors import DiffspeedError

torch = lazy_import("torch")  # the CLI's help and validation paths read this module's names without torch

SHIPPED = ("tiny-sd", "tiny-sdxl", "tiny-sdxl-refiner")
DEFAULT_MODEL = "tiny-sd"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
_DTYPES = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16", "half": "float16",
           "bf16": "bfloat16", "bfloat16": "bfloat16"}  # short name -> torch attribute
DEVICE_FORMS = "cpu, cuda, cuda:N, mps, xpu or xpu:N"
_DEVICE = re.compile(r"cpu|mps|(?:cuda|xpu)(?::\d+)?")


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
    value = getattr(torch, _DTYPES.get(name, name), None) if name is not None else dtype
    if isinstance(value, torch.dtype) and value.is_floating_point:
        return value
    raise DiffspeedError(f"dtype must be fp32, fp16 or bf16 (or another floating-point torch dtype such as "
                         f"torch.float16); got {dtype!r}", field="dtype")


def resolve_dtype(dtype, device: str) -> torch.dtype:
    """``None`` means fp16 on an accelerator and fp32 on the CPU (where half matmuls are slow or missing)."""
    if dtype is None:
        return torch.float32 if device == "cpu" else torch.float16
    return parse_dtype(dtype)


def check_device(device) -> str | None:
    """``device`` as a string if it has one of the forms torch accepts here (``None`` stays ``None``: pick one);
    a clear error otherwise. Needs no torch, so the CLI rejects ``--device tpu`` before loading anything."""
    if device is None:
        return None
    text = str(device).strip()
    if not _DEVICE.fullmatch(text):
        raise DiffspeedError(f"device must be one of {DEVICE_FORMS}; got {str(device)!r}", field="device")
    return text


def resolve_device(device) -> str:
    device = check_device(device)
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DiffspeedError(f"device {device!r} asked for, but no CUDA device is available; use cpu",
                             field="device")
    return device


# inside a quiet_loading block: library name -> how to restore its logging state (filled by silence_libraries)
_QUIET: contextvars.ContextVar[dict | None] = contextvars.ContextVar("diffspeed_quiet_loading", default=None)


@contextlib.contextmanager
def quiet_loading(defer: bool = False):
    """Silence the libraries' loading chatter (progress bars, deprecation and optional-backend notices) for
    a command-line run, whose stderr is kept for diffspeed's own one-line errors; restored afterwards.

    With ``defer``, diffusers and transformers are silenced now only if already imported, else when :func:`load`
    first needs them (:func:`silence_libraries`): the CLI validates its input inside this block, and that must
    not import torch.
    """
    silenced: dict = {}
    token = _QUIET.set(silenced)
    try:
        silence_libraries(import_missing=not defer)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        _QUIET.reset(token)
        for restore in silenced.values():
            restore()


def silence_libraries(import_missing: bool = True) -> None:
    """In a :func:`quiet_loading` block, set diffusers' and transformers' logging to errors only and turn their
    progress bars off (once each; the block restores them). Outside one, does nothing."""
    silenced = _QUIET.get()
    if silenced is None:
        return
    for lib in ("diffusers", "transformers"):
        if lib in silenced or (not import_missing and lib not in sys.modules):
            continue
        log = importlib.import_module(f"{lib}.utils.logging")
        silenced[lib] = functools.partial(_restore_logging, log, log.get_verbosity(), log.is_progress_bar_enabled())
        log.set_verbosity_error()
        log.disable_progress_bar()


def _restore_logging(log, level: int, bars: bool) -> None:
    log.set_verbosity(level)
    (log.enable_progress_bar if bars else log.disable_progress_bar)()


# The shipped models are their own distribution, diffspeed-models (the repository's models/ folder): 100 MB of
# weights that change rarely, kept out of this package. It is imported on first use, and costs no torch.
MODELS_HINT = "pip install diffspeed-models (from this repo: pip install -e ./models)"


def installed_models_dir() -> Path | None:
    """The folder of the shipped models, or ``None`` when diffspeed-models is not installed (for listings)."""
    try:
        import diffspeed_models
    except ImportError:
        return None
    return Path(diffspeed_models.MODELS_DIR)


def models_dir(*, field: str = "model") -> Path:
    """The folder of the shipped models; without diffspeed-models a one-line error naming ``field``."""
    path = installed_models_dir()
    if path is None:
        raise DiffspeedError(f"{field}: the shipped models are not installed; {MODELS_HINT}", field=field)
    return path


def shipped_path(name: str, *, field: str = "model") -> Path:
    """The folder of the shipped model ``name``; without diffspeed-models a one-line error naming it."""
    path = installed_models_dir()
    if path is None:
        raise DiffspeedError(f"{field}: {name} is a shipped model, but the shipped models are not installed; "
                             f"{MODELS_HINT}", field=field)
    return path / name


def __getattr__(name: str):
    if name == "MODELS_DIR":  # the constant this module had: now looked up when asked for
        return models_dir()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load(source: str | Path = DEFAULT_MODEL, *, dtype=None, device=None, allow_pickle: bool = False,
         config_dir: str | Path | None = None, cache=None):
    """Return a ready diffusers pipeline for ``source``, offline unless ``source`` is a hub id.

    ``source`` is a shipped model name (``tiny-sd``, ``tiny-sdxl``), a diffusers folder, a single-file
    checkpoint in the original SD / web-UI layout, or a Hugging Face hub id (``org/name``). Pickle files
    (``.ckpt``, ``.pt``, ``.bin``) are refused unless ``allow_pickle=True``, and then read with
    ``weights_only=True``. The pipeline gets a ``diffspeed_model`` attribute (a :class:`ModelInfo`).
    ``cache`` (a :class:`~diffspeed.pipelines.cache.ModelCache`) keeps loaded models in RAM between calls.
    """
    silence_libraries()  # a CLI run's quiet_loading takes effect now that diffusers is needed
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
        return DiffusionPipeline.from_pretrained(path, dtype=dtype, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise DiffspeedError(f"model: could not load the diffusers folder {path}: {err}", field="model") from err


def _from_hub(repo_id: str, dtype: torch.dtype):
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.from_pretrained(repo_id, dtype=dtype)
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
