"""vae_tiling: encode/decode large images in overlapping tiles, blended at the seams (seed 003).

Peak VAE memory then depends on the tile, not the image: the way to decode 2048x2048+ on small cards. Tiles
smaller than the image change pixels slightly near seams; an image no larger than one tile is untouched.
"""

from __future__ import annotations

import dataclasses

from diffspeed.core import Edits, OptConfig, Optimization, RunState, param, register


@dataclasses.dataclass(frozen=True, kw_only=True)
class VaeTilingConfig(OptConfig):
    name = "vae_tiling"
    tile_size: int = param(512, "tile edge in pixels (a multiple of 8); SD 512, SDXL 1024 are natural",
                           range=(32, 8192))
    overlap: float = param(0.25, "fraction of a tile shared with its neighbour, blended linearly",
                           range=(0.0, 0.75))

    def checks(self):
        return [] if self.tile_size % 8 == 0 else [("tile_size", f"vae_tiling.tile_size must be a multiple of 8, "
                                                                 f"got {self.tile_size}")]


@register
class VaeTiling(Optimization):
    Config = VaeTilingConfig
    summary = "tiled VAE encode/decode for large images (memory bounded by the tile)"
    call_effect = ("vae_tiled_decodes", "vae_tiled_encodes")  # an image no larger than one tile is not tiled
    stands_aside = 'an image no larger than one tile is encoded and decoded untiled'
    noop = {"tile_size": 8192}
    example = {"tile_size": 32, "overlap": 0.25}

    def _apply(self, pipe, state: RunState, edits: Edits) -> None:
        vae, c = pipe.vae, self.config
        scale = 2 ** (len(vae.config.block_out_channels) - 1)
        edits.set_attr(vae, "use_tiling", True)
        edits.set_attr(vae, "tile_sample_min_size", c.tile_size)
        edits.set_attr(vae, "tile_latent_min_size", c.tile_size // scale)
        edits.set_attr(vae, "tile_overlap_factor", c.overlap)
        for method, key in (("tiled_decode", "vae_tiled_decodes"), ("_tiled_encode", "vae_tiled_encodes")):
            if hasattr(vae, method):  # diffusers' own switch decides; count the calls that did tile
                edits.wrap_method(vae, method, self._counting(key))

    def _counting(self, key: str):
        def counted(inner, *args, **kwargs):
            self.state.stats[key] += 1
            return inner(*args, **kwargs)

        return counted
