"""Peers: other projects' implementations of the same tricks, benchmarked in the same run as diffspeed's.

A peer is a name plus ``enable(pipe) -> disable``; it runs only when its package is installed (``pip install
'diffspeed[peers]'``) and, for the CUDA-only ones, on a CUDA device; otherwise it is reported as skipped. Their
code is used as published, through their public entry points. ``PEERS`` maps each peer's key (what a bench
entry names) to a factory taking the peer's settings, so a bench worker in another process can rebuild it.
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
    key: str = ""  # the PEERS key that rebuilds it
    cuda_only: bool = False

    def missing(self, device: str = "cpu") -> str | None:
        if importlib.util.find_spec(self.package) is None:
            return f"peer package {self.package!r} is not installed (pip install 'diffspeed[peers]')"
        if self.cuda_only and not str(device).startswith("cuda"):
            return f"{self.name} needs a CUDA device"
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
                {"interval": interval, "branch": branch}, "deepcache_package")


def tomesd_package(ratio: float = 0.5) -> Peer:
    """``tomesd.apply_patch`` (Bolya and Hoffman 2023) at the same merge ratio."""

    def enable(pipe):
        import tomesd

        tomesd.apply_patch(pipe, ratio=ratio)
        return lambda: tomesd.remove_patch(pipe)

    return Peer(f"tomesd ratio {ratio}", "tomesd", enable, {"ratio": ratio}, "tomesd_package")


# each plain diffusers switch: (on the pipeline or its VAE, the call, the call that turns it off; None: no undo,
# the bench worker's process ends with it). diffusers 0.42 keeps VAE slicing/tiling on the VAE itself.
_DIFFUSERS = {
    "enable_attention_slicing": ("pipe", "enable_attention_slicing", "disable_attention_slicing"),
    "enable_vae_slicing": ("vae", "enable_slicing", "disable_slicing"),
    "enable_vae_tiling": ("vae", "enable_tiling", "disable_tiling"),
    "enable_freeu": ("pipe", "enable_freeu", "disable_freeu"),
    "enable_model_cpu_offload": ("pipe", "enable_model_cpu_offload", None),
    "enable_sequential_cpu_offload": ("pipe", "enable_sequential_cpu_offload", None),
}
_CUDA_ONLY = {"enable_model_cpu_offload", "enable_sequential_cpu_offload"}


def diffusers_switch(method: str, **kwargs) -> Peer:
    """One of diffusers' own ``enable_*`` calls (the diffusers "memory and speed" page, seed 003)."""
    if method not in _DIFFUSERS:
        raise ValueError(f"diffusers_switch: {method!r} is not one of {', '.join(_DIFFUSERS)}")
    where, on, off = _DIFFUSERS[method]

    def enable(pipe):
        call = dict(kwargs)
        if method == "enable_freeu" and not call:  # the family's published values, as diffspeed's freeu uses
            from diffspeed.adapters import adapter_for

            call = dict(adapter_for(pipe).freeu)
        target = pipe.vae if where == "vae" else pipe
        getattr(target, on)(**call)
        return (lambda: getattr(target, off)()) if off else (lambda: None)

    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    label = f"pipe.vae.{on}({args})" if where == "vae" else f"pipe.{on}({args})"
    return Peer(f"diffusers {label}", "diffusers", enable, {"method": method, **kwargs},
                "diffusers_switch", cuda_only=method in _CUDA_ONLY)


def diffusers_compile(mode: str = "reduce-overhead", fullgraph: bool = True) -> Peer:
    """The diffusers docs' recipe: ``pipe.unet = torch.compile(pipe.unet, mode=..., fullgraph=...)`` (CUDA)."""

    def enable(pipe):
        import torch

        original = pipe.unet
        pipe.unet = torch.compile(original, mode=mode, fullgraph=fullgraph)

        def disable():
            pipe.unet = original

        return disable

    return Peer(f"diffusers torch.compile(unet, mode={mode})", "torch", enable,
                {"mode": mode, "fullgraph": fullgraph}, "diffusers_compile", cuda_only=True)


PEERS: dict[str, Callable[..., Peer]] = {"deepcache_package": deepcache_package, "tomesd_package": tomesd_package,
                                         "diffusers_switch": diffusers_switch, "diffusers_compile": diffusers_compile}


def build_peer(key: str, settings: dict) -> Peer:
    if key not in PEERS:
        raise ValueError(f"unknown peer {key!r}; known: {', '.join(PEERS)}")
    return PEERS[key](**settings)


def default_peers() -> list[Peer]:
    """What the bench compares with when nothing else is asked: each package at diffspeed's defaults, and the
    diffusers switches that have a diffspeed counterpart (slicing, tiling, FreeU, offload, compile)."""
    return [deepcache_package(3, 0), tomesd_package(0.5),
            # "max": one head at a time; the default "auto" divides by zero on models with one-head levels
            diffusers_switch("enable_attention_slicing", slice_size="max"), diffusers_switch("enable_vae_slicing"),
            diffusers_switch("enable_vae_tiling"),
            diffusers_switch("enable_freeu"),
            diffusers_switch("enable_model_cpu_offload"), diffusers_compile()]
