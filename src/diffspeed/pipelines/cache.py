"""A RAM cache of loaded models: the web UI's "checkpoints to cache in RAM", made safe for a server.

Switching models costs a disk read, a format conversion and module construction; keeping the loaded
pipelines in CPU memory turns a switch back into a memory copy. One :class:`ModelCache` object per process
(no module-level state), shared by every request.

Ownership rule: the cache keeps a *template* pipeline per model on the CPU and never hands it out. Every
:meth:`ModelCache.get` returns a deep copy, with its own modules, tokenizers and scheduler, so whatever one
caller does to its pipeline (hooks, fused LoRAs, a swapped scheduler, added tokens, ``.to("cuda")``) can
never reach the template or another caller's pipeline. The one thing shared is the read-only vocabulary
(BPE model) inside fast tokenizers: each copy gets its own added tokens, truncation and padding state, but
re-serializing a 49k-token vocabulary per request would cost more than copying a small model's weights.
The price of a hit is one memory copy of the weights.
"""

from __future__ import annotations

import copy
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from diffspeed._lazy import lazy_import
from diffspeed.errors import DiffspeedError, check_range
from diffspeed.pipelines.load import (
    DEFAULT_MODEL,
    SHIPPED,
    ModelInfo,
    _load,
    resolve_device,
    resolve_dtype,
    shipped_path,
)

torch = lazy_import("torch")  # a cache can be made (e.g. by a server at start-up) before any model loads

MAX_MODELS = 64


@dataclass(frozen=True)
class CacheStats:
    """Counters since the cache was made; ``bytes_held`` counts weights and buffers of the kept templates."""

    hits: int
    misses: int
    evictions: int  # entries dropped for room, or because their file changed on disk
    models: int
    bytes_held: int


class _Key(NamedTuple):
    source: str  # a shipped name, a resolved path, or a hub id
    version: tuple  # (size, mtime) of every file under the source and the config_dir: an edit is a miss
    dtype: torch.dtype
    config_dir: str


@dataclass(frozen=True)
class _Entry:
    template: object  # the pipeline as loaded, on the CPU; only ever copied
    info: ModelInfo
    nbytes: int


class ModelCache:
    """Keep up to ``max_models`` loaded models (and at most ``max_bytes`` of weights) in CPU memory, LRU.

    A model larger than ``max_bytes`` is loaded and returned but not kept (with a warning). Thread-safe:
    loads run outside the lock, so two requests for different models load in parallel.
    """

    def __init__(self, max_models: int = 2, max_bytes: int | None = None):
        check_range("max_models", max_models, 1, MAX_MODELS)
        if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int)
                                      or max_bytes <= 0):
            raise DiffspeedError(f"max_bytes must be a positive int (bytes) or None (no limit), got "
                                 f"{max_bytes!r}", field="max_bytes")
        self.max_models = max_models
        self.max_bytes = max_bytes
        self._entries: OrderedDict[_Key, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._hits = self._misses = self._evictions = 0

    def get(self, source: str | Path = DEFAULT_MODEL, *, dtype=None, device=None, allow_pickle: bool = False,
            config_dir: str | Path | None = None):
        """Like :func:`diffspeed.load`, but a model met before is copied from RAM instead of read from disk."""
        device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, device)
        key = _key(str(source), torch_dtype, config_dir, allow_pickle)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self._hits += 1
        if entry is not None:
            pipe, info = fresh_copy(entry.template), entry.info
        else:
            pipe, info = _load(str(source), torch_dtype, allow_pickle, config_dir)
            self._keep(key, pipe, info)
        pipe.to(device)
        pipe.diffspeed_model = info
        return pipe

    @property
    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(hits=self._hits, misses=self._misses, evictions=self._evictions,
                              models=len(self._entries), bytes_held=self._held())

    def clear(self) -> None:
        """Drop every kept model (the counters stay)."""
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def _keep(self, key: _Key, pipe, info: ModelInfo) -> None:
        nbytes = pipeline_bytes(pipe)
        with self._lock:
            self._misses += 1
            self._drop_stale(key)
        if self.max_bytes is not None and nbytes > self.max_bytes:
            warnings.warn(f"model cache: {info.name} holds {nbytes} bytes of weights, more than max_bytes="
                          f"{self.max_bytes}; it is loaded but not kept", stacklevel=3)
            return
        template = fresh_copy(pipe)  # before the caller can touch ``pipe``
        with self._lock:
            if key in self._entries:  # another request loaded it meanwhile
                return
            self._entries[key] = _Entry(template, info, nbytes)
            while len(self._entries) > self.max_models or (
                    self.max_bytes is not None and self._held() > self.max_bytes):
                self._entries.popitem(last=False)
                self._evictions += 1

    def _drop_stale(self, key: _Key) -> None:
        """Entries for the same source whose files have changed since can never hit again."""
        for old in [k for k in self._entries if k.source == key.source and k.version != key.version]:
            del self._entries[old]
            self._evictions += 1

    def _held(self) -> int:
        return sum(entry.nbytes for entry in self._entries.values())


