"""diffspeed: fast, lean Stable Diffusion inference, with the quality cost of every speed-up measured.

The public names resolve on first use (PEP 562), so ``import diffspeed`` -- and the CLI's help, version and
validation paths -- do not import torch or diffusers.
"""

from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "DiffspeedError": "diffspeed.errors",
    "GenerateRequest": "diffspeed.generate",
    "GenerateResult": "diffspeed.generate",
    "generate": "diffspeed.generate",
    "save_images": "diffspeed.generate",
    "SHIPPED": "diffspeed.pipelines.load",
    "load": "diffspeed.pipelines.load",
    "model_hash": "diffspeed.pipelines.load",
    "Accelerated": "diffspeed.core",
    "Recipe": "diffspeed.core",
    "RecipeError": "diffspeed.core",
    "accelerate": "diffspeed.core",
    "ModelCache": "diffspeed.pipelines.cache",
    "ConvertReport": "diffspeed.pipelines.convert",
    "convert_checkpoint": "diffspeed.pipelines.convert",
    "PRESETS": "diffspeed.presets",
    "preset_recipe": "diffspeed.presets",
}

__all__ = ["DiffspeedError", "GenerateRequest", "GenerateResult", "SHIPPED", "generate", "load", "model_hash",
           "save_images", "__version__", "Accelerated", "Recipe", "RecipeError", "accelerate", "ConvertReport",
           "ModelCache", "convert_checkpoint", "PRESETS", "bench", "preset_recipe", "tune"]


def __getattr__(name: str):
    if name in ("bench", "tune"):  # diffspeed.bench(...) / diffspeed.tune(...): the subpackages are callable
        return importlib.import_module(f"diffspeed.{name}")
    if name not in _EXPORTS:
        raise AttributeError(f"module 'diffspeed' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        # Importing the submodule diffspeed.generate binds it on the package, which would hide the function
        # diffspeed.generate (the eager imports used to rebind it right after); keep the function.
        if isinstance(value, types.ModuleType) and name in _EXPORTS and value.__name__ == f"{__name__}.{name}":
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
