#!/usr/bin/env python
"""diffspeed's deepcache against the DeepCache package (DeepCacheSDHelper) at equal settings, interleaved.

    python tools/compare_deepcache.py --sizes 128 256 --rounds 21 9 --threads 2 --note "nothing else running"

By default: the SD1.5-size UNet with random weights (``random:sd15``), Euler (one denoiser call per step and no
repeated timesteps, so the package's ``timesteps.index(t)`` finds the right step), 10 steps, interval 3, branch 0.
For each size, baseline / package / diffspeed run in one process on one pipeline, one after another in every
round, in an order that rotates each round, so drift in machine load hits all three alike; round 0 warms up.

Each is set up before and taken off after its timed call, outside the timed region: diffspeed as
``Accelerated(pipe, [DeepCacheConfig(...)])`` with its MAC accounting and its effect check on (the MACs are
counted afresh on each round's first full call, as on a freshly applied pipeline), the package with
``DeepCacheSDHelper.enable()`` / ``disable()``. Timed: the pipeline call with ``output_type="latent"`` (the VAE
decode is the same for all three), after a ``gc.collect()`` so that no run inherits another's garbage; wall and
process CPU seconds, minor page faults, and each UNet call's wall time (a hook pair on the UNet, the same for all
three).

Reports per size: medians and spread, speed-ups over the same run's baseline, diffspeed's time over the package's
(the median of the per-round ratios, their geometric mean with a 95% confidence interval, and the ratio of the
medians), the median full and cached UNet call, the theoretical speed-up from the MACs deepcache skipped, the
largest latent difference between diffspeed and the package, and the machine (CPU model, avx512_bf16 / AMX flags,
threads, load averages before and after each size: what else was running). After the rounds, one untimed call per
runner under torch's profiler counts the aten operators each ran (``--no-profile`` skips it): identical compute
operators mean a time difference is the machine's. On a noisy 2-core VM (±15 % per run) a few rounds mislead; 20 or
so give an interval of about ±5 %. Writes ``result.json`` and ``README.md`` to ``--out``.

On CPU, glibc's malloc by default gives large freed blocks back to the OS and page-faults them in again: about
460k minor faults (1.8 GB) per full SD1.5 UNet call on a 2-core EPYC VM, ~40% of a 128² call's CPU time on one
thread and a large source of noise. ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000`` (or a tcmalloc /
jemalloc preload) keeps them; the settings in effect are recorded.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import resource
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

RUNNERS = ("baseline", "package", "diffspeed")


def machine() -> dict:
    """CPU model, the instruction-set flags that matter for fp32 / bf16 matmuls, threads and versions."""
    from importlib.metadata import PackageNotFoundError, version

    from diffspeed.bench.runner import environment
    from diffspeed.hardware import detect_cpu

    cpu = detect_cpu()
    env = environment()
    try:
        env["DeepCache"] = version("DeepCache")
    except PackageNotFoundError:
        env["DeepCache"] = None
    return {**env, "cpu_model": cpu.name, "cpu_flags": list(cpu.flags), "cpu_capability": cpu.capability,
            "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "interop_threads": torch.get_num_interop_threads(),
            # glibc's malloc settings change CPU timings a lot: by default it hands large freed blocks back to the
            # OS and page-faults them in again on the next call
            "allocator_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k == "LD_PRELOAD"}}


ENGINE = "deepcache+openvino"


def runners(pipe, interval: int, branch: int, engine: str | None = None) -> dict:
    """Each runner: a context manager that sets it up and yields (call target, read its stats afterwards).
    ``engine="openvino"`` adds diffspeed's deepcache on OpenVINO-compiled blocks (``openvino.regional``)."""
    from diffspeed.bench.peers import deepcache_package
    from diffspeed.core import Accelerated
    from diffspeed.optim.deepcache import DeepCacheConfig

    config = DeepCacheConfig(interval=interval, branch=branch)
    peer = deepcache_package(interval, branch)

    @contextlib.contextmanager
    def baseline():
        yield pipe, dict

    @contextlib.contextmanager
    def package():
        disable = peer.enable(pipe)
        try:
            yield pipe, dict
        finally:
            disable()

    @contextlib.contextmanager
    def diffspeed():
        with Accelerated(pipe, [config]) as ours:  # strict: a call that cached nothing raises
            yield ours, lambda: dict(ours.stats)

    made = {"baseline": baseline, "package": package, "diffspeed": diffspeed}
    if engine == "openvino":
        from diffspeed.optim.openvino import OpenVINOConfig

        @contextlib.contextmanager
        def on_openvino():
            with Accelerated(pipe, [config, OpenVINOConfig(regional=True)]) as ours:
                yield ours, lambda: dict(ours.stats)

        made[ENGINE] = on_openvino
    return made


