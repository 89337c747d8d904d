"""freeu: FreeU (Si et al., CVPR 2024) -- rescale UNet decoder backbone and skip features, no training.

b1, b2 scale the backbone features of the first two up blocks; s1, s2 damp the low frequencies of their skip
connections. Defaults are the published values for the pipeline's family (see diffspeed.adapters). diffusers
implements the maths inside its up blocks when the four attributes are set; this sets them per up block and
records each, so remove() deletes them again. b = s = 1 is the identity and is applied as no change at all
(FreeU's FFT round trip would otherwise perturb the last bits).
"""

from __future__ import annotations

import dataclasses

from diffspeed.adapters import adapter_for
from diffspeed.core import Edits, OptConfig, Optimization, RunState, param, register

_R = (0.01, 3.0)  # 0 would read as "disabled" inside diffusers' truthiness check, so it is not allowed


@dataclasses.dataclass(frozen=True, kw_only=True)
class FreeUConfig(OptConfig):
    name = "freeu"
    b1: float | None = param(None, "backbone scale, stage 1 (SD1 1.5, SD2 1.4, SDXL 1.3)", range=_R, kind=float)
    b2: float | None = param(None, "backbone scale, stage 2 (SD1 1.6, SD2 1.6, SDXL 1.4)", range=_R, kind=float)
    s1: float | None = param(None, "skip low-frequency scale, stage 1 (0.9)", range=_R, kind=float)
    s2: float | None = param(None, "skip low-frequency scale, stage 2 (0.2)", range=_R, kind=float)


@register
class FreeU(Optimization):
    Config = FreeUConfig
    summary = "FreeU: rescale decoder backbone/skip features (quality tweak, ~free)"
    noop = {"b1": 1.0, "b2": 1.0, "s1": 1.0, "s2": 1.0}
    example = {}

    def values(self, pipe) -> dict:
        defaults = adapter_for(pipe).freeu
        return {k: v if (v := getattr(self.config, k)) is not None else defaults[k] for k in ("s1", "s2", "b1", "b2")}

    def _apply(self, pipe, state: RunState, edits: Edits) -> None:
        values = self.values(pipe)
        if all(v == 1.0 for v in values.values()):
            return
        for block in pipe.unet.up_blocks:
            for k, v in values.items():
                edits.set_attr(block, k, v)
