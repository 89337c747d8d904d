"""hypertile: HyperTile (tfernd/HyperTile, 2023; the web UI's "Hypertile U-Net / VAE") -- tiled self-attention.

Self-attention over the h x w latent grid costs O((h w)^2). HyperTile cuts the grid into nh x nw tiles and
attends within each tile (the tiles become extra batch rows), so the cost falls by about nh * nw. Tile counts
are drawn per attention call from the ``swap_size`` finest tilings whose tiles are at least ``tile_size``
image pixels wide, with a RNG seeded per generation, so seams move from step to step and do not pile up
while the same seed still gives the same image. Only self-attention at resolution levels <= ``max_depth``
is tiled (SDXL's first attention sits one level deeper than SD 1.x's: the per-family default comes from
diffspeed.adapters); with ``vae`` the VAE's mid-block attention is tiled too.

The reshaping is done by a forward pre-hook and undone by a forward hook on each ``Attention`` module, so it
works with every attention processor. Grids that a tiling cannot divide (odd sizes) are left untiled.
"""

from __future__ import annotations

import dataclasses
import random

from diffspeed._lazy import lazy_import
from diffspeed.adapters import adapter_for
from diffspeed.core import Edits, OptConfig, Optimization, RunState, param, register
from diffspeed.core.unet_units import attention_levels, grid_at

torch = lazy_import("torch")


@dataclasses.dataclass(frozen=True, kw_only=True)
class HyperTileConfig(OptConfig):
    name = "hypertile"
    tile_size: int = param(256, "smallest tile edge in image pixels (the web UI's max tile size; 256 for "
                           "SD 1.5 at 512-768 px, larger tiles keep more global coherence)", range=(16, 4096))
    swap_size: int = param(2, "how many of the finest tilings to choose from at random per call (1 = always "
                           "the finest)", range=(1, 16))
    max_depth: int | None = param(None, "deepest resolution level whose self-attention is tiled (0 = full "
                                  "latent resolution); default per model family", range=(0, 3), kind=int)
    vae: bool = param(False, "also tile the VAE's mid-block attention (the web UI's Hypertile VAE)")
    vae_tile_size: int = param(128, "VAE: smallest tile edge in image pixels", range=(16, 4096))
    seed: int = param(0, "seed of the tiling RNG (reset before every generation)", range=(0, 2**31 - 1))


def tilings(n: int, min_edge: int, swap_size: int) -> list[int]:
    """Tile counts along an axis of ``n`` tokens whose tiles are >= ``min_edge`` tokens: the ``swap_size``
    largest counts (finest tilings) of those dividing ``n`` evenly."""
    min_edge = max(1, min(min_edge, n))
    edges = [e for e in range(min_edge, n + 1) if n % e == 0]
    return [n // e for e in edges[:swap_size]]


def split(x: torch.Tensor, h: int, w: int, nh: int, nw: int) -> torch.Tensor:
    """(B, h*w, C) -> (B*nh*nw, (h/nh)*(w/nw), C): each tile's tokens as one batch row."""
    b, _, c = x.shape
    x = x.view(b, nh, h // nh, nw, w // nw, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b * nh * nw, (h // nh) * (w // nw), c)


def merge(x: torch.Tensor, h: int, w: int, nh: int, nw: int) -> torch.Tensor:
    """The inverse of :func:`split`."""
    bt, _, c = x.shape
    b = bt // (nh * nw)
    x = x.view(b, nh, nw, h // nh, w // nw, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * w, c)


@register
class HyperTile(Optimization):
    Config = HyperTileConfig
    call_effect = ('hypertile_tiled_calls',)
    stands_aside = 'a latent no larger than its tile size runs untiled'
    summary = "HyperTile: self-attention within random tiles of the latent grid (big images, little cost)"
    stateful = True
    noop = {"tile_size": 4096}
    example = {"tile_size": 16, "vae": True, "vae_tile_size": 16}

    def _apply(self, pipe, state: RunState, edits: Edits) -> None:
        unet = pipe.unet
        depth = self.config.max_depth if self.config.max_depth is not None else adapter_for(pipe).first_attention_level
        self._scale = getattr(pipe, "vae_scale_factor", 8)
        self._latent = (0, 0)
        self._reset()
        edits.forward_pre_hook(unet.conv_in, self._see_latent)
        for level, _, transformer in attention_levels(unet):
            if level > depth:
                continue
            for block in transformer.transformer_blocks:
                self._tile(edits, block.attn1, lambda lv=level: self._grid(lv),
                           self.config.tile_size // self._scale >> level)
        vae_mid = getattr(getattr(getattr(pipe, "vae", None), "decoder", None), "mid_block", None)
        if self.config.vae and vae_mid is not None:
            for attn in vae_mid.attentions:
                self._tile(edits, attn, None, self.config.vae_tile_size // self._scale)

    def _reset(self) -> None:
        self._rng = random.Random(self.config.seed)

    def _see_latent(self, module, args):
        self._latent = tuple(args[0].shape[-2:])

    def _grid(self, level: int) -> tuple[int, int]:
        return grid_at(self._latent, level)

    def _tile(self, edits: Edits, attn, grid, min_edge: int) -> None:
        def before(x, kwargs):
            four_d = x.dim() == 4  # the VAE's attention takes (B, C, H, W)
            h, w = (x.shape[2], x.shape[3]) if four_d else grid()
            tokens = x.flatten(2).transpose(1, 2) if four_d else x
            if kwargs.get("attention_mask") is not None or h * w != tokens.shape[1]:
                self.state.stats["hypertile_untiled_calls"] += 1
                return None
            nh = self._rng.choice(tilings(h, min_edge, self.config.swap_size))
            nw = self._rng.choice(tilings(w, min_edge, self.config.swap_size))
            if nh * nw == 1:
                return None
            self.state.stats["hypertile_tiled_calls"] += 1
            self.state.stats["hypertile_tiles"] += nh * nw
            tiled = split(tokens, h, w, nh, nw)
            if four_d:  # back to (B', C, h', w') for the processor
                tiled = tiled.transpose(1, 2).reshape(tiled.shape[0], -1, h // nh, w // nw)

            def after(out):
                merged = merge(out.flatten(2).transpose(1, 2) if four_d else out, h, w, nh, nw)
                return merged.transpose(1, 2).reshape(x.shape) if four_d else merged

            return tiled, after

        edits.around(attn, before)
