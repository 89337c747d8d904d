"""Goal presets: recipe files for a goal, with one recipe per class of hardware.

What is fast on one machine is slow on another: half precision doubles a GPU's speed, while a CPU without
AVX-512 BF16 or AMX computes bf16 30-180x slower than fp32 (issue 14). So each ``<name>.toml`` here holds
``name``, ``description`` (what it is for) and one table per profile class of :data:`CLASSES`, each with
``uses`` (one line: what the recipe does), ``chosen_on`` (the measurements it was chosen on) and its
``[[<class>.optimization]]`` list. :func:`profile_class` picks the class from a
:class:`~diffspeed.hardware.HardwareProfile` (measured, when the probe has run, else from the flags);
:func:`resolve_preset` returns the validated :class:`~diffspeed.core.Recipe` and why that class.
``diffspeed generate --preset`` and ``diffspeed bench --preset`` use it.

The files are data only and checked on load: every class present, nothing unknown, and no recipe of a class
computes in a dtype that class lacks (no bf16/fp16 compute on ``cpu-fp32``, no bf16 on ``cuda-fp16``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from diffspeed.errors import DiffspeedError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

FOLDER = Path(__file__).resolve().parent
PRESETS = ("quality", "balanced", "fastest", "low-vram-8gb", "low-vram-6gb", "low-vram-4gb")
SPEED_PRESETS, MEMORY_PRESETS = PRESETS[:3], PRESETS[3:]
# profile class -> what it is and the compute dtypes its recipes may use
CLASSES = {"cuda-bf16": ("CUDA sm80 and newer: fp16 and bf16 tensor cores, TF32", ("fp32", "fp16", "bf16")),
           "cuda-fp16": ("CUDA before sm80: fp16 tensor cores (sm70+), no bf16, no TF32", ("fp32", "fp16")),
           "cpu-bf16": ("CPU with native bf16 (AVX-512 BF16 or AMX) that the probe, if run, found faster than "
                        "fp32", ("fp32", "bf16")),
           "cpu-fp32": ("CPU without fast bf16 (AVX2 and the like): fp32 compute", ("fp32",))}
_TOP_KEYS = {"name", "description", *CLASSES}
_CLASS_KEYS = {"uses", "chosen_on", "optimization"}


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    entries: dict  # profile class -> the recipe's optimization tables, as in the file
    uses: dict  # profile class -> one line: what its recipe does and trades
    chosen_on: dict  # profile class -> the measurements it was chosen on

    def recipe(self, device: str = "cpu", *, profile=None):
        """The recipe for ``profile`` (default: the detected profile of ``device``); checked here, not on load,
        since a CUDA recipe (offload, say) is refused on a CPU machine."""
        return self.resolve(profile if profile is not None else _detect(device))[0]

    def resolve(self, profile):
        """(validated Recipe, why this class) for ``profile``."""
        from diffspeed.core import Recipe

        cls, why = profile_class(profile)
        recipe = Recipe.from_dict({"name": f"{self.name} ({cls})", "description": self.description,
                                   "optimization": self.entries[cls]}, source=f"preset {self.name} [{cls}]")
        return recipe, f"{cls}: {why}"


def _detect(device):
    from diffspeed.hardware import detect

    return detect(str(device))


def profile_class(profile) -> tuple[str, str]:
    """The class of :data:`CLASSES` whose recipes fit ``profile``, and the evidence in words."""
    from diffspeed.hardware import is_fast

    fast, why = is_fast(profile, "bf16")
    if profile.kind == "cuda":
        return ("cuda-bf16" if fast else "cuda-fp16"), f"{profile.capability}, {why}"
    return ("cpu-bf16" if fast else "cpu-fp32"), f"{profile.capability}, {why}"


def _problem(name: str, message: str) -> DiffspeedError:
    return DiffspeedError(f"preset {name}: {message}", field="preset")


def _compute_dtypes(tables: list) -> set[str]:
    """The dtypes a recipe's precision tables compute in (``compute`` if set, else the stored dtypes)."""
    out = set()
    for t in tables:
        if t.get("name") == "precision":
            stored = {t.get(k) for k in ("unet", "text_encoder", "vae")} - {None}
            out |= {t["compute"]} if t.get("compute") and stored else stored
    return out


def _check(name: str, data: dict) -> None:
    unknown = set(data) - _TOP_KEYS
    if unknown or data.get("name") != name or not isinstance(data.get("description"), str):
        raise _problem(name, f"needs name = {name!r}, a description and the classes {', '.join(CLASSES)}; "
                             f"unknown keys: {', '.join(sorted(unknown)) or 'none'}")
    for cls, (_, allowed) in CLASSES.items():
        table = data.get(cls)
        if not isinstance(table, dict) or set(table) - _CLASS_KEYS or not isinstance(table.get("optimization"), list):
            raise _problem(name, f"[{cls}] needs uses, chosen_on and [[{cls}.optimization]] tables, nothing else")
        if not all(isinstance(table.get(k), str) and table[k].strip() for k in ("uses", "chosen_on")):
            raise _problem(name, f"[{cls}] needs a non-empty uses and chosen_on")
        wrong = _compute_dtypes(table["optimization"]) - set(allowed)
        if wrong:
            raise _problem(name, f"[{cls}] computes in {', '.join(sorted(wrong))}, which {cls} does not run fast "
                                 f"(allowed: {', '.join(allowed)})")


def load_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise DiffspeedError(f"preset: {name!r} is unknown; choose one of {', '.join(PRESETS)}", field="preset")
    data = tomllib.loads((FOLDER / f"{name}.toml").read_text())
    _check(name, data)
    return Preset(name, data["description"], {c: list(data[c]["optimization"]) for c in CLASSES},
                  {c: data[c]["uses"] for c in CLASSES}, {c: data[c]["chosen_on"] for c in CLASSES})


def resolve_preset(name: str, profile):
    """(the validated Recipe of preset ``name`` for ``profile``, why that recipe)."""
    return load_preset(name).resolve(profile)


def preset_recipe(name: str, device: str = "cpu", *, profile=None, measure: bool = True):
    """The recipe of preset ``name`` for ``profile``, or for the profile of ``device`` (``cpu``, ``cuda``,
    ``cuda:N``): probed (seconds, once per machine and torch version; then cached) unless ``measure`` is False,
    when the flags and any cached probe decide."""
    if profile is None and measure:
        from diffspeed.hardware import probe

        profile = probe(device=str(device))
    return load_preset(name).recipe(device, profile=profile)
