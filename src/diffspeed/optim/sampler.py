"""sampler: pick the sampler by its web-UI name and the step count (seed 002: DPM++ 2M Karras / UniPC at
fewer steps). The scheduler keeps the model's training schedule; remove() puts the original object back."""

from __future__ import annotations

import dataclasses

from diffspeed.core import Edits, OptConfig, Optimization, RunState, param, register
from diffspeed.pipelines.samplers import SAMPLERS, get_sampler


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplerConfig(OptConfig):
    name = "sampler"
    sampler: str | None = param(None, "web-UI sampler name; None keeps the pipeline's scheduler",
                                choices=tuple(SAMPLERS), kind=str)
    steps: int | None = param(None, "default number of steps when the call does not give one", range=(1, 1000),
                              kind=int)


@register
class Sampler(Optimization):
    Config = SamplerConfig
    summary = "swap the sampler (web-UI names) and set a default step count"
    noop = {}
    example = {"sampler": "DPM++ 2M Karras", "steps": 12}

    def _apply(self, pipe, state: RunState, edits: Edits) -> None:
        if self.config.sampler is not None:
            edits.set_attr(pipe, "scheduler", get_sampler(self.config.sampler).build(pipe.scheduler.config))
        self.changes = {"call defaults": int(self.config.steps is not None)}

    def wrap_call(self, call):
        steps = self.config.steps
        if steps is None:
            return call

        def with_steps(*args, **kwargs):
            kwargs.setdefault("num_inference_steps", steps)
            return call(*args, **kwargs)

        return with_steps
