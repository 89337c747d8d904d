"""Per-call state shared by the optimizations of one accelerated pipeline.

The step index is counted from denoiser calls -- never looked up in ``scheduler.timesteps``, which repeats
timesteps on second-order samplers (Heun, DPM2) and costs a host sync per lookup.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RunState:
    step: int = -1  # index of the current denoiser call in this run, 0-based (-1 before the first)
    total_steps: int = 0  # denoiser calls this run will make, as the pipeline announced it
    cfg: bool = False  # the current denoiser batch is [unconditional, conditional] (classifier-free guidance)
    stats: Counter = field(default_factory=Counter)  # counts an optimization wants to report
    events: list[str] = field(default_factory=list)  # one-off notes ("vae decode re-run in fp32")
    pipeline: Any = None  # the pipeline object running this call (the loaded one, or a workflow pipeline)
    continues: bool = False  # this call carries on from the previous one (hires fix's second pass)

    def reset(self) -> None:
        self.step, self.total_steps, self.cfg, self.pipeline, self.continues = -1, 0, False, None, False
        self.stats.clear()
        self.events.clear()

    def require_schedule(self, name: str, field: str) -> int:
        """The schedule length, for an optimization that places itself by a fraction of it; one clear error
        when this pipeline does not announce it (guessing would silently move the cut-off to step 0)."""
        if self.total_steps <= 0:
            from diffspeed.errors import DiffspeedError

            kind = type(self.pipeline).__name__ if self.pipeline is not None else "this pipeline"
            raise DiffspeedError(f"{name}: {kind} does not say how many denoiser calls it makes (no num_timesteps, "
                                 f"no scheduler timesteps), so {name}.{field} cannot be placed; give a step index "
                                 "instead of a fraction", field=field)
        return self.total_steps

    def call_at(self, step: int | None, fraction: float, name: str, field: str) -> int:
        """The denoiser call index where a setting starts: ``step`` when given, else ``fraction`` of the schedule
        (which must be known, see :meth:`require_schedule`); a fraction of 1 or more is never reached."""
        if step is not None:
            return step
        if fraction >= 1.0:
            return 2**62
        return math.ceil(fraction * self.require_schedule(name, field) - 1e-9)

    @property
    def progress(self) -> float:
        """Fraction of the schedule done before the current call: 0 at the first call."""
        return self.step / self.total_steps if self.total_steps else 0.0

    def begin_denoiser_call(self, pipe) -> None:
        self.step += 1
        self.total_steps = schedule_length(pipe)
        self.cfg = bool(getattr(pipe, "do_classifier_free_guidance", False))
        self.stats["denoiser_calls"] += 1

    def end_denoiser_call(self) -> None:
        """Counted after the call, so an optimization that dropped the unconditional half (and cleared
        ``cfg``) is not counted as having evaluated it."""
        if self.cfg:
            self.stats["unconditional_evals"] += 1


def schedule_length(pipe) -> int:
    """Denoiser calls this run makes, from public API only: the pipeline's ``num_timesteps`` (set by diffusers'
    pipelines when the loop starts, after img2img strength and ``denoising_end`` trimmed the schedule), else the
    scheduler's timesteps from its ``begin_index`` on. 0 when neither is known."""
    try:
        n = pipe.num_timesteps
    except AttributeError:  # a pipeline without the property, or one that has not set it this call
        n = None
    if isinstance(n, int) and n > 0:
        return n
    scheduler = getattr(pipe, "scheduler", None)
    timesteps = getattr(scheduler, "timesteps", None)
    if timesteps is None or not hasattr(timesteps, "__len__"):
        return 0
    begin = getattr(scheduler, "begin_index", None)
    return max(0, len(timesteps) - (begin if isinstance(begin, int) else 0))
