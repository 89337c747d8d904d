"""Procedural captioned shapes: the training data of the embedded tiny models.

64x64 RGB images of one or two coloured shapes at named positions on a plain or top-to-bottom gradient
background, with captions such as "a red circle at top left and a yellow star at center on a blue
background". Everything is drawn from a seeded ``numpy`` generator, so a seed fixes the data exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
_SUPERSAMPLE = 4  # draw at 4x and downsample with a box filter: anti-aliased edges

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 225, 30),
    "orange": (245, 135, 20),
    "purple": (135, 45, 185),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle", "star")
_C = (14, 32, 50)  # centres of the 3x3 grid of named positions
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (_C[0], _C[0]),
    "top": (_C[1], _C[0]),
    "top right": (_C[2], _C[0]),
    "left": (_C[0], _C[1]),
    "center": (_C[1], _C[1]),
    "right": (_C[2], _C[1]),
    "bottom left": (_C[0], _C[2]),
    "bottom": (_C[1], _C[2]),
    "bottom right": (_C[2], _C[2]),
}


@dataclass(frozen=True)
class Shape:
    colour: str
    shape: str
    position: str

    def phrase(self) -> str:
        article = "an" if self.colour[0] in "aeiou" else "a"
        return f"{article} {self.colour} {self.shape} at {self.position}"


@dataclass(frozen=True)
class Scene:
    """One image's content; ``background`` is one colour, or two for a top-to-bottom gradient."""

    shapes: tuple[Shape, ...]
    background: tuple[str, ...]

    def caption(self) -> str:
        things = " and ".join(s.phrase() for s in self.shapes)
        article = "an" if self.background[0][0] in "aeiou" else "a"
        if len(self.background) == 1:
            return f"{things} on {article} {self.background[0]} background"
        return f"{things} on {article} {self.background[0]} to {self.background[1]} gradient background"


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * 1.05 * math.sin(a) + r * 0.15)
                for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "star":
        pts = []
        for k in range(10):
            a = -math.pi / 2 + k * math.pi / 5
            rr = r * 1.1 if k % 2 == 0 else r * 0.45
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, rng: np.random.Generator | None = None) -> Image.Image:
    """Draw ``scene``; ``rng`` adds small jitter of position and size (None draws the canonical image)."""
    big = SIZE * _SUPERSAMPLE
    top = np.array(COLOURS[scene.background[0]], dtype=np.float32)
    bottom = np.array(COLOURS[scene.background[-1]], dtype=np.float32)
    t = np.linspace(0.0, 1.0, big, dtype=np.float32)[:, None, None]
    bg = np.broadcast_to(top * (1 - t) + bottom * t, (big, big, 3))
    img = Image.fromarray(bg.round().astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for s in scene.shapes:
        cx, cy = POSITIONS[s.position]
        r = 9.0
        if rng is not None:
            cx += rng.uniform(-2, 2)
            cy += rng.uniform(-2, 2)
            r *= rng.uniform(0.85, 1.1)
        cx, cy, r = cx * _SUPERSAMPLE, cy * _SUPERSAMPLE, r * _SUPERSAMPLE
        if s.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=COLOURS[s.colour])
        else:
            draw.polygon(_polygon(s.shape, cx, cy, r), fill=COLOURS[s.colour])
    return img.resize((SIZE, SIZE), Image.Resampling.BOX)


def random_scene(rng: np.random.Generator, *, p_two: float = 0.3, p_gradient: float = 0.25) -> Scene:
    """A random scene: shape colours differ from the background colour(s) they sit on."""
    names = list(COLOURS)
    if rng.random() < p_gradient:
        a, b = rng.choice(len(names), size=2, replace=False)
        background = (names[a], names[b])
    else:
        background = (names[rng.integers(len(names))],)
    allowed = [c for c in names if c not in background]
    n = 2 if rng.random() < p_two else 1
    positions = rng.choice(len(POSITIONS), size=n, replace=False)
    shapes = tuple(
        Shape(allowed[rng.integers(len(allowed))], SHAPES[rng.integers(len(SHAPES))], list(POSITIONS)[p])
        for p in positions
    )
    return Scene(shapes, background)


def held_out_scenes(count: int = 60, seed: int = 1234) -> list[Scene]:
    """Single-shape, plain-background scenes never shown in training (the colour check's prompts)."""
    rng = np.random.default_rng(seed)
    out: list[Scene] = []
    seen: set[str] = set()
    while len(out) < count:
        scene = random_scene(rng, p_two=0.0, p_gradient=0.0)
        if scene.caption() not in seen:
            seen.add(scene.caption())
            out.append(scene)
    return out


def training_batch(rng: np.random.Generator, n: int, excluded: set[str],
                   **scene_kw: float) -> tuple[np.ndarray, list[str]]:
    """``n`` random images (float32 NCHW in [-1, 1]) and captions, none of whose captions is in ``excluded``."""
    scenes: list[Scene] = []
    while len(scenes) < n:
        s = random_scene(rng, **scene_kw)
        if s.caption() not in excluded:
            scenes.append(s)
    imgs = np.stack([np.asarray(render(s, rng), dtype=np.float32) for s in scenes])
    return imgs.transpose(0, 3, 1, 2) / 127.5 - 1.0, [s.caption() for s in scenes]
