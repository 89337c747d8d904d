"""vae_slicing: decode a batch one image at a time (seed 003): peak VAE memory of one image, same pixels
up to float rounding, slower only for large batches."""

from __future__ import annotations

import dataclasses

from diffspeed.core import Edits, OptConfig, Optimization, RunState, register


@dataclasses.dataclass(frozen=True, kw_only=True)
class VaeSlicingConfig(OptConfig):
    name = "vae_slicing"


@register
class VaeSlicing(Optimization):
    Config = VaeSlicingConfig
    summary = "decode the batch one image at a time (lower VAE peak memory)"
    noop = None  # no identity setting: it always slices
    example = {}

    def _apply(self, pipe, state: RunState, edits: Edits) -> None:
        edits.set_attr(pipe.vae, "use_slicing", True)
