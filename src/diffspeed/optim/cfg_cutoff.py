"""cfg_cutoff: stop classifier-free guidance late in sampling (seed 001, "disabling CFG").

Late steps refine detail that guidance hardly changes, so after the cutoff the UNet runs only the
conditional half of the batch and hands the pipeline that prediction twice: guidance then yields exactly the
conditional prediction, as if the pipeline had been called without CFG from that step on. This is a wrapper
on the UNet, not a pipeline callback, so it works the same for SD and SDXL, any batch size, img2img and
ControlNet residuals, and it clears ``state.cfg`` so block-level caches know the batch layout changed.
"""

from __future__ import annotations

import dataclasses

from diffspeed._lazy import lazy_import
from diffspeed.core import Edits, OptConfig, Optimization, RunState, param, register
from diffspeed.core.tensors import map_tensors

torch = lazy_import("torch")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CfgCutoffConfig(OptConfig):
    name = "cfg_cutoff"
    fraction: float = param(0.5, "fraction of the denoiser calls that keep CFG; 1.0 keeps it everywhere",
                            range=(0.0, 1.0))
    step: int | None = param(None, "denoiser call index from which CFG stops (overrides fraction)",
                             range=(0, 10_000), kind=int)


def _second_half(x, n: int):
    """The conditional half of every batch-shaped tensor in ``x`` (tensors, tuples, lists, dicts)."""
    return map_tensors(x, lambda t: t[n:] if t.dim() > 0 and t.shape[0] == 2 * n else t)


@register
class CfgCutoff(Optimization):
    Config = CfgCutoffConfig
    call_effect = ('cfg_skipped_calls',)
    summary = "stop classifier-free guidance after a fraction of the steps (halves late UNet batches)"
    noop = {"fraction": 1.0}
    example = {"fraction": 0.5}

    def cutoff(self, state: RunState) -> int:
        """The first denoiser call without guidance (an unknown schedule length is refused, never read as 0,
        which would drop guidance from the first step)."""
        return state.call_at(self.config.step, self.config.fraction, self.name, "fraction")

    def _apply(self, pipe, state: RunState, edits: Edits) -> None:
        edits.wrap_method(pipe.unet, "forward", self._forward)

    def _forward(self, inner, sample, *args, **kwargs):
        state = self.state
        if state.step == 0 and (not state.cfg or self.cutoff(state) >= state.total_steps):
            state.stats["stood_aside:cfg_cutoff"] = 1  # no guidance to cut, or the cut-off lies past the last step
        if not state.cfg or state.step < self.cutoff(state):
            return inner(sample, *args, **kwargs)
        state.cfg = False
        state.stats["cfg_skipped_calls"] += 1
        n = sample.shape[0] // 2
        out = inner(sample[n:], *_second_half(args, n), **_second_half(kwargs, n))
        if isinstance(out, tuple):
            return (torch.cat([out[0], out[0]]), *out[1:])
        return dataclasses.replace(out, sample=torch.cat([out.sample, out.sample]))
