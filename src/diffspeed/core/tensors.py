"""Small tensor helpers shared by optimizations."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from diffspeed._lazy import lazy_import

torch = lazy_import("torch")


def map_tensors(x: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to every tensor inside ``x`` (nested tuples, lists and dicts); other values pass through."""
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, (tuple, list)):
        return type(x)(map_tensors(v, fn) for v in x)
    if isinstance(x, dict):
        return {k: map_tensors(v, fn) for k, v in x.items()}
    return x
