"""One bench entry, measured in a process of its own: ``python -m diffspeed.bench.worker JOB.json RESULT.json``.

A fresh process per entry is what makes peak memory honest: weights, caches, compiled graphs and allocator
pools of the previous entry cannot inflate this one's numbers (seed 001 restarted between its tests for the
same reason). The worker loads the model, applies the entry (a diffspeed recipe or a peer), warms up, times
every image of ``runs`` passes over the prompt queue, saves the last pass's images as PNG and writes a JSON
result. Progress goes to stdout one JSON line per image, for the parent's progress bar; library chatter goes
to stderr, which the parent keeps as the entry's log. An exception is a result too (``status: failed`` with
the error and the phase), so the bench goes on with the next entry.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch

from diffspeed.hardware import SlowDtypeWarning

MB = 1 << 20


def _emit(event: dict) -> None:
    print(json.dumps(event), flush=True)


def import_plugins(plugins: list[str]) -> None:
    """Modules that register extra optimizations: dotted names, or paths to ``.py`` files."""
    for i, spec in enumerate(plugins):
        if spec.endswith(".py"):
            mod_spec = importlib.util.spec_from_file_location(f"diffspeed_bench_plugin_{i}", spec)
            if mod_spec is None or mod_spec.loader is None:
                raise ImportError(f"plugin {spec!r} cannot be imported")
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            importlib.import_module(spec)


def load_pipeline(job: dict):
    if job["model"].startswith("random:"):
        from diffspeed.bench.models import random_pipeline

        pipe = random_pipeline(job["model"].split(":", 1)[1])
        from diffspeed.pipelines.load import resolve_device

        pipe.to(resolve_device(job.get("device")))
    else:
        from diffspeed.pipelines.load import load

        pipe = load(job["model"], device=job.get("device"), dtype=job.get("dtype"))
    pipe.set_progress_bar_config(disable=True)
    if job.get("sampler"):
        from diffspeed.pipelines.samplers import get_sampler

        pipe.scheduler = get_sampler(job["sampler"]).build(pipe.scheduler.config)
    return pipe


class _PeerRunner:
    """A peer's patch on the pipeline until ``close``; calls go to the pipeline, or to the peer's own pipeline
    object where it brings one (:class:`~diffspeed.bench.peers.Enabled`)."""

    def __init__(self, pipe, peer, call: dict):
        from diffspeed.bench.peers import activate

        self.stats = {}
        self._enabled = activate(peer, pipe, call)
        self._call = self._enabled.call or pipe
        self.events = list(self._enabled.events)

    def __call__(self, *args, **kwargs):
        return self._call(*args, **kwargs)

    def close(self) -> None:
        self._enabled.disable()


class _RecipeRunner:
    def __init__(self, pipe, recipe_dict: dict):
        from diffspeed.core import Accelerated, Recipe

        # strict=False: an optimization that did nothing is reported ("no effect"), not a failed entry
        self.fast = Accelerated(pipe, Recipe.from_dict(recipe_dict, source="bench entry"), strict=False)

    @property
    def stats(self) -> dict:
        return self.fast.stats

    @property
    def events(self) -> list[str]:
        return list(self.fast.events)

    def __call__(self, *args, **kwargs):
        return self.fast(*args, **kwargs)

    def close(self) -> None:
        self.fast.remove()


class Skip(Exception):
    """The entry cannot run here (a requirement is unmet); reported as skipped, not failed."""


def build_runner(pipe, entry: dict, device: str, call: dict | None = None):
    """The entry applied to ``pipe``: a peer (``call``: the bench call's width, height, steps and CFG, for a peer
    that compiles for them ahead) or a diffspeed recipe."""
    from diffspeed.core import RecipeError

    if entry.get("peer"):
        from diffspeed.bench.peers import NotApplicable, build_peer

        peer = build_peer(entry["peer"], entry.get("settings", {}))
        why = peer.missing(device)
        if why:
            raise Skip(why)
        try:
            return _PeerRunner(pipe, peer, call or {})
        except NotApplicable as err:
            raise Skip(str(err)) from None
    try:
        return _RecipeRunner(pipe, entry.get("recipe") or {"optimization": []})
    except RecipeError as err:
        raise Skip("; ".join(err.problems)) from None


def derived_stats(stats: dict, images: int) -> dict:
    """The run statistics people ask about, as rates: cache hits, skipped work, fallbacks."""
    out = {}
    full, cached = stats.get("deepcache_full_calls", 0), stats.get("deepcache_cached_calls", 0)
    if full + cached:
        out["cache_hit_rate"] = cached / (full + cached)
    if stats.get("deepcache_total_macs"):
        out["skipped_macs_fraction"] = stats.get("deepcache_skipped_macs", 0) / stats["deepcache_total_macs"]
    if stats.get("denoiser_calls"):
        out["cfg_off_fraction"] = stats.get("cfg_skipped_calls", 0) / stats["denoiser_calls"]
        out["denoiser_calls_per_image"] = stats["denoiser_calls"] / max(images, 1)
    out["nan_fallbacks"] = stats.get("vae_fp32_redecodes", 0)
    return out


class _Clock:
    """Seconds of one call: CUDA events on a GPU (what the device spent), perf_counter around a sync on CPU."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def time(self, fn):
        if self.cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            return out, start.elapsed_time(end) / 1000.0
        t0 = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t0


