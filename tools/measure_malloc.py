#!/usr/bin/env python
"""glibc's malloc settings and CPU inference speed: default vs memory kept, interleaved worker processes.

    python tools/measure_malloc.py --size 128 --rounds 4 --threads 2 --note "nothing else running"

glibc reads ``MALLOC_*`` variables once, when a process starts, so each setting runs in its own worker process.
By default glibc hands large freed blocks (above a threshold that starts at 128 KiB) back to the OS with
``munmap`` and page-faults fresh ones in on the next allocation; a full SD1.5-size UNet call allocates and frees
GBs of activations, so a CPU generation takes millions of minor page faults. ``MALLOC_MMAP_MAX_=0
MALLOC_TRIM_THRESHOLD_=100000000000`` ("kept") serves every block from the heap and never trims it: freed memory is
reused without faults, at the price of keeping the peak.

Each round runs one worker per setting, in an order that rotates each round, alone; a worker builds the pipeline
(``random:sd15`` by default), warms up with one generation, then times ``--calls`` generations of each runner
(plain pipeline, and diffspeed's ``deepcache`` at interval 3), recording wall and CPU seconds, minor page faults
and the worker's peak RSS. Reports per setting and runner: the median seconds per image, the speed-up of "kept"
over "default" (median of the per-round ratios, rounds being paired in time), page faults per image and peak RSS.
Writes ``result.json`` and ``README.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"default": {}, "kept": {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "100000000000"}}
RUNNERS = ("baseline", "deepcache")


def worker(model: str, size: int, steps: int, calls: int, threads: int | None) -> dict:
    """In the worker process: build, warm up, time each runner ``calls`` times; returns the measurements."""
    import gc
    import resource
    import time

    import torch

    sys.path.insert(0, str(ROOT / "src"))
    from diffspeed.bench.runner import PROMPTS
    from diffspeed.bench.worker import load_pipeline
    from diffspeed.core import Accelerated
    from diffspeed.optim.deepcache import DeepCacheConfig

    if threads:
        torch.set_num_threads(threads)
    pipe = load_pipeline({"model": model, "device": "cpu", "sampler": "Euler"})
    prompt, seed = PROMPTS[0]

    def generate(target):
        return target(prompt, num_inference_steps=steps, width=size, height=size,
                      generator=torch.Generator().manual_seed(seed), output_type="latent").images

    out = {}
    generate(pipe)  # warm-up: first-call allocations and one-off initialisation
    for name in RUNNERS:
        rec = {"wall_s": [], "cpu_s": [], "minor_page_faults": []}
        with Accelerated(pipe, [DeepCacheConfig(interval=3)]) if name == "deepcache" else nullcontext(pipe) as target:
            for _ in range(calls):
                gc.collect()
                faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                wall, cpu = time.perf_counter(), time.process_time()
                generate(target)
                rec["wall_s"].append(time.perf_counter() - wall)
                rec["cpu_s"].append(time.process_time() - cpu)
                rec["minor_page_faults"].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
        out[name] = rec
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def run_worker(setting: str, args) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(SETTINGS[setting])
    cmd = [sys.executable, __file__, "--worker", "--model", args.model, "--size", str(args.size), "--steps",
           str(args.steps), "--calls", str(args.calls)] + (["--threads", str(args.threads)] if args.threads else [])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"the {setting} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine() -> dict:
    """CPU model, flags and ISA level (as the bench records them), usable CPUs, libc and versions."""
    sys.path.insert(0, str(ROOT / "src"))
    from diffspeed.bench.runner import environment
    from diffspeed.hardware import detect_cpu

    cpu = detect_cpu()
    return {**environment(), "cpu_model": cpu.name, "cpu_flags": list(cpu.flags), "cpu_capability": cpu.capability,
            "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "libc": " ".join(platform.libc_ver())}


def summarise(rounds: list[dict]) -> dict:
    out = {}
    for name in RUNNERS:
        per = {s: [statistics.median(r[s][name]["wall_s"]) for r in rounds] for s in SETTINGS}
        ratios = [d / k for d, k in zip(per["default"], per["kept"])]
        out[name] = {
            "median_s_per_image": {s: statistics.median(v) for s, v in per.items()},
            "kept_speedup": {"median_of_round_ratios": statistics.median(ratios), "round_ratios": ratios},
            "median_cpu_s_per_image": {s: statistics.median(x for r in rounds for x in r[s][name]["cpu_s"])
                                       for s in SETTINGS},
            "median_minor_page_faults_per_image": {
                s: statistics.median(x for r in rounds for x in r[s][name]["minor_page_faults"]) for s in SETTINGS}}
    out["peak_rss_mb"] = {s: statistics.median(r[s]["peak_rss_mb"] for r in rounds) for s in SETTINGS}
    return out


def markdown(result: dict) -> str:
    st, env, s = result["settings"], result["machine"], result["summary"]
    lines = [f"# glibc malloc: default vs memory kept -- {st['model']} {st['size']}², {st['steps']} Euler steps",
             "", f"`{result['command']}`", "",
             f"{env['cpu_model']} ({', '.join(env['cpu_flags']) or 'no avx512/amx'}), {env['usable_cpus']} usable "
             f"CPUs, {st['threads'] or 'default'} torch threads; {env['libc']}; torch {env['torch']}, diffusers "
             f"{env['diffusers']}, Python {env['python']}.", "",
             f"{st['rounds']} rounds; in each, one worker process per setting (order rotating), alone, each timing "
             f"{st['calls']} generations per runner after a warm-up generation; medians. \"kept\": "
             "`MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000`. Also running: "
             f"{st['note'] or 'not stated'}.", "",
             "| runner | default s/image | kept s/image | kept speed-up (median of rounds) | per round | "
             "page faults / image (default / kept) | CPU s / image (default / kept) |",
             "|---|---|---|---|---|---|---|"]
    for name in RUNNERS:
        r = s[name]
        m, f, c = r["median_s_per_image"], r["median_minor_page_faults_per_image"], r["median_cpu_s_per_image"]
        speedup = r["kept_speedup"]["median_of_round_ratios"]
        lines.append(f"| {name} | {m['default']:.2f} | {m['kept']:.2f} | {speedup:.2f}x"
                     f" | {', '.join(f'{x:.2f}' for x in r['kept_speedup']['round_ratios'])} | "
                     f"{f['default']:.0f} / {f['kept']:.0f} | {c['default']:.1f} / {c['kept']:.1f} |")
    p = s["peak_rss_mb"]
    lines += ["", "Peak RSS of a worker (pipeline, warm-up and every timed generation): "
              f"default {p['default']:.0f} MB, kept {p['kept']:.0f} MB ({p['kept'] / p['default']:.2f}x).", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random:sd15")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--calls", type=int, default=2, help="timed generations per runner in each worker")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--note", default="", help="what else ran on the machine meanwhile, for the report")
    ap.add_argument("--out", default=None, help="folder for result.json and README.md ('-' writes nothing)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    for field in ("size", "steps", "calls", "rounds"):
        if getattr(args, field) < 1:
            ap.error(f"--{field} must be at least 1, got {getattr(args, field)}")
    if args.worker:
        print(json.dumps(worker(args.model, args.size, args.steps, args.calls, args.threads)))
        return
    names = list(SETTINGS)
    rounds = []
    for r in range(args.rounds):
        order = names[r % 2:] + names[:r % 2]
        rounds.append({s: run_worker(s, args) for s in order})
        print(f"round {r + 1}: " + ", ".join(f"{s} {n} {statistics.median(rounds[-1][s][n]['wall_s']):.2f}s"
                                              for s in names for n in RUNNERS), flush=True)
    settings = {k: v for k, v in vars(args).items() if k != "worker"}
    result = {"command": shlex.join(["python", *sys.argv]), "machine": machine(), "settings": settings,
              "summary": summarise(rounds), "rounds": rounds}
    print(json.dumps(result["summary"], indent=2))
    if args.out != "-":
        slug = f"malloc-{args.model.replace(':', '-').replace('/', '-')}-{args.size}"
        folder = Path(args.out) if args.out else ROOT / "benchmarks" / slug
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "result.json").write_text(json.dumps(result, indent=2) + "\n")
        (folder / "README.md").write_text(markdown(result))
        print(f"wrote {folder}/result.json and README.md")


if __name__ == "__main__":
    main()
