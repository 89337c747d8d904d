"""diffspeed-models: the tiny models diffspeed ships, one folder each (diffusers layout, fp16 weights, a model card).

Only paths: importing this costs nothing (no torch). diffspeed finds its shipped models here
(``diffspeed.pipelines.load.models_dir()``); any other program can load a folder with diffusers directly::

    from diffusers import DiffusionPipeline
    import diffspeed_models
    pipe = DiffusionPipeline.from_pretrained(diffspeed_models.model_path("tiny-sd"))

The version changes only when the weights (or another file a loader reads) change.
"""

from __future__ import annotations

from pathlib import Path

__version__ = "1.1.0"  # 1.1: tiny-sd-lcm-lora added

MODELS_DIR = Path(__file__).parent


def names() -> list[str]:
    """The models in this install: every folder beside this file."""
    return sorted(p.name for p in MODELS_DIR.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))


def model_path(name: str) -> Path:
    """The folder of the shipped model ``name`` (``tiny-sd``, ``tiny-sdxl`` ...); ``KeyError`` if there is none."""
    path = MODELS_DIR / name
    if name not in names():
        raise KeyError(f"no shipped model {name!r}; this install has {', '.join(names())}")
    return path