def _save_png(image: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)).save(path)


def interpreter(entry: dict) -> dict:
    """The interpreter this worker runs in and the versions that matter to ``entry``: a peer may run in a second
    environment (``DIFFSPEED_PEER_PYTHON``) with other versions than the bench's."""
    import importlib.metadata as md
    import platform

    dists = ["torch", "diffusers", "transformers"]
    if entry.get("peer"):
        from diffspeed.bench.peers import build_peer

        dists += [d for d in build_peer(entry["peer"], entry.get("settings", {})).versions if d not in dists]
    versions = {}
    for d in dists:
        try:
            versions[d] = md.version(d)
        except md.PackageNotFoundError:
            versions[d] = None
    return {"python": sys.executable, "python_version": platform.python_version(), "versions": versions}


def new_result(name: str, status: str = "ok", error: str | None = None, phase: str | None = None) -> dict:
    """An entry's result before anything is measured: what a skipped or failed entry reports."""
    return {"name": name, "status": status, "error": error, "phase": phase, "images": [], "seconds_per_image": [],
            "stats": {}, "derived": {}, "events": []}


def run_job(job: dict, emit=_emit) -> dict:
    """Measure one entry; never raises for the entry's own failures (they are the result)."""
    from diffspeed.bench.memory import MemoryMonitor

    result = new_result(job["entry"]["name"])
    if job["entry"].get("peer"):
        result["interpreter"] = interpreter(job["entry"])
    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    phase = "load"
    runner = None
    try:
        import_plugins(job.get("plugins", []))
        t0 = time.perf_counter()
        pipe = load_pipeline(job)
        result["load_s"] = time.perf_counter() - t0
        device = str(pipe._execution_device)
        cuda = device.startswith("cuda")
        clock = _Clock(cuda)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        steps, cfg = entry_sampling(job)
        native = pipe.unet.config.sample_size * pipe.vae_scale_factor if hasattr(pipe, "unet") else None
        static = {"width": job["width"] or native, "height": job["height"] or native, "num_inference_steps": steps,
                  "guidance_scale": cfg, "batch_size": 1}
        with MemoryMonitor() as mon:
            phase = "setup"
            t0 = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:  # e.g. bf16 asked for where it is slow
                warnings.simplefilter("always", SlowDtypeWarning)
                runner = build_runner(pipe, job["entry"], device, static)
            result["setup_s"] = time.perf_counter() - t0
            setup_events = [str(w.message) for w in caught if issubclass(w.category, SlowDtypeWarning)]
            for w in caught:  # the rest still reach the entry's log, as without the catch
                if not issubclass(w.category, SlowDtypeWarning):
                    warnings.showwarning(w.message, w.category, w.filename, w.lineno)
            mon.mark("setup")
            if cuda:  # the generation peak apart from the setup peak, as for RSS
                cuda_setup_mb = torch.cuda.max_memory_allocated() / MB
                torch.cuda.reset_peak_memory_stats()
            queue, images = job["queue"], {}
            result["sampling"] = {"steps": steps, "cfg": cfg, **scheduler_names(pipe.scheduler)}

            def call(item):
                # a list of one prompt is the same image as the plain string, and lets staged stage it
                gen = [torch.Generator("cpu").manual_seed(item["seed"])]  # CPU noise: same on every device
                negative = [item["negative_prompt"]] if item.get("negative_prompt") else None
                return runner([item["prompt"]], negative_prompt=negative, num_inference_steps=steps,
                              guidance_scale=cfg, width=job["width"], height=job["height"], generator=gen,
                              output_type="np").images[0]

            phase = "warm-up"
            for i in range(job["warmup"]):
                _, seconds = clock.time(lambda i=i: call(queue[i % len(queue)]))
                result.setdefault("first_call_s", seconds)
                emit({"progress": "warm-up"})
            mon.mark("warm-up")
            phase = "timed"
            totals: dict = {}
            for run in range(job["runs"]):
                last = run == job["runs"] - 1
                for i, item in enumerate(queue):
                    image, seconds = clock.time(lambda item=item: call(item))
                    result["seconds_per_image"].append(seconds)
                    if last:
                        images[i] = image
                        for k, v in runner.stats.items():
                            totals[k] = totals.get(k, 0) + v
                    emit({"progress": "image"})
            mon.mark("timed")
        result["stats"] = totals
        result["derived"] = derived_stats(totals, len(queue))
        result["events"] = setup_events + runner.events
        folder = Path(job["images_dir"])
        for i, image in sorted(images.items()) if job.get("save_images", True) else ():
            _save_png(np.asarray(image, dtype=np.float32), folder / f"{i}.png")
            result["images"].append(str(folder / f"{i}.png"))
        result["width"], result["height"] = int(images[0].shape[1]), int(images[0].shape[0])
        memory = {"device": device, "method": mon.method, "rss_before_mb": mon.before / MB,
                  "rss_peak_mb": mon.peak / MB, "rss_phases_mb": {k: v / MB for k, v in mon.phases.items()}}
        if cuda:
            memory |= {"method": "max_memory_allocated", "cuda_setup_peak_mb": cuda_setup_mb,
                       "cuda_max_allocated_mb": torch.cuda.max_memory_allocated() / MB,
                       "cuda_max_reserved_mb": torch.cuda.max_memory_reserved() / MB}
        # the peak while generating (warm-up and timed images) is what a memory budget is about; applying the
        # recipe (casting, compiling) is reported apart as setup_peak_mb
        phases = memory["rss_phases_mb"]
        memory["setup_peak_mb"] = phases.get("setup", 0.0)
        memory["generation_peak_mb"] = max(phases.get("warm-up", 0.0), phases.get("timed", 0.0))
        memory["peak_mb"] = memory.get("cuda_max_allocated_mb", memory["generation_peak_mb"])
        result["memory"] = memory
    except Skip as why:
        result.update(status="skipped", error=str(why), phase=phase)
    except Exception as err:  # noqa: BLE001 -- the entry's failure is its result; the bench goes on
        result.update(status="failed", error=f"{type(err).__name__}: {err}", phase=phase,
                      traceback=traceback.format_exc(limit=8))
    finally:
        if runner is not None:
            try:
                runner.close()
            except Exception as err:  # noqa: BLE001
                result["events"].append(f"removing the entry failed: {type(err).__name__}: {err}")
    _summarise(result, entry_sampling(job)[0])
    return result


