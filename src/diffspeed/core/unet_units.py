"""The UNet as a list of skip branches: what produces and what consumes each skip connection.

A diffusers ``UNet2DConditionModel`` (and the encoder half of a ``ControlNetModel``) keeps a list of skip
features: ``conv_in``'s output, then one per down-block layer (resnet, with its transformer if the block has
attention) and one per downsampler. The up blocks consume them in reverse, one per layer. Block-level
optimizations (DeepCache's branch index, HyperTile's and ToMe's depth) are stated in these terms, so they are
found here from the modules themselves -- duck typing on ``resnets`` / ``attentions`` / ``downsamplers`` /
``upsamplers``, the attributes every diffusers down and up block has -- rather than from per-class code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from diffspeed._lazy import lazy_import

torch = lazy_import("torch")


@dataclass(frozen=True)
class Unit:
    """Modules that run one after another inside ``block`` and together make one step of the path."""

    block: torch.nn.Module
    modules: tuple[torch.nn.Module, ...]
    level: int  # resolution level: 0 = full latent resolution
    kind: str  # "layer", "downsample" or "upsample"


def _layers(block, level: int) -> list[Unit]:
    attns = list(getattr(block, "attentions", None) or [])
    units = []
    for j, resnet in enumerate(block.resnets):
        mods = (resnet, attns[j]) if j < len(attns) else (resnet,)
        units.append(Unit(block, mods, level, "layer"))
    return units


def down_units(model) -> list[Unit]:
    """The units of the down path in execution order; unit ``i`` produces skip feature ``i + 1``."""
    units = []
    for level, block in enumerate(model.down_blocks):
        units += _layers(block, level)
        units += [Unit(block, (d,), level, "downsample") for d in (getattr(block, "downsamplers", None) or [])]
    return units


def up_units(unet) -> list[Unit]:
    """The units of the up path in execution order (layers consume one skip feature each, upsamplers none)."""
    units = []
    n = len(unet.up_blocks)
    for i, block in enumerate(unet.up_blocks):
        level = n - 1 - i
        units += _layers(block, level)
        units += [Unit(block, (u,), level, "upsample") for u in (getattr(block, "upsamplers", None) or [])]
    return units


def n_branches(unet) -> int:
    """How many skip features the UNet keeps (SD 1.5: 12; the SD1.x tiny model: 9)."""
    return 1 + len(down_units(unet))


def consumer_index(unet, branch: int) -> int:
    """Index in :func:`up_units` of the layer that consumes skip feature ``branch``."""
    layers = [i for i, u in enumerate(up_units(unet)) if u.kind == "layer"]
    if not 0 <= branch < len(layers):
        raise ValueError(f"branch {branch} outside 0..{len(layers) - 1}")
    return layers[len(layers) - 1 - branch]


def attention_levels(unet) -> list[tuple[int, str, torch.nn.Module]]:
    """Every transformer of the UNet with its resolution level and path ("down", "mid", "up")."""
    out = []
    for path, units in (("down", down_units(unet)), ("up", up_units(unet))):
        out += [(u.level, path, m) for u in units for m in u.modules[1:]]
    mid_attns = getattr(getattr(unet, "mid_block", None), "attentions", None) or []
    out += [(len(unet.down_blocks) - 1, "mid", m) for m in mid_attns]
    return out


def grid_at(latent_hw: tuple[int, int], level: int) -> tuple[int, int]:
    """The token grid at resolution ``level`` for a latent of ``latent_hw``: the UNet's stride-2
    convolutions round odd sizes up."""
    h, w = latent_hw
    for _ in range(level):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return h, w
