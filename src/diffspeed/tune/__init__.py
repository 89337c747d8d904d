"""``diffspeed tune``: search the registry's optimizations for the fastest recipe on your model and machine that fits
a memory budget and a fidelity floor, measured with the bench (a fresh process per candidate).

``diffspeed.tune(model, ...)`` is :func:`diffspeed.tune.run.tune` (the package itself is callable, as
``diffspeed.bench`` is); it returns a :class:`~diffspeed.tune.run.TuneResult` (the front, the choice, every
measurement) and writes ``tuned.toml``, ``results.json``, ``report.md`` / ``report.html`` and the resumable log
``measurements.jsonl``. Modules: ``options`` (validated settings, no torch), ``space`` (what is searched, pruning),
``estimate`` (memory before measuring), ``search`` (the strategy, budget and log), ``measure`` (the bench
adapter), ``report``, ``run``.
"""

import sys
import types


def tune(model: str = "tiny-sd", **kwargs):
    """See :func:`diffspeed.tune.run.tune`."""
    from diffspeed.tune.run import tune as run

    return run(model, **kwargs)


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return tune(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
