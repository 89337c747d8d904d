"""Planted optimizations for the bench tests, imported by each bench worker process (``plugins=[this file]``).

``test_sleep`` makes every UNet call slower by a fixed pause and counts the pauses into the call's stats
(``test_sleep_calls``), so a test can check what the bench recorded about the planted work instead of comparing
two entries' wall clocks; ``test_fail`` raises on a chosen UNet call, i.e. mid-run. Both attach through the
core's recorded hooks, like any real optimization.
"""

import dataclasses
import time

from diffspeed.core import OptConfig, Optimization, param, register


@dataclasses.dataclass(frozen=True, kw_only=True)
class SleepConfig(OptConfig):
    name = "test_sleep"
    seconds: float = param(0.1, "pause before every UNet call", range=(0.0, 5.0), kind=float)


@register
class Sleep(Optimization):
    Config = SleepConfig
    summary = "planted: slower on purpose"

    def _apply(self, pipe, state, edits):
        def pause(*_):
            time.sleep(self.config.seconds)  # sleeps at least this long: a lower bound the timing must include
            state.stats["test_sleep_calls"] += 1

        edits.forward_pre_hook(pipe.unet, pause)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FailConfig(OptConfig):
    name = "test_fail"
    at_call: int = param(5, "UNet call (counted from 1 over the whole process) that raises", range=(1, 10_000))


@register
class Fail(Optimization):
    Config = FailConfig
    summary = "planted: fails mid-run"

    def _apply(self, pipe, state, edits):
        calls = [0]

        def hook(*_):
            calls[0] += 1
            if calls[0] == self.config.at_call:
                raise RuntimeError(f"planted failure at UNet call {calls[0]}")

        edits.forward_pre_hook(pipe.unet, hook)
