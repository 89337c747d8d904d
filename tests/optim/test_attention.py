import numpy as np
import pytest
from diffusers.models.attention_processor import AttnProcessor, SlicedAttnProcessor

from diffspeed import DiffspeedError
from diffspeed.core import Accelerated
from diffspeed.optim.attention import AttentionConfig

from .contract import run


@pytest.mark.parametrize("config", [AttentionConfig(backend="sliced", slice_size=1), AttentionConfig(backend="math"),
                                    AttentionConfig(backend="sdpa", sdpa_kernel="math")])
def test_backends_match_sdpa(tiny_sd, config):
    base = run(tiny_sd, steps=3)
    with Accelerated(tiny_sd, [config]) as fast:
        out = run(fast, steps=3)
    assert np.allclose(out, base, atol=2e-3)


def test_processors_reach_unet_and_vae(tiny_sdxl):
    with Accelerated(tiny_sdxl, [AttentionConfig(backend="sliced")]):
        assert all(isinstance(p, SlicedAttnProcessor) for p in tiny_sdxl.unet.attn_processors.values())
        assert all(isinstance(p, SlicedAttnProcessor) for p in tiny_sdxl.vae.attn_processors.values())
    with Accelerated(tiny_sdxl, [AttentionConfig(backend="math", vae=False)]):
        assert not any(isinstance(p, AttnProcessor) for p in tiny_sdxl.vae.attn_processors.values())


def test_misplaced_fields_are_rejected():
    with pytest.raises(DiffspeedError, match="slice_size applies only"):
        AttentionConfig(backend="sdpa", slice_size=2)
