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


def _layout(scene: Scene, rng: np.random.Generator | None) -> list[tuple[Shape, float, float, float]]:
    """Each shape with its centre and radius in supersampled pixels; ``rng`` draws the jitter (3 numbers per
    shape, in order), so an image and its mask drawn from one layout match exactly."""
    out = []
    for s in scene.shapes:
        cx, cy = POSITIONS[s.position]
        r = 9.0
        if rng is not None:
            cx += rng.uniform(-2, 2)
            cy += rng.uniform(-2, 2)
            r *= rng.uniform(0.85, 1.1)
        out.append((s, cx * _SUPERSAMPLE, cy * _SUPERSAMPLE, r * _SUPERSAMPLE))
    return out


def _draw(img: Image.Image, layout: list[tuple[Shape, float, float, float]], fill=None) -> Image.Image:
    """Draw the layout's shapes on the supersampled ``img`` (each in its own colour, or all in ``fill``) and
    downsample with a box filter."""
    draw = ImageDraw.Draw(img)
    for s, cx, cy, r in layout:
        colour = COLOURS[s.colour] if fill is None else fill
        if s.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        else:
            draw.polygon(_polygon(s.shape, cx, cy, r), fill=colour)
    return img.resize((SIZE, SIZE), Image.Resampling.BOX)


def _background(scene: Scene) -> Image.Image:
    big = SIZE * _SUPERSAMPLE
    top = np.array(COLOURS[scene.background[0]], dtype=np.float32)
    bottom = np.array(COLOURS[scene.background[-1]], dtype=np.float32)
    t = np.linspace(0.0, 1.0, big, dtype=np.float32)[:, None, None]
    bg = np.broadcast_to(top * (1 - t) + bottom * t, (big, big, 3))
    return Image.fromarray(bg.round().astype(np.uint8), "RGB")


def _mask(layout: list[tuple[Shape, float, float, float]]) -> Image.Image:
    big = SIZE * _SUPERSAMPLE
    return _draw(Image.new("L", (big, big), 0), layout, fill=255)


def render(scene: Scene, rng: np.random.Generator | None = None) -> Image.Image:
    """Draw ``scene``; ``rng`` adds small jitter of position and size (None draws the canonical image)."""
    return _draw(_background(scene), _layout(scene, rng))


def render_mask(scene: Scene, rng: np.random.Generator | None = None) -> Image.Image:
    """The shapes of ``scene`` as white silhouettes on black ("L", anti-aliased like :func:`render`): the
    control signal of the mask ControlNet. The same ``rng`` state gives the same jitter as ``render``."""
    return _mask(_layout(scene, rng))


def render_pair(scene: Scene, rng: np.random.Generator | None = None) -> tuple[Image.Image, Image.Image]:
    """The image and its mask from one jitter draw (``rng`` advances exactly as one ``render`` call)."""
    layout = _layout(scene, rng)
    return _draw(_background(scene), layout), _mask(layout)


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


def _training_scenes(rng: np.random.Generator, n: int, excluded: set[str], **scene_kw: float) -> list[Scene]:
    scenes: list[Scene] = []
    while len(scenes) < n:
        s = random_scene(rng, **scene_kw)
        if s.caption() not in excluded:
            scenes.append(s)
    return scenes


def training_batch(rng: np.random.Generator, n: int, excluded: set[str],
                   **scene_kw: float) -> tuple[np.ndarray, list[str]]:
    """``n`` random images (float32 NCHW in [-1, 1]) and captions, none of whose captions is in ``excluded``."""
    scenes = _training_scenes(rng, n, excluded, **scene_kw)
    imgs = np.stack([np.asarray(render(s, rng), dtype=np.float32) for s in scenes])
    return imgs.transpose(0, 3, 1, 2) / 127.5 - 1.0, [s.caption() for s in scenes]


def training_batch_with_masks(rng: np.random.Generator, n: int, excluded: set[str],
                              **scene_kw: float) -> tuple[np.ndarray, np.ndarray, list[Scene]]:
    """:func:`training_batch` (the same images for the same ``rng`` state) plus each image's shape mask as
    float32 N1HW in [0, 1] -- what a ControlNet pipeline feeds its control image as -- and the scenes."""
    scenes = _training_scenes(rng, n, excluded, **scene_kw)
    pairs = [render_pair(s, rng) for s in scenes]
    imgs = np.stack([np.asarray(im, dtype=np.float32) for im, _ in pairs]).transpose(0, 3, 1, 2) / 127.5 - 1.0
    masks = np.stack([np.asarray(m, dtype=np.float32) for _, m in pairs])[:, None] / 255.0
    return imgs, masks, scenes