def measure(pipe, make: dict, size: int, steps: int, rounds: int, prompt: str, seed: int) -> dict:
    """Interleaved rounds at one size: per runner, wall / CPU seconds, UNet call times, latents, stats."""
    unet_calls: list[float] = []
    started = [0.0]
    hooks = [pipe.unet.register_forward_pre_hook(lambda *_: started.__setitem__(0, time.perf_counter())),
             pipe.unet.register_forward_hook(lambda *_: unet_calls.append(time.perf_counter() - started[0]))]
    gcs: dict[str, list[int]] = {name: [0, 0, 0] for name in make}
    current = [None]

    def count_gc(phase, info):
        if phase == "start" and current[0] is not None:
            gcs[current[0]][info["generation"]] += 1

    gc.callbacks.append(count_gc)
    out = {name: {"wall_s": [], "cpu_s": [], "minor_page_faults": [], "unet_call_s": [], "order": []} for name in make}
    latents, stats = {}, {}
    names = list(make)
    try:
        for r in range(rounds + 1):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                with make[name]() as (target, read_stats):
                    if name == ENGINE:  # untimed: export (first round) or load the compiled blocks per apply
                        target(prompt, num_inference_steps=steps, width=size, height=size,
                               generator=torch.Generator().manual_seed(seed), output_type="latent")
                    gc.collect()
                    unet_calls.clear()
                    current[0] = name if r else None
                    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                    wall, cpu = time.perf_counter(), time.process_time()
                    lat = target(prompt, num_inference_steps=steps, width=size, height=size,
                                 generator=torch.Generator().manual_seed(seed), output_type="latent").images
                    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
                    current[0] = None
                    stats[name] = read_stats()
                latents[name] = lat
                if r:
                    rec = out[name]
                    rec["wall_s"].append(wall)
                    rec["cpu_s"].append(cpu)
                    rec["minor_page_faults"].append(faults)
                    rec["unet_call_s"].append(list(unet_calls))
                    rec["order"].append(order.index(name))
            done = ", ".join(f"{k} {v['wall_s'][-1]:.2f}s" for k, v in out.items() if v["wall_s"])
            print(f"  {size}px round {r}{' (warm-up)' if not r else ''}: {done or 'done'}", flush=True)
    finally:
        gc.callbacks.remove(count_gc)
        for h in hooks:
            h.remove()
    for name in out:
        out[name]["gc_collections_by_generation"] = gcs[name]
    return {"runs": out, "latents": latents, "stats": stats}


def ratio_interval(ratios: list[float], level: float = 0.95) -> dict:
    """The geometric mean of per-round time ratios and its ``level`` confidence interval (Student's t on the
    logarithms: rounds are paired, so drift in machine load cancels within a round, not across them)."""
    from scipy import stats as st

    logs = [math.log(r) for r in ratios]
    mean = statistics.fmean(logs)
    if len(logs) < 2:
        return {"geometric_mean": math.exp(mean), "interval": None, "level": level, "rounds": len(logs)}
    half = st.t.ppf(0.5 + level / 2, len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs))
    return {"geometric_mean": math.exp(mean), "interval": [math.exp(mean - half), math.exp(mean + half)],
            "level": level, "rounds": len(logs)}


