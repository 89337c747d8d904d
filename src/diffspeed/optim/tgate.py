"""tgate: T-GATE (Zhang et al. 2024, "Cross-Attention Makes Inference Cumbersome in Text-to-Image Diffusion
Models") -- cross-attention converges early, so after a gate step its output is cached and reused.

Until the gate (``gate_step`` denoiser calls, or ``gate_fraction`` of them) every cross-attention layer runs
and its latest output is kept; from the gate on, each layer returns the kept output instead of attending to
the text. With classifier-free guidance the paper also averages the conditional and unconditional outputs
and then stops guidance -- a second, separate speed-up. Here the two are kept apart so each is measured on
its own: by default each half of the batch keeps its own cached output (guidance still acts through the
self-attention and convolutions); ``average=True`` reuses the paper's mean of the two halves; stopping
guidance is ``cfg_cutoff``'s job. After a CFG cut-off the conditional half (or the mean) serves the smaller
batch. ``stats["tgate_cached_calls"]`` counts cross-attention calls served from the cache.
"""

from __future__ import annotations

import dataclasses

from diffspeed._lazy import lazy_import
from diffspeed.core import Edits, Optimization, RunState, param, register
from diffspeed.core.guards import CachingConfig

torch = lazy_import("torch")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TgateConfig(CachingConfig):
    name = "tgate"
    gate_fraction: float = param(0.4, "fraction of the denoiser calls after which cross-attention is cached "
                                 "(the paper gates at step 10 of 25); 1.0 = never", range=(0.0, 1.0))
    gate_step: int | None = param(None, "denoiser call index of the gate (overrides gate_fraction)",
                                  range=(1, 10_000), kind=int)
    average: bool = param(False, "reuse the mean of the unconditional and conditional outputs, as the paper")


@register
class Tgate(Optimization):
    Config = TgateConfig
    call_effect = ('tgate_cached_calls',)
    summary = "T-GATE: cache cross-attention output after a gate step (text stops mattering late)"
    stateful = True
    noop = {"gate_fraction": 1.0}
    example = {"gate_fraction": 0.5, "min_steps": 1}

    def _apply(self, pipe, state: RunState, edits: Edits) -> None:
        self._reset()
        for name, module in pipe.unet.named_modules():
            if name.endswith(".attn2") and getattr(module, "is_cross_attention", False):
                edits.wrap_method(module, "forward", self._forward(id(module)))

    def _reset(self) -> None:
        self._cache: dict[int, torch.Tensor] = {}

    def gate(self, state: RunState) -> int:
        """The first gated denoiser call."""
        return state.call_at(self.config.gate_step, self.config.gate_fraction, self.name, "gate_fraction")

    def _forward(self, key: int):
        def forward(inner, hidden_states, *args, **kwargs):
            state = self.state
            gated = (state.step >= 0 and state.step >= self.gate(state)
                     and self.config.caching_allowed(state, self.name))
            cached = self._cache.get(key)
            if not gated or cached is None:  # before the gate (or a gate at call 0): attend, keep the latest
                out = inner(hidden_states, *args, **kwargs)
                self._cache[key] = self._keep(out)
                return out
            state.stats["tgate_cached_calls"] += 1
            return self._serve(cached, hidden_states.shape[0])

        return forward

    def _keep(self, out: torch.Tensor) -> torch.Tensor:
        if self.config.average and self.state.cfg and out.shape[0] % 2 == 0:
            uncond, cond = out.chunk(2)
            mean = (uncond + cond) / 2
            return torch.cat([mean, mean])
        return out

    def _serve(self, cached: torch.Tensor, batch: int) -> torch.Tensor:
        if cached.shape[0] == batch:
            return cached
        if cached.shape[0] == 2 * batch:  # CFG was cut off after the gate: the conditional half
            return cached[batch:]
        raise RuntimeError(f"tgate: cached batch {cached.shape[0]} cannot serve batch {batch}")
