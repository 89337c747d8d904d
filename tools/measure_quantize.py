"""Measure quantize's methods: weight bytes, peak RAM while generating, speed and fidelity against fp32.

Two sections, each with the baseline and quantize's fp8, fp8_e5m2, int8_weight_only and int8_dynamic on the UNet:

- pipeline (default tiny-sd, the shipped trained model): whole generations (4 prompts, 20 Euler steps, CFG 7.5,
  the fidelity test's setting): seconds per image, and PSNR / SSIM of the images against the baseline's.
- unet (default random:sd15, the SD 1.5 architecture with random weights): UNet calls at 256x256 (latents
  4x32x32, batch 2 as under CFG): seconds per call, and the output's drift from the baseline's (relative RMS,
  max |diff|) -- random weights make images noise, so no PSNR.

Speed: every round runs every method once, in alternating order, and applies/removes the method outside the
timed part; "baseline again" measures the noise. Ratios are medians over rounds against the same run's baseline.
Memory: each method runs in its own fresh process (the peak of one does not hide another's): load, apply
(``originals="disk"``, so the quantized weights are what stays in RAM), then one generation of the section's
size while the kernel's peak-RSS counter (``VmHWM``) is watched by :class:`diffspeed.bench.memory.MemoryMonitor`.
Weight bytes: :func:`diffspeed.optim.quantize.weight_bytes` after applying; for the SD 1.5 UNet also computed
exactly from its config on the meta device (no memory), as a cross-check.

Run it alone on the machine (the numbers are ratios against the same run's baseline, but a busy machine
spreads them):

    OMP_NUM_THREADS=2 python tools/measure_quantize.py --threads 2 --out benchmarks/quantize   # the full run
    python tools/measure_quantize.py --quick --out /tmp/measure-quantize                        # checks the script
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

METHODS = ("baseline", "fp8", "fp8_e5m2", "int8_weight_only", "int8_dynamic")
PROMPTS = ["a red circle at top left and a yellow star at center on a blue background",
           "a green square at bottom right on a white background",
           "a purple triangle at top on a yellow background",
           "a white star at left on a black background"]
FULL = {"prompts": 4, "steps": 20, "rounds": 5, "size": 256, "calls": 3, "unet_rounds": 3, "memory_steps": 4}
QUICK = {"prompts": 1, "steps": 4, "rounds": 1, "size": 64, "calls": 1, "unet_rounds": 1, "memory_steps": 1}
MB = 1e6


def _load(model: str):
    import torch

    if model.startswith("random:"):
        from diffspeed.bench.models import random_pipeline

        pipe = random_pipeline(model.removeprefix("random:"))
    else:
        from diffspeed.pipelines.load import load

        pipe = load(model, device="cpu")
    from diffusers import EulerDiscreteScheduler

    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(0)
    return pipe


def _quantize(pipe, method: str, **fields):
    """The method applied (None for the baseline); ``.remove()`` undoes it."""
    if method in ("baseline", "baseline again"):
        return None
    from diffspeed.core import RunState
    from diffspeed.optim.quantize import Quantize

    return Quantize(method=method, **fields).apply(pipe, RunState())


def _generate(pipe, prompts: int, steps: int, size: int | None = None):
    import torch

    kw = {"width": size, "height": size} if size else {}
    return pipe(PROMPTS[:prompts], num_inference_steps=steps, guidance_scale=7.5, output_type="np",
                generator=[torch.Generator().manual_seed(i) for i in range(prompts)], **kw).images


def _unet_inputs(unet, size: int):
    import torch

    g = torch.Generator().manual_seed(0)
    latent = size // 8
    sample = torch.randn(2, unet.config.in_channels, latent, latent, generator=g)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    return sample, torch.tensor([500.0]), text


def _order(r: int, methods: list[str]) -> list[str]:
    return methods if r % 2 == 0 else methods[::-1]


# ----------------------------------------------------------------------------------------- speed, fidelity
def pipeline_section(model: str, s: dict) -> dict:
    from diffspeed.metrics import psnr, ssim
    from diffspeed.optim.quantize import weight_bytes

    pipe = _load(model)
    methods = [*METHODS, "baseline again"]
    seconds: dict[str, list[float]] = {m: [] for m in methods}
    images, info = {}, {}
    for r in range(s["rounds"]):
        for m in _order(r, methods):
            opt = _quantize(pipe, m)
            try:
                info.setdefault(m, {"unet_weight_bytes": weight_bytes(pipe.unet),
                                    "layers": (opt.effect().get("layers quantized", 0) if opt else 0)})
                t0 = time.perf_counter()
                out = _generate(pipe, s["prompts"], s["steps"])
                seconds[m].append((time.perf_counter() - t0) / s["prompts"])
                images.setdefault(m, out)
            finally:
                if opt is not None:
                    opt.remove()
    base = images["baseline"]
    rows = {}
    for m in methods:
        rows[m] = {**info[m], **_speed(seconds[m], seconds["baseline"]), "seconds_per_image": seconds[m],
                   "psnr_db": None if m.startswith("baseline") else round(psnr(images[m], base), 2),
                   "ssim": None if m.startswith("baseline") else round(ssim(images[m], base), 4)}
    return {"model": model, "unit": "image", "rows": rows,
            "setting": f"{s['prompts']} prompts x {s['steps']} Euler steps, CFG 7.5, native size, "
                       f"{s['rounds']} interleaved rounds"}


def unet_section(model: str, s: dict) -> dict:
    import torch

    from diffspeed.optim.quantize import weight_bytes

    pipe = _load(model)
    unet = pipe.unet
    sample, t, text = _unet_inputs(unet, s["size"])
    methods = [*METHODS, "baseline again"]
    seconds: dict[str, list[float]] = {m: [] for m in methods}
    outputs, info = {}, {}
    with torch.no_grad():
        for r in range(s["unet_rounds"]):
            for m in _order(r, methods):
                opt = _quantize(pipe, m)
                try:
                    info.setdefault(m, {"unet_weight_bytes": weight_bytes(unet),
                                        "layers": (opt.effect().get("layers quantized", 0) if opt else 0)})
                    unet(sample, t, encoder_hidden_states=text)  # warm-up (first call of this application)
                    t0 = time.perf_counter()
                    for _ in range(s["calls"]):
                        out = unet(sample, t, encoder_hidden_states=text).sample
                    seconds[m].append((time.perf_counter() - t0) / s["calls"])
                    outputs.setdefault(m, out)
                finally:
                    if opt is not None:
                        opt.remove()
    base = outputs["baseline"]
    rows = {}
    for m in methods:
        diff = (outputs[m] - base).float()
        rows[m] = {**info[m], **_speed(seconds[m], seconds["baseline"]), "seconds_per_call": seconds[m],
                   "relative_rms_drift": float(diff.pow(2).mean().sqrt() / base.float().pow(2).mean().sqrt()),
                   "max_abs_drift": float(diff.abs().max())}
    return {"model": model, "unit": "UNet call", "rows": rows,
            "setting": f"UNet calls at {s['size']}x{s['size']} (batch 2), {s['calls']} timed calls after 1 warm-up "
                       f"per method and round, {s['unet_rounds']} interleaved rounds"}


def _speed(times: list[float], base: list[float]) -> dict:
    """Median seconds, their spread, and the speed-up (> 1: faster) as the median of per-round ratios."""
    ratios = [b / t for b, t in zip(base, times)]
    return {"median_s": round(statistics.median(times), 4), "spread_s": round(max(times) - min(times), 4),
            "speed_vs_baseline": round(statistics.median(ratios), 3)}


# ------------------------------------------------------------------------------------------------- memory
def memory_child(spec: dict) -> dict:
    """Run in a fresh process: load, apply (originals on disk), generate once; RSS numbers in bytes."""
    import torch

    from diffspeed.bench.memory import MemoryMonitor, rss_bytes
    from diffspeed.optim.quantize import weight_bytes

    torch.set_num_threads(spec["threads"])
    pipe = _load(spec["model"])
    loaded = rss_bytes()
    opt = _quantize(pipe, spec["method"], originals="disk", spill_dir=spec["spill_dir"])
    gc.collect()
    applied = rss_bytes()
    with MemoryMonitor() as mon:
        _generate(pipe, 1, spec["steps"], spec["size"])
    out = {"rss_loaded": loaded, "rss_applied": applied, "generation_peak": mon.peak, "method_used": mon.method,
           "unet_weight_bytes": weight_bytes(pipe.unet)}
    if opt is not None:
        opt.remove()
    return out


def memory(model: str, size: int | None, steps: int, threads: int, spill_dir: str | None) -> dict:
    rows = {}
    for m in METHODS:
        spec = {"model": model, "method": m, "size": size, "steps": steps, "threads": threads,
                "spill_dir": spill_dir}
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                              text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"memory child {model} {m} failed:\n{proc.stderr[-3000:]}")
        rows[m] = json.loads(proc.stdout.strip().splitlines()[-1])
    base = rows["baseline"]["generation_peak"]
    for r in rows.values():
        r["peak_vs_baseline"] = round(r["generation_peak"] / base, 3)
    return {"setting": f"one fresh process per method: 1 prompt x {steps} Euler steps at "
                       f"{f'{size}x{size}' if size else 'native size'}, originals on disk "
                       f"({spill_dir or tempfile.gettempdir()})", "rows": rows}


# ------------------------------------------------------------------------------------------ exact sizes
def sd15_sizes() -> dict:
    """The SD 1.5 UNet's weight bytes under each method, exactly, from its config on the meta device: fp8 stores
    1 byte per element of the chosen layers; torchao's int8 1 byte per weight element plus an fp32 scale and an
    int8 zero point per output channel (tests/optim/test_quantize.py checks both formulas against the measured
    bytes on tiny-sd)."""
    import torch
    from diffusers import UNet2DConditionModel

    from diffspeed.bench.models import CONFIGS, FAMILIES, _config
    from diffspeed.optim.quantize import QuantizeConfig, targets

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(_config(CONFIGS / FAMILIES["sd15"], "unet"))
    total = sum(p.numel() * 4 for p in unet.parameters())
    skip = QuantizeConfig().skip
    convs = (torch.nn.Linear, torch.nn.Conv2d)
    fp8 = total - sum(3 * p.numel() for _, m in targets(unet, convs, skip) for p in m.parameters())
    int8 = total - sum(3 * m.weight.numel() - 5 * m.weight.shape[0] for _, m in targets(unet, (torch.nn.Linear,), skip))
    return {"baseline": total, "fp8": fp8, "fp8_e5m2": fp8, "int8_weight_only": int8, "int8_dynamic": int8}


# ------------------------------------------------------------------------------------------------- report
def machine(threads: int) -> dict:
    import diffusers
    import torch

    from diffspeed.hardware import detect

    try:
        from importlib.metadata import version

        torchao = version("torchao")
    except Exception:  # noqa: BLE001 -- not installed
        torchao = None
    return {"hardware": detect("cpu").to_dict(), "threads": threads, "python": platform.python_version(),
            "platform": platform.platform(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "torchao": torchao, "isa_caps": {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")
                                             if k in os.environ}}


def _load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _mb(n) -> str:
    return f"{n / MB:.1f}"


def write_report(out: Path, data: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(data, indent=2) + "\n")
    hw = data["machine"]["hardware"]
    quick = " (quick check, not a measurement)" if data["quick"] else ""
    lines = [f"# quantize: weight bytes, peak RAM, speed and fidelity{quick}",
             "", f"- command: `{data['command']}`", f"- when: {data['started']} to {data['finished']}",
             f"- machine: {hw.get('name')} ({hw.get('capability')}), flags {' '.join(hw.get('flags', [])) or 'none'}, "
             f"{hw.get('cores')} cores, {data['machine']['threads']} torch threads"
             + (f", caps {data['machine']['isa_caps']}" if data['machine']['isa_caps'] else ""),
             f"- versions: python {data['machine']['python']}, torch {data['machine']['torch']}, diffusers "
             f"{data['machine']['diffusers']}, torchao {data['machine']['torchao']}",
             f"- what else ran: load average {data['load_before']} before, {data['load_after']} after"
             + (f"; {data['note']}" if data['note'] else ""), ""]
    for key in ("pipeline", "unet"):
        sec = data.get(key)
        if not sec:
            continue
        mem = sec.get("memory", {}).get("rows", {})
        lines += [f"## {sec['model']}: {sec['setting']}", ""]
        if sec.get("memory"):
            lines += [f"Memory: {sec['memory']['setting']}.", ""]
        fid = ("PSNR dB | SSIM" if key == "pipeline" else "rel. RMS drift | max abs drift")
        lines += [f"| method | layers | UNet weights MB | vs baseline | peak RSS MB | vs baseline "
                  f"| s per {sec['unit']} | spread s | speed vs baseline | {fid} |",
                  "|---" * (9 + fid.count("|") + 1) + "|"]
        base_w = sec["rows"]["baseline"]["unet_weight_bytes"]
        for m, r in sec["rows"].items():
            mm = mem.get(m)
            f1, f2 = ((r["psnr_db"], r["ssim"]) if key == "pipeline" else
                      (f"{r['relative_rms_drift']:.2e}", f"{r['max_abs_drift']:.2e}"))
            lines.append(f"| {m} | {r['layers']} | {_mb(r['unet_weight_bytes'])} | "
                         f"{r['unet_weight_bytes'] / base_w:.3f} | {_mb(mm['generation_peak']) if mm else ''} | "
                         f"{mm['peak_vs_baseline'] if mm else ''} | {r['median_s']} | {r['spread_s']} | "
                         f"{r['speed_vs_baseline']}x | {'' if f1 is None else f1} | {'' if f2 is None else f2} |")
        lines.append("")
    if data.get("sd15_sizes"):
        base = data["sd15_sizes"]["baseline"]
        lines += ["## SD 1.5 UNet weight bytes, exact from its config (meta device)", "",
                  "| method | MB | vs fp32 |", "|---|---|---|"]
        lines += [f"| {m} | {_mb(b)} | {b / base:.3f} |" for m, b in data["sd15_sizes"].items()]
        lines.append("")
    lines += ["Speed > 1 is faster than the baseline (median of per-round ratios; \"baseline again\" shows the "
              "run's noise). Peak RSS: the kernel's VmHWM over one generation in a fresh process per method, the "
              "originals spilled to disk. fp8 layers compute in the component's dtype (fp32 here) and cast their "
              "weights per call; torchao's int8 methods quantize Linear layers only.", ""]
    (out / "README.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings, seconds: checks the script only")
    parser.add_argument("--out", default="benchmarks/quantize", help="folder for results.json and README.md")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (parent and children)")
    parser.add_argument("--pipeline-model", default="tiny-sd", help="model of the whole-generation section")
    parser.add_argument("--unet-model", default=None,
                        help="model of the UNet-call section (default random:sd15; --quick: tiny-sd)")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-method memory processes")
    parser.add_argument("--spill-dir", default=None, help="folder for the originals (default: the temp folder)")
    parser.add_argument("--note", default="", help="what else ran on the machine, for the report")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(memory_child(json.loads(args.child))))
        return
    s = QUICK if args.quick else FULL
    unet_model = args.unet_model or ("tiny-sd" if args.quick else "random:sd15")
    data = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "quick": args.quick, "settings": s,
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "load_before": _load_average(),
            "note": args.note, "machine": machine(args.threads)}
    data["sd15_sizes"] = sd15_sizes()
    data["pipeline"] = pipeline_section(args.pipeline_model, s)
    gc.collect()
    data["unet"] = unet_section(unet_model, s)
    gc.collect()
    if not args.no_memory:
        data["pipeline"]["memory"] = memory(args.pipeline_model, None, s["memory_steps"], args.threads, args.spill_dir)
        data["unet"]["memory"] = memory(unet_model, s["size"], s["memory_steps"], args.threads, args.spill_dir)
    data["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    data["load_after"] = _load_average()
    write_report(Path(args.out), data)
    print(f"wrote {args.out}/results.json and README.md")


if __name__ == "__main__":
    main()
