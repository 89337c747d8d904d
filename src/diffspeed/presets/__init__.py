"""Goal presets: recipe files for a goal, with one recipe for CUDA devices and one for the CPU.

Each ``<name>.toml`` here holds ``name``, ``description`` (what it is for), ``chosen_on`` (the benchmark
numbers it was picked on, with the report they come from) and two recipes, ``[[cuda.optimization]]`` and
``[[cpu.optimization]]``: what is fast or lean on a GPU (fp16, TF32, offload) is slow or meaningless on a CPU
(where the "VRAM" budgets are RAM budgets). ``preset_recipe(name, device)`` returns the validated
:class:`~diffspeed.core.Recipe`; ``diffspeed generate --preset`` and ``diffspeed bench --preset`` use it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from diffspeed.core import Recipe
from diffspeed.errors import DiffspeedError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

FOLDER = Path(__file__).resolve().parent
PRESETS = ("quality", "balanced", "fastest", "low-vram-8gb", "low-vram-6gb", "low-vram-4gb")


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    chosen_on: str
    entries: dict  # device kind ("cuda", "cpu") -> the recipe's optimization tables, as in the file

    def recipe(self, device: str = "cpu") -> Recipe:
        """Parsed and checked here, not on load: a CUDA recipe (offload, say) is refused on a CPU machine."""
        kind = "cuda" if str(device).startswith("cuda") else "cpu"
        return Recipe.from_dict({"name": f"{self.name} ({kind})", "description": self.description,
                                 "optimization": self.entries[kind]}, source=f"preset {self.name} [{kind}]")


def load_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise DiffspeedError(f"preset: {name!r} is unknown; choose one of {', '.join(PRESETS)}", field="preset")
    path = FOLDER / f"{name}.toml"
    data = tomllib.loads(path.read_text())
    entries = {kind: list(data.get(kind, {}).get("optimization", [])) for kind in ("cuda", "cpu")}
    return Preset(name, data["description"], data.get("chosen_on", ""), entries)


def preset_recipe(name: str, device: str = "cpu") -> Recipe:
    """The recipe of preset ``name`` for ``device`` (``cpu``, ``cuda``, ``cuda:N``)."""
    return load_preset(name).recipe(device)