def fresh_copy(pipe):
    """A deep copy of ``pipe`` sharing nothing mutable with it (fast tokenizers: see the module docstring)."""
    memo: dict[int, object] = {}
    for component in pipe.components.values():
        tokenizer = _copy_fast_tokenizer(component)
        if tokenizer is not None:
            memo[id(component)] = tokenizer
    return copy.deepcopy(pipe, memo)


def _copy_fast_tokenizer(tokenizer):
    """A transformers fast tokenizer with its own backend ``tokenizers.Tokenizer`` built around the same
    vocabulary model; ``None`` (deep-copy it instead) for anything else or if the rebuilt state differs."""
    from tokenizers import Tokenizer

    backend = getattr(tokenizer, "_tokenizer", None)
    if not isinstance(backend, Tokenizer):
        return None
    try:
        clone = Tokenizer(backend.model)
        for part in ("normalizer", "pre_tokenizer", "post_processor", "decoder"):
            if getattr(backend, part) is not None:
                setattr(clone, part, getattr(backend, part))
        added = sorted(backend.get_added_tokens_decoder().items())
        for _, token in added:  # one at a time, in id order, so every added token keeps its id
            (clone.add_special_tokens if token.special else clone.add_tokens)([token])
        if backend.truncation:
            clone.enable_truncation(**backend.truncation)
        if backend.padding:
            clone.enable_padding(**backend.padding)
    except (TypeError, ValueError, AttributeError):
        return None
    if sorted(clone.get_added_tokens_decoder().items()) != added:
        return None
    new = copy.copy(tokenizer)
    for name, value in vars(new).items():
        if isinstance(value, (dict, list, set)):
            setattr(new, name, copy.copy(value))
    new._tokenizer = clone
    return new


def pipeline_bytes(pipe) -> int:
    """Bytes of every parameter and buffer of the pipeline's modules, each storage counted once."""
    seen: set[int] = set()
    total = 0
    for component in pipe.components.values():
        if not isinstance(component, torch.nn.Module):
            continue
        for tensor in (*component.parameters(), *component.buffers()):
            pointer = tensor.untyped_storage().data_ptr()
            if pointer not in seen:
                seen.add(pointer)
                total += tensor.untyped_storage().nbytes()
    return total


def _key(source: str, dtype: torch.dtype, config_dir, allow_pickle: bool) -> _Key:
    path = shipped_path(source) if source in SHIPPED else Path(source).expanduser()
    name = source if source in SHIPPED else str(path.resolve()) if path.exists() else source
    if path.is_file() and not allow_pickle:
        _refuse_pickle(path)  # a file another caller loaded with allow_pickle=True is still refused here
    config = Path(config_dir).expanduser().resolve() if config_dir is not None else None
    version = (_files_version(path), _files_version(config) if config is not None else ())
    return _Key(name, version, dtype, str(config or ""))


def _refuse_pickle(path: Path) -> None:
    from diffspeed.pipelines.single_file import PICKLE_REFUSED, _is_pickle

    if _is_pickle(path):
        raise DiffspeedError(f"{PICKLE_REFUSED} ({path.name})", field="allow_pickle")


def _files_version(path: Path) -> tuple:
    """(name, size, mtime) of the file, or of every file under the folder; () for a hub id."""
    if path.is_file():
        stat = path.stat()
        return ((path.name, stat.st_size, stat.st_mtime_ns),)
    if not path.is_dir():
        return ()
    return tuple((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
                 for p in sorted(path.rglob("*")) if p.is_file())