def entry_sampling(job: dict) -> tuple[int, float]:
    """(steps, CFG scale) of this job's entry: the entry's own ``settings`` (an accelerator runs at its
    recommended few steps) override the bench's. A peer's settings are its factory's arguments, never these."""
    settings = {} if job["entry"].get("peer") else job["entry"].get("settings") or {}
    steps = settings.get("steps")
    cfg = settings.get("cfg")
    return int(job["steps"] if steps is None else steps), float(job["cfg"] if cfg is None else cfg)


def scheduler_names(scheduler) -> dict:
    """The scheduler the entry's calls ran with, after the recipe applied (an accelerator sets its own): its
    diffusers class and the diffspeed sampler name it matches (the most specific one), else the class name."""
    from diffspeed.pipelines.samplers import SAMPLERS

    cls = type(scheduler).__name__
    config = getattr(scheduler, "config", {}) or {}
    matches = [s for s in SAMPLERS.values()
               if s.cls == cls and all(config.get(k) == v for k, v in s.overrides.items())]
    best = max(matches, key=lambda s: len(s.overrides), default=None)
    return {"sampler": best.name if best else cls, "scheduler": cls}


def _summarise(result: dict, steps: int) -> None:
    s = result["seconds_per_image"]
    if s:
        result["timing"] = {"mean_s": statistics.fmean(s), "median_s": statistics.median(s), "min_s": min(s),
                            "max_s": max(s), "stdev_s": statistics.stdev(s) if len(s) > 1 else 0.0,
                            "it_per_s": steps / statistics.median(s), "n": len(s)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    job_path, result_path = Path(argv[0]), Path(argv[1])
    from diffspeed.pipelines.load import quiet_loading

    job = json.loads(job_path.read_text())
    with quiet_loading():
        result = run_job(job)
    result_path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
