"""Per-model-family facts as data: which family a UNet belongs to and the numbers that differ by family.

A new family is one more row in ``ADAPTERS``; code asks ``adapter_for(pipe)`` instead of branching on the
family itself.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Adapter:
    family: str
    # FreeU (Si et al. 2023) published defaults: b1, b2 scale backbone features, s1, s2 damp skip features.
    freeu: dict
    # DeepCache boundary (skip-feature index, 0 = conv_in's skip). SD 1.x/2.x: 0, the paper's setting. SDXL:
    # 3, past its attention-free first level -- seed 000 found shallow SDXL boundaries lose detail, and on
    # tiny-sdxl (interval 3, 20 Euler steps) branch 0 measured 32.0 dB PSNR, branch 3 46.1 dB
    deepcache_branch: int = 0
    # deepest UNet level whose self-attention HyperTile tiles / ToMe merges by default: the level of the first
    # attention (SD 1.x: the full latent resolution; SDXL has none there, so 0 would do nothing -- seed 000)
    first_attention_level: int = 0
    # What tells this family's UNet apart (checked in order; the first match wins).
    addition_embed_type: str | None = None
    cross_attention_dim: int | None = None


ADAPTERS: tuple[Adapter, ...] = (
    Adapter("sdxl", freeu={"b1": 1.3, "b2": 1.4, "s1": 0.9, "s2": 0.2}, deepcache_branch=3,
            first_attention_level=1, addition_embed_type="text_time"),
    Adapter("sd2", freeu={"b1": 1.4, "b2": 1.6, "s1": 0.9, "s2": 0.2}, cross_attention_dim=1024),
    Adapter("sd1", freeu={"b1": 1.5, "b2": 1.6, "s1": 0.9, "s2": 0.2}),
)


def adapter_for(pipe_or_unet) -> Adapter:
    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    cfg = unet.config
    for a in ADAPTERS:
        if a.addition_embed_type and cfg.get("addition_embed_type") != a.addition_embed_type:
            continue
        if a.cross_attention_dim and cfg.get("cross_attention_dim") != a.cross_attention_dim:
            continue
        return a
    raise AssertionError("the last adapter matches everything")
