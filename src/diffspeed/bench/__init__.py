"""Benchmarks: ``diffspeed.bench(model, ...)`` is :func:`diffspeed.bench.runner.bench`.

The package itself is callable so that ``diffspeed.bench(...)`` reads as the command line does, while its
modules (``runner``, ``worker``, ``report``, ``metrics``, ``queue``, ``peers``, ``memory``, ``models``) stay
importable by their dotted names.
"""

import sys
import types


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from diffspeed.bench.runner import bench

        return bench(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
