"""Time model switches (tiny-sd <-> tiny-sdxl) with and without a ModelCache.

A switch is one ``diffspeed.load`` of the other model, the previous pipeline dropped first, as a server
that changes models per request would do. Both modes are warmed up first (imports, the OS file cache, the
cache's first loads), so the numbers compare a disk/format load against a copy from RAM.

    nice -n 19 python tools/measure_cache_switch.py --switches 10
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import time

import torch

MODELS = ("tiny-sd", "tiny-sdxl")


def _switches(load, count: int) -> list[float]:
    seconds, current = [], []
    for i in range(count):
        current.clear()  # the server drops its pipeline before loading the next
        gc.collect()
        start = time.perf_counter()
        current.append(load(MODELS[i % 2]))
        seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--switches", type=int, default=10, help="timed loads per mode, alternating models")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import diffusers

    import diffspeed
    from diffspeed.pipelines.cache import ModelCache

    def cold(name):
        return diffspeed.load(name, device=args.device)

    cache = ModelCache(max_models=2)

    def cached(name):
        return diffspeed.load(name, device=args.device, cache=cache)

    _switches(cold, 2)  # warm-up: imports and the OS file cache
    _switches(cached, 2)  # the cache's two misses
    without = _switches(cold, args.switches)
    with_cache = _switches(cached, args.switches)

    print(f"diffspeed model switch, {'/'.join(MODELS)} alternating, {args.switches} switches per mode, "
          f"device {args.device}, {args.threads} torch thread(s)")
    print(f"env: python {platform.python_version()}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
          f"{os.cpu_count()} CPUs, {platform.machine()}")
    for label, seconds in (("no cache", without), ("ModelCache", with_cache)):
        print(f"{label:>10}: mean {statistics.mean(seconds):.3f} s/switch, median {statistics.median(seconds):.3f}, "
              f"min {min(seconds):.3f}, max {max(seconds):.3f}")
    print(f"ratio (no cache / cache, means): {statistics.mean(without) / statistics.mean(with_cache):.2f}x")
    print(f"cache: {cache.stats}")


if __name__ == "__main__":
    main()
