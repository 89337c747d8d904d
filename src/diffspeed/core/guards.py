"""Shared safety rules of the caching optimizations (deepcache, tgate): few-step samplers are left alone.

Reusing features between denoiser calls assumes adjacent calls see similar inputs. With a handful of steps
(LCM, SDXL-Turbo, Lightning: 1-8 steps) each call moves the latent far, and caching ruins the image; the
web-UI extension and the DeepCache paper both report it. Such runs are left untouched, with a note in the
run's events, unless the user forces it.
"""

from __future__ import annotations

import dataclasses

from diffspeed.core.optimization import OptConfig, param
from diffspeed.core.state import RunState

FEW_STEP_SCHEDULERS = ("LCMScheduler", "TCDScheduler")  # made for 1-8 steps, where caching fails


def caching_allowed(state: RunState, name: str, min_steps: int, force: bool) -> bool:
    """False (and a note in ``state.events``, once per run) when caching should stay off for this run."""
    if force:
        return True
    scheduler = getattr(state.pipeline, "scheduler", None)
    # img2img and hires passes run part of a longer schedule: its length is what sets the step size
    steps = max(state.total_steps, getattr(scheduler, "num_inference_steps", None) or 0)
    reason = None
    if type(scheduler).__name__ in FEW_STEP_SCHEDULERS:
        reason = f"{type(scheduler).__name__} is a few-step sampler"
    elif 0 < steps < min_steps:
        reason = f"a {steps}-step schedule < min_steps {min_steps}"
    if reason is None:
        return True
    note = f"{name}: {reason}; not caching (force=true to cache anyway)"
    if note not in state.events:
        state.events.append(note)
    state.stats[f"stood_aside:{name}"] = 1  # the effect check: doing nothing here is deliberate and said
    return False


@dataclasses.dataclass(frozen=True, kw_only=True)
class CachingConfig(OptConfig):
    """The fields every caching optimization's config shares (see :func:`caching_allowed`)."""

    min_steps: int = param(10, "runs with fewer steps, or with a few-step sampler (LCM, TCD), are left alone "
                           "with a note: caching ruins them", range=(1, 1000))
    force: bool = param(False, "cache even below min_steps or with a few-step sampler")

    def caching_allowed(self, state: RunState, name: str) -> bool:
        return caching_allowed(state, name, self.min_steps, self.force)
