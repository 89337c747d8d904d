"""Prompt queues: fixed prompts with fixed seeds, so every recipe draws exactly the same images.

``TINY`` speaks the embedded models' language (coloured shapes); ``SEED001`` is the SDXL guide's queue
(seed 001: portrait, interior, macro, 3D render) for real checkpoints. ``load_queue`` reads a user's own
queue from JSON (``[{"prompt": ..., "seed": ...}, ...]``) or TOML (``[[prompt]]`` tables).

``colour_check_queue(n)`` is the first ``n`` held-out prompts of the tiny models' colour check
(:func:`diffspeed.tiny.data.held_out_scenes`, seeds ``0..n-1``), and :func:`scene_of` turns a caption back
into its :class:`~diffspeed.tiny.data.Scene`, so the bench can score any queue of captions for prompt adherence.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from diffspeed.errors import DiffspeedError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit seed


@dataclass(frozen=True)
class QueueItem:
    prompt: str
    seed: int
    negative_prompt: str = ""


TINY = (  # four scenes: two shapes, one on a gradient, one alone, two stacked -- like seed 001's four subjects
    QueueItem("a red circle at top left and a yellow star at center on a blue background", 877866765),
    QueueItem("a white square at bottom right on a black to gray gradient background", 556782245),
    QueueItem("a purple triangle at center on an orange background", 225789945),
    QueueItem("a green star at top and a blue circle at bottom on a white background", 987867834),
)

SEED001 = (  # Felix Sanz, "Stable Diffusion XL optimization" (seed 001), prompts and seeds as published
    QueueItem("3/4 shot, candid photograph of a beautiful 30 year old redhead woman with messy dark hair, "
              "peacefully sleeping in her bed, night, dark, light from window, dark shadows, masterpiece, uhd, "
              "moody", 877866765),
    QueueItem("futuristic living room with big windows, brown sofas, coffee table, plants, cyberpunk city, "
              "concept art, earthy colors", 5567822456),
    QueueItem("macro shot of a bee collecting nectar from lavender flowers", 2257899453),
    QueueItem("3d rendered isometric fiji island beach, 3d tile, polygon, cartoony, mobile game", 987867834),
)

QUEUES = {"tiny": TINY, "seed001": SEED001}


def default_queue(model: str) -> tuple[QueueItem, ...]:
    """The embedded models get prompts they understand; anything else gets seed 001's queue."""
    return TINY if model.startswith("tiny-") else SEED001


def _item(raw, where: str) -> QueueItem:
    if not isinstance(raw, dict) or not isinstance(raw.get("prompt"), str) or not raw["prompt"].strip():
        raise DiffspeedError(f"queue: {where} needs a non-empty 'prompt' string", field="queue")
    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= SEED_MAX:
        raise DiffspeedError(f"queue: {where} seed must be an integer in 0..{SEED_MAX}, got {seed!r}", field="queue")
    extra = set(raw) - {"prompt", "seed", "negative_prompt"}
    if extra:
        raise DiffspeedError(f"queue: {where} has unknown keys {sorted(extra)}; allowed: prompt, seed, "
                             "negative_prompt", field="queue")
    return QueueItem(raw["prompt"], seed, str(raw.get("negative_prompt", "")))


def load_queue(spec: str) -> tuple[QueueItem, ...]:
    """A built-in queue by name (``tiny``, ``seed001``) or a JSON / TOML file of prompts and seeds."""
    if spec in QUEUES:
        return QUEUES[spec]
    path = Path(spec)
    if not path.is_file():
        raise DiffspeedError(f"queue: {spec!r} is neither a built-in queue ({', '.join(QUEUES)}) nor a file",
                             field="queue")
    try:
        data = tomllib.loads(path.read_text()) if path.suffix.lower() == ".toml" else json.loads(path.read_text())
    except (ValueError, tomllib.TOMLDecodeError) as err:
        raise DiffspeedError(f"queue: {path} is not valid {path.suffix[1:] or 'JSON'}: {err}", field="queue") from None
    items = data.get("prompt", data.get("prompts")) if isinstance(data, dict) else data
    if not isinstance(items, list) or not items:
        raise DiffspeedError(f"queue: {path} must hold a non-empty list of prompts", field="queue")
    return tuple(_item(raw, f"{path.name} item {i}") for i, raw in enumerate(items))


# ------------------------------------------------------------------------------ colour-check prompts and scenes
HELD_OUT = 60  # the colour check's held-out prompts (diffspeed.tiny.data.held_out_scenes)


def colour_check_queue(n: int = HELD_OUT) -> tuple[QueueItem, ...]:
    """The first ``n`` held-out prompts of the colour check (never shown in training), seeds ``0..n-1``."""
    from diffspeed.errors import check_range
    from diffspeed.tiny.data import held_out_scenes

    check_range("adherence", n, 1, HELD_OUT)
    return tuple(QueueItem(scene.caption(), i) for i, scene in enumerate(held_out_scenes(HELD_OUT)[:n]))


@lru_cache(maxsize=1)
def _caption_patterns() -> tuple[re.Pattern, re.Pattern]:
    from diffspeed.tiny.data import COLOURS, POSITIONS, SHAPES

    def alt(names):  # longest first: "top left" before "top"
        return "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))

    colour = alt(COLOURS)
    shape = re.compile(rf"an? ({colour}) ({alt(SHAPES)}) at ({alt(POSITIONS)})")
    background = re.compile(rf"an? ({colour})(?: to ({colour}) gradient)? background")
    return shape, background


def scene_of(prompt: str):
    """The :class:`~diffspeed.tiny.data.Scene` whose caption ``prompt`` is exactly (the tiny models' training
    captions: "a red circle at top left and a yellow star at center on a blue background"), else None."""
    from diffspeed.tiny.data import Scene, Shape

    shape_re, background_re = _caption_patterns()
    things, sep, where = prompt.rpartition(" on ")
    bg = background_re.fullmatch(where) if sep else None
    if bg is None:
        return None
    shapes = []
    for part in things.split(" and "):
        m = shape_re.fullmatch(part)
        if m is None:
            return None
        shapes.append(Shape(*m.groups()))
    scene = Scene(tuple(shapes), tuple(c for c in bg.groups() if c))
    return scene if scene.caption() == prompt else None  # articles and spacing exactly as the captions have them


def scenes_of(queue) -> list | None:
    """Each queue item's scene, or None unless every prompt is a colour-check caption (without a negative
    prompt, which the colour check never uses)."""
    scenes = [None if _get(item, "negative_prompt") else scene_of(_get(item, "prompt")) for item in queue]
    return scenes if scenes and all(s is not None for s in scenes) else None


def _get(item, key: str):
    return item.get(key) if isinstance(item, dict) else getattr(item, key)
