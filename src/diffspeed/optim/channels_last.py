"""channels_last: NHWC memory layout for the convolution weights of the UNet and/or VAE (seeds 001-003).

Faster convolutions on GPUs with tensor cores (and on many CPUs with oneDNN); values are unchanged, so the
only cost is the one-off copy. remove() puts back the very tensors that were there before.
"""

from __future__ import annotations

import dataclasses

from diffspeed._lazy import lazy_import
from diffspeed.core import Edits, OptConfig, Optimization, RunState, param, register

torch = lazy_import("torch")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ChannelsLastConfig(OptConfig):
    name = "channels_last"
    unet: bool = param(True, "convert the UNet's 4-D weights")
    vae: bool = param(True, "convert the VAE's 4-D weights")


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t


@register
class ChannelsLast(Optimization):
    Config = ChannelsLastConfig
    summary = "channels-last (NHWC) weights for the UNet and VAE convolutions"
    noop = {"unet": False, "vae": False}
    example = {"unet": True, "vae": True}

    def _apply(self, pipe, state: RunState, edits: Edits) -> None:
        for part in ("unet", "vae"):
            if getattr(self.config, part):
                edits.retensor(getattr(pipe, part), _nhwc)