def op_counts(pipe, make: dict, size: int, steps: int, prompt: str, seed: int) -> dict:
    """One untimed call per runner under torch's profiler: how many times each aten operator ran. If two runners'
    counts agree, they did the same work and a time difference between them is the machine's, not the code's."""
    counts = {}
    for name in ("package", "diffspeed"):
        with make[name]() as (target, _):
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                target(prompt, num_inference_steps=steps, width=size, height=size,
                       generator=torch.Generator().manual_seed(seed), output_type="latent")
        counts[name] = {e.key: e.count for e in prof.key_averages() if e.key.startswith("aten::")}
    a, b = counts["package"], counts["diffspeed"]
    compute = ("conv", "addmm", "mm", "bmm", "attention", "linear", "matmul", "_norm", "gelu", "silu", "upsample")
    heavy = sorted(k for k in set(a) | set(b) if any(c in k for c in compute))
    return {"compute_ops_equal": all(a.get(k, 0) == b.get(k, 0) for k in heavy),
            "compute_ops": {k: [a.get(k, 0), b.get(k, 0)] for k in heavy},
            "other_ops_differing": {k: [a.get(k, 0), b.get(k, 0)] for k in sorted(set(a) | set(b))
                                    if k not in heavy and a.get(k, 0) != b.get(k, 0)}}


def summarise(runs: dict, latents: dict, stats: dict, full: set[int]) -> dict:
    med = {k: statistics.median(v["wall_s"]) for k, v in runs.items()}
    cpu = {k: statistics.median(v["cpu_s"]) for k, v in runs.items()}

    def calls(name, which):
        xs = [t for run in runs[name]["unet_call_s"] for i, t in enumerate(run) if (i in full) == which]
        return statistics.median(xs) if xs else None

    paired = [d / p for d, p in zip(runs["diffspeed"]["wall_s"], runs["package"]["wall_s"])]
    paired_cpu = [d / p for d, p in zip(runs["diffspeed"]["cpu_s"], runs["package"]["cpu_s"])]
    s = stats["diffspeed"]
    return {
        "median_wall_s": med, "median_cpu_s": cpu,
        "median_minor_page_faults": {k: statistics.median(v["minor_page_faults"]) for k, v in runs.items()},
        "spread_wall_s": {k: [min(v["wall_s"]), max(v["wall_s"])] for k, v in runs.items()},
        "speedup_over_baseline": {k: med["baseline"] / med[k] for k in ("package", "diffspeed")},
        "diffspeed_over_package_time": {
            "median_of_round_ratios": statistics.median(paired), "round_ratios": paired,
            "ratio_of_medians": med["diffspeed"] / med["package"],
            "cpu_median_of_round_ratios": statistics.median(paired_cpu),
            "paired": ratio_interval(paired)},
        "median_unet_call_s": {"baseline": statistics.median(t for run in runs["baseline"]["unet_call_s"] for t in run),
                               **{f"{k}_{w}": calls(k, w == "full") for k in ("package", "diffspeed")
                                  for w in ("full", "cached")}},
        "theoretical_speedup_from_macs": s["deepcache_total_macs"] / (s["deepcache_total_macs"]
                                                                      - s["deepcache_skipped_macs"]),
        "diffspeed_stats": s,
        "max_abs_latent_difference_diffspeed_vs_package": float((latents["diffspeed"] - latents["package"])
                                                                .abs().max()),
        **({"engine": {
            "speedup_over_baseline": med["baseline"] / med[ENGINE],
            "package_over_engine_time": {"median_of_round_ratios": statistics.median(
                p / e for p, e in zip(runs["package"]["wall_s"], runs[ENGINE]["wall_s"])),
                "ratio_of_medians": med["package"] / med[ENGINE]},
            "max_abs_latent_difference_vs_package": float((latents[ENGINE] - latents["package"]).abs().max())}}
           if ENGINE in runs else {}),
    }


