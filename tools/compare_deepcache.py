#!/usr/bin/env python
"""diffspeed's deepcache against the DeepCache package (DeepCacheSDHelper) at the same settings, interleaved.

    python tools/compare_deepcache.py --model random:sd15 --size 256 --steps 10 --repeats 5

Both run in one process on one pipeline, alternating baseline / diffspeed / package each round (in a
rotating order) so that drift in machine load hits all three alike; the UNet loop alone is timed
(``output_type="latent"``: the VAE decode is the same for all three). Reports each median, the ratios,
the theoretical speed-up from the MACs deepcache skipped, and the largest difference between the two
implementations' latents.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def main() -> None:
    from diffspeed.bench.peers import deepcache_package
    from diffspeed.bench.runner import PROMPTS, environment
    from diffspeed.core import Accelerated
    from diffspeed.optim.deepcache import DeepCacheConfig
    from diffspeed.pipelines.samplers import get_sampler

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random:sd15")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--interval", type=int, default=3)
    ap.add_argument("--branch", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="write the numbers as JSON here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model.startswith("random:"):
        from diffspeed.bench.models import random_pipeline

        pipe = random_pipeline(args.model.split(":", 1)[1])
    else:
        from diffspeed.pipelines.load import load

        pipe = load(args.model, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = get_sampler("Euler").build(pipe.scheduler.config)  # no repeated timesteps: fair to both
    prompt, seed = PROMPTS[0]

    def call(runner):
        t0 = time.perf_counter()
        out = runner(prompt, num_inference_steps=args.steps, width=args.size, height=args.size,
                     generator=torch.Generator().manual_seed(seed), output_type="latent").images
        return time.perf_counter() - t0, out

    config = DeepCacheConfig(interval=args.interval, branch=args.branch)
    peer = deepcache_package(args.interval, args.branch)
    times = {"baseline": [], "diffspeed": [], "package": []}
    latents = {}
    names = list(times)
    for r in range(args.repeats + 1):  # round 0 warms up; the order rotates so no one always goes first
        for name in names[r % 3:] + names[:r % 3]:
            if name == "package":
                disable = peer.enable(pipe)
                try:
                    t, lat = call(pipe)
                finally:
                    disable()
            elif name == "diffspeed":  # applied and removed each round, as the package is
                with Accelerated(pipe, [config]) as ours:
                    t, lat = call(ours)
                    stats = dict(ours.stats)
            else:
                t, lat = call(pipe)
            if r:
                times[name].append(t)
            latents[name] = lat
        print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items() if v), flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    theory = stats["deepcache_total_macs"] / (stats["deepcache_total_macs"] - stats["deepcache_skipped_macs"])
    result = {"command": " ".join(sys.argv), "environment": environment(), "settings": vars(args),
              "seconds": times, "median_s": med,
              "speedup_diffspeed": med["baseline"] / med["diffspeed"],
              "speedup_package": med["baseline"] / med["package"],
              "diffspeed_vs_package": med["package"] / med["diffspeed"],
              "theoretical_speedup_from_macs": theory, "stats": stats,
              "max_abs_latent_difference": float((latents["diffspeed"] - latents["package"]).abs().max())}
    print(json.dumps({k: v for k, v in result.items() if k not in ("environment", "seconds")}, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
