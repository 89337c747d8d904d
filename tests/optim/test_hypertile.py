"""hypertile: tiles are an exact reshuffle, the tiling follows the seed, odd grids are handled, the VAE's
attention can be tiled, SDXL's default depth reaches its first attention, and the image stays close."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffspeed import DiffspeedError
from diffspeed.core import Accelerated, Recipe, RecipeError
from diffspeed.metrics import psnr
from diffspeed.optim.hypertile import HyperTileConfig, merge, split, tilings


def images(pipe, size=64, seed=0, **kw):
    return pipe(["a red circle at top left on a blue background"] * 2, num_inference_steps=6, width=size,
                height=size, output_type="np", generator=[torch.Generator().manual_seed(seed + i) for i in range(2)],
                **kw).images


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3))
def test_split_then_merge_is_the_identity(nh, nw, th, tw, b):
    h, w = nh * th, nw * tw
    x = torch.randn(b, h * w, 3)
    tiles = split(x, h, w, nh, nw)
    assert tiles.shape == (b * nh * nw, th * tw, 3)
    assert torch.equal(merge(tiles, h, w, nh, nw), x)
    # tile 0 of image 0 is the top-left th x tw block of the grid
    assert torch.equal(tiles[0], x[0].view(h, w, 3)[:th, :tw].reshape(-1, 3))


def test_tilings_choose_the_finest_that_divide():
    assert tilings(64, 32, 2) == [2, 1]
    assert tilings(64, 8, 3) == [8, 4, 2]
    assert tilings(9, 2, 2) == [3, 1]  # 9 tokens: tiles of 3 or 9
    assert tilings(7, 2, 4) == [1]  # prime: no tiling at all
    assert tilings(5, 64, 2) == [1]


def test_tiles_and_seed(tiny_sd):
    base = images(tiny_sd)
    with Accelerated(tiny_sd, [HyperTileConfig(tile_size=32, swap_size=2)]) as fast:
        a = images(fast)
        stats = dict(fast.stats)
        assert np.array_equal(images(fast), a)  # the tiling RNG is reset per call
    with Accelerated(tiny_sd, [HyperTileConfig(tile_size=32, swap_size=2, seed=5)]) as fast:
        b = images(fast)
    assert stats["hypertile_tiled_calls"] > 0 and stats["hypertile_tiles"] >= 2 * stats["hypertile_tiled_calls"]
    assert not np.array_equal(a, b) and not np.array_equal(a, base)
    assert psnr(a, base) > 14.5  # measured 17.0 dB: 4x4-token tiles on a 16x16 latent, 6 PNDM steps


def test_odd_grid_is_handled(tiny_sd):
    with Accelerated(tiny_sd, [HyperTileConfig(tile_size=24)]) as fast:
        out = images(fast, size=72)  # 9x9 latent: tiles of 3x3 tokens
        assert out.shape == (2, 72, 72, 3) and np.isfinite(out).all()
        assert fast.stats["hypertile_tiled_calls"] > 0


def test_vae_attention_tiled(tiny_sd):
    with Accelerated(tiny_sd, [HyperTileConfig(tile_size=4096, vae=True, vae_tile_size=32)]) as fast:
        out = images(fast)
        assert fast.stats["hypertile_tiled_calls"] == 1  # one decode of the batch, UNet untouched
    assert np.isfinite(out).all()


def test_sdxl_default_depth_reaches_its_first_attention(tiny_sdxl):
    with Accelerated(tiny_sdxl, [HyperTileConfig(tile_size=32)]) as fast:
        images(fast)
        assert fast.stats["hypertile_tiled_calls"] > 0
    with Accelerated(tiny_sdxl, [HyperTileConfig(tile_size=32, max_depth=0)]) as fast:
        images(fast)  # SDXL has no attention at level 0: the SD 1.x default would do nothing
        assert fast.stats.get("hypertile_tiled_calls", 0) == 0


def test_bad_values_and_conflict(tiny_sd):
    with pytest.raises(DiffspeedError) as err:
        HyperTileConfig(tile_size=8)
    assert err.value.field == "tile_size"
    with pytest.raises(RecipeError, match="hypertile"):
        Recipe.from_dict({"optimization": [{"name": "hypertile"}, {"name": "tome"}]}).validate(tiny_sd)