def markdown(result: dict) -> str:
    st = result["settings"]
    env = result["machine"]
    lines = [f"# deepcache vs the DeepCache package: {st['model']}, {st['steps']} Euler steps, interval "
             f"{st['interval']}, branch {st['branch']}", "",
             f"`{result['command']}`", "",
             f"{env['cpu_model']} ({', '.join(env['cpu_flags']) or 'no avx512/amx flags'}); {env['threads']} torch "
             f"threads of {env['usable_cpus']} usable CPUs; torch {env['torch']}, diffusers {env['diffusers']}, "
             f"DeepCache {env['DeepCache']}, Python {env['python']}; allocator settings: "
             f"{env['allocator_env'] or 'glibc defaults'}.", "",
             "Interleaved in one process, the rounds given per size after a warm-up round, the order rotating each "
             "round; medians. diffspeed / package < 1: diffspeed is faster; the geometric mean of the per-round "
             "ratios comes with its 95% confidence interval (Student's t on their logarithms). Also running: "
             f"{st['note'] or 'not stated'}.", "",
             "| size | baseline s | package s | diffspeed s | package x | diffspeed x | diffspeed / package "
             "(median of rounds) | geometric mean [95% CI] | same, CPU time | full call ms (pkg / ds) | "
             "cached call ms (pkg / ds) | "
             "MAC bound x | max latent diff | page faults (pkg / ds) | load avg before / after |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for size, r in result["sizes"].items():
        m, c = r["median_wall_s"], r["median_unet_call_s"]
        ratio = r["diffspeed_over_package_time"]
        lines.append(
            f"| {size}² ({r['rounds']} rounds) | {m['baseline']:.2f} | {m['package']:.2f} | {m['diffspeed']:.2f} | "
            f"{r['speedup_over_baseline']['package']:.2f} | {r['speedup_over_baseline']['diffspeed']:.2f} | "
            f"{ratio['median_of_round_ratios']:.3f} | {_interval(ratio['paired'])} | "
            f"{ratio['cpu_median_of_round_ratios']:.3f} | "
            f"{1000 * c['package_full']:.0f} / {1000 * c['diffspeed_full']:.0f} | "
            f"{1000 * c['package_cached']:.1f} / {1000 * c['diffspeed_cached']:.1f} | "
            f"{r['theoretical_speedup_from_macs']:.2f} | {r['max_abs_latent_difference_diffspeed_vs_package']:.1e} | "
            f"{r['median_minor_page_faults']['package']:.0f} / {r['median_minor_page_faults']['diffspeed']:.0f} | "
            f"{r['load_average_before'][0]:.2f} / {r['load_average_after'][0]:.2f} |")
    for size, r in result["sizes"].items():
        ops = r.get("op_counts")
        if ops:
            heavy = ", ".join(f"{k.removeprefix('aten::')} {v[0]}" + ("" if v[0] == v[1] else f" / {v[1]}")
                              for k, v in ops["compute_ops"].items())
            other = ", ".join(f"{k.removeprefix('aten::')} {v[0]} / {v[1]}"
                              for k, v in ops["other_ops_differing"].items())
            lines += ["", f"{size}², one profiled call each (package / diffspeed): compute operators "
                      f"{'identical' if ops['compute_ops_equal'] else 'DIFFERENT'} ({heavy}); other operators "
                      f"that differ: {other or 'none'}."]
    for size, r in result["sizes"].items():
        if "engine" in r:
            e = r["engine"]
            pkg = e["package_over_engine_time"]
            lines += ["", f"{size}²: deepcache on OpenVINO-compiled blocks (`openvino.regional`, its first call of "
                      f"each apply untimed): {r['median_wall_s'][ENGINE]:.2f} s, {e['speedup_over_baseline']:.2f}x "
                      f"the baseline; the package alone takes {pkg['median_of_round_ratios']:.2f}x its time "
                      f"(median of rounds; ratio of medians {pkg['ratio_of_medians']:.2f}); max latent difference "
                      f"to the package {e['max_abs_latent_difference_vs_package']:.1e} (OpenVINO's own precision)."]
    lines += ["", "Each run's seconds, CPU seconds, UNet call times and garbage collections are in result.json.", ""]
    return "\n".join(lines)


def _interval(p: dict) -> str:
    if not p["interval"]:
        return f"{p['geometric_mean']:.3f}"
    lo, hi = p["interval"]
    return f"{p['geometric_mean']:.3f} [{lo:.3f}, {hi:.3f}]"


def main() -> None:
    from diffspeed.bench.runner import PROMPTS
    from diffspeed.bench.worker import load_pipeline
    from diffspeed.optim.deepcache import DeepCacheConfig, full_calls

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random:sd15")
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 256], help="image sides in pixels")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--interval", type=int, default=3)
    ap.add_argument("--branch", type=int, default=0)
    ap.add_argument("--rounds", type=int, nargs="+", default=[5],
                    help="timed rounds per size, after one warm-up round: one number for every size, or one per "
                         "--sizes entry")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    ap.add_argument("--engine", choices=["openvino"], default=None,
                    help="also run deepcache on OpenVINO-compiled blocks, interleaved with the others")
    ap.add_argument("--note", default="", help="what else ran on the machine meanwhile, for the report")
    ap.add_argument("--out", default=None, help="folder for result.json and README.md (default: "
                    "benchmarks/<model>-deepcache-vs-package; '-' writes nothing)")
    ap.add_argument("--no-profile", action="store_true",
                    help="skip the profiled call per runner that compares the operators each ran")
    args = ap.parse_args()
    if len(args.rounds) not in (1, len(args.sizes)) or min(args.rounds) < 1:
        ap.error(f"--rounds: give one count (>= 1) for every size or one per --sizes entry ({len(args.sizes)}), "
                 f"got {args.rounds}")
    rounds = dict(zip(args.sizes, args.rounds * len(args.sizes) if len(args.rounds) == 1 else args.rounds))
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = load_pipeline({"model": args.model, "device": "cpu", "sampler": "Euler"})
    prompt, seed = PROMPTS[0]
    make = runners(pipe, args.interval, args.branch, args.engine)
    full = full_calls(args.steps, DeepCacheConfig(interval=args.interval, branch=args.branch))
    result = {"command": shlex.join(["python", *sys.argv]),
              "machine": machine(), "settings": vars(args), "sizes": {}}
    for size in args.sizes:
        before = os.getloadavg()
        m = measure(pipe, make, size, args.steps, rounds[size], prompt, seed)
        summary = summarise(m["runs"], m["latents"], m["stats"], full)
        if not args.no_profile:
            summary["op_counts"] = op_counts(pipe, make, size, args.steps, prompt, seed)
        result["sizes"][str(size)] = {**summary, "rounds": rounds[size], "load_average_before": before,
                                      "load_average_after": os.getloadavg(),
                                      "runs": m["runs"]}
        print(json.dumps({k: v for k, v in summary.items() if k != "diffspeed_stats"}, indent=2), flush=True)
    if args.out != "-":
        slug = args.model.replace(":", "-").replace("/", "-")
        folder = Path(args.out) if args.out else ROOT / "benchmarks" / f"{slug}-deepcache-vs-package"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "result.json").write_text(json.dumps(result, indent=2) + "\n")
        (folder / "README.md").write_text(markdown(result))
        print(f"wrote {folder}/result.json and README.md")


if __name__ == "__main__":
    main()
