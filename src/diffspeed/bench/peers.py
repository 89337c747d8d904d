"""Peers: other projects' implementations of the same tricks, benchmarked in the same run as diffspeed's.

A peer is a name plus ``enable(pipe) -> disable``; it runs only when its package is installed (``pip install
'diffspeed[peers]'``) and is reported as skipped otherwise. Their code is used as published, through their
public entry points.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Peer:
    name: str
    package: str  # the import name that must be installed
    enable: Callable  # enable(pipe) -> disable()
    settings: dict = field(default_factory=dict)

    def missing(self) -> str | None:
        if importlib.util.find_spec(self.package) is None:
            return f"peer package {self.package!r} is not installed (pip install 'diffspeed[peers]')"
        return None


def deepcache_package(interval: int = 3, branch: int = 0) -> Peer:
    """The DeepCache authors' ``DeepCacheSDHelper`` (pip ``DeepCache``) at the same interval and branch."""

    def enable(pipe):
        from DeepCache import DeepCacheSDHelper

        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=interval, cache_branch_id=branch)
        helper.enable()
        return helper.disable

    return Peer(f"DeepCache package interval {interval} branch {branch}", "DeepCache", enable,
                {"cache_interval": interval, "cache_branch_id": branch})


def tomesd_package(ratio: float = 0.5) -> Peer:
    """``tomesd.apply_patch`` (Bolya and Hoffman 2023) at the same merge ratio."""

    def enable(pipe):
        import tomesd

        tomesd.apply_patch(pipe, ratio=ratio)
        return lambda: tomesd.remove_patch(pipe)

    return Peer(f"tomesd ratio {ratio}", "tomesd", enable, {"ratio": ratio})
