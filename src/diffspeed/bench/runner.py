"""``diffspeed bench`` / ``diffspeed.bench()``: seed 001's benchmark method as one command.

Method: a fixed queue of prompts with fixed seeds; for each entry (the baseline first, then presets, recipe
files, ``--opt`` lists, suites and peers) a fresh process loads the model, applies the entry, warms up, and
times every image of ``runs`` passes over the queue (device synchronised; CUDA events on a GPU), with setup
and the first call (compile) timed apart, peak memory measured in that process only (peak RSS on the CPU,
``max_memory_allocated`` / ``max_memory_reserved`` on CUDA) and the run statistics summed. The parent then
compares each entry's images with the baseline's (PSNR, SSIM, MS-SSIM, LPIPS where available), scores their
prompt adherence when the prompts are colour-check captions (the tiny models' background and shape accuracy),
turns every figure into a ratio to this run's baseline and writes ``results.json``, ``report.md`` and
``report.html`` with the image grids and the speed-vs-fidelity plot (see :mod:`diffspeed.bench.report`).

The baseline runs at the bench's steps and CFG (default: the shipped model card's scale); an entry with an
``accelerator`` (a step-distilled LoRA) runs at the accelerator's recommended steps, CFG and sampler.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import platform
import re
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from diffspeed.bench.peers import PEER_PYTHON_ENV, Peer, deepcache_package, default_peers, tomesd_package
from diffspeed.bench.queue import QueueItem, default_queue, scenes_of
from diffspeed.bench.worker import new_result
from diffspeed.core import OptConfig, Recipe, all_optimizations
from diffspeed.core.recipe import describe_tables
from diffspeed.errors import DiffspeedError, check_range, check_side

SCHEMA = "diffspeed.bench/1"
PROMPTS = tuple((q.prompt, q.seed) for q in default_queue("tiny-sd"))  # kept for tools that import it


@dataclass(frozen=True)
class Entry:
    """One thing to measure: a diffspeed recipe (``recipe``, as :meth:`Recipe.to_dict` writes it) or a peer."""

    name: str
    kind: str = "recipe"  # baseline | recipe | peer
    source: str = ""  # where it came from: "preset fastest", "file x.toml", "--opt", "suite classic", "peer"
    recipe: dict | None = None
    peer: str | None = None
    settings: dict = field(default_factory=dict)

    @classmethod
    def of_recipe(cls, recipe: Recipe | list[OptConfig], name: str = "", source: str = "") -> Entry:
        recipe = recipe if isinstance(recipe, Recipe) else Recipe(tuple(recipe))
        return cls(name or recipe.name or " + ".join(c.name for c in recipe.optimizations) or "empty recipe",
                   "recipe", source, recipe.to_dict())

    @classmethod
    def of_peer(cls, peer: Peer) -> Entry:
        return cls(peer.name, "peer", "peer", None, peer.key, dict(peer.settings))

    def describe(self) -> str:
        if self.kind == "peer":
            return f"{self.peer}({', '.join(f'{k}={v}' for k, v in self.settings.items())})"
        return describe_tables((self.recipe or {}).get("optimization", [])) or "nothing applied"


BASELINE = Entry("baseline", "baseline", "the model as loaded", {"optimization": []})
BASELINE_AGAIN = Entry("baseline again", "baseline", "noise check: the baseline measured again at the end",
                       {"optimization": []})


# ------------------------------------------------------------------------------------------------- suites
def classic_suite(image_size: int) -> list[Entry]:
    """One entry per optimization of the classic menu, in a setting that shows its speed effect."""
    from diffspeed.optim.attention import AttentionConfig
    from diffspeed.optim.cfg_cutoff import CfgCutoffConfig
    from diffspeed.optim.channels_last import ChannelsLastConfig
    from diffspeed.optim.freeu import FreeUConfig
    from diffspeed.optim.precision import PrecisionConfig
    from diffspeed.optim.sampler import SamplerConfig
    from diffspeed.optim.vae_slicing import VaeSlicingConfig
    from diffspeed.optim.vae_tiling import VaeTilingConfig

    half = "fp16" if torch.cuda.is_available() else "bf16"
    known = all_optimizations()
    suite = [(f"precision {half}", [PrecisionConfig(unet=half, text_encoder=half, vae=half)]),
             ("attention sliced", [AttentionConfig(backend="sliced")]),
             ("attention math", [AttentionConfig(backend="math")]),
             ("channels_last", [ChannelsLastConfig()]),
             ("vae_slicing", [VaeSlicingConfig()]),
             ("vae_tiling half-size tiles", [VaeTilingConfig(tile_size=max(32, image_size // 2 // 8 * 8))]),
             ("cfg_cutoff 0.5", [CfgCutoffConfig(fraction=0.5)]),
             ("freeu", [FreeUConfig()]),
             ("sampler DPM++ 2M Karras", [SamplerConfig(sampler="DPM++ 2M Karras")]),
             ("staged", [known["staged"].Config()]),
             ("tiny_vae (shipped taesd-tiny)", [known["tiny_vae"].Config()]),
             ("offload model", [known["offload"].Config(mode="model")] if torch.cuda.is_available() else None),
             ("compile", [known["compile"].Config()])]
    out = [Entry.of_recipe(configs, name, "suite classic") for name, configs in suite if configs is not None]
    if not torch.cuda.is_available():  # recorded as skipped with the optimization's own reason
        out.append(Entry("offload model", "recipe", "suite classic",
                         {"optimization": [{"name": "offload", "mode": "model"}]}))
    return out


def caching_suite(image_size: int) -> list[Entry]:
    """Feature caching and token reduction, with the peers' packages at the same settings."""
    known = all_optimizations()
    dc, tile = known["deepcache"].Config, max(16, image_size // 2)  # 2 x 2 tiles at the full latent resolution
    return [Entry.of_recipe([dc(interval=3, branch=0)], "deepcache interval 3 branch 0", "suite caching"),
            Entry.of_peer(deepcache_package(3, 0)),
            Entry.of_recipe([dc(interval=5, branch=0)], "deepcache interval 5 branch 0", "suite caching"),
            Entry.of_recipe([dc(interval=3)], "deepcache interval 3 family default", "suite caching"),
            Entry.of_recipe([known["tome"].Config(ratio=0.5)], "tome ratio 0.5", "suite caching"),
            Entry.of_peer(tomesd_package(0.5)),
            Entry.of_recipe([known["hypertile"].Config(tile_size=tile)], f"hypertile tile_size {tile}",
                            "suite caching"),
            Entry.of_recipe([known["tgate"].Config(gate_fraction=0.4)], "tgate gate_fraction 0.4", "suite caching")]


def preset_entries(names, device: str, profile=None) -> list[Entry]:
    """One entry per preset, resolved for ``profile`` (default: this device's, probed once and cached)."""
    from diffspeed.hardware import probe
    from diffspeed.presets import PRESETS, load_preset, profile_class

    profile = probe(device=device) if profile is None else profile
    cls, why = profile_class(profile)
    out = []
    for name in PRESETS if names == "all" else names:
        preset = load_preset(name)
        source = f"preset {name} [{cls}: {why}]"
        try:
            out.append(Entry.of_recipe(preset.recipe(device, profile=profile), f"preset {name}", source))
        except DiffspeedError as err:  # a CUDA-only preset on a CPU: measured as skipped, with the reason
            out.append(Entry(f"preset {name}", "recipe", source, {"optimization": preset.entries[cls]},
                             settings={"invalid": str(err)}))
    return out


SUITES = {"classic": classic_suite, "caching": caching_suite}


# ------------------------------------------------------------------------------------------------- running
def environment(device: str = "cpu") -> dict:
    import diffusers
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
           "transformers": transformers.__version__, "platform": platform.platform(),
           "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
           "threads": torch.get_num_threads(), "device": "cpu"}
    if device.startswith("cuda") and torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name(torch.device(device))
        env["cuda"] = torch.version.cuda
        env["gpu_memory_mb"] = torch.cuda.get_device_properties(torch.device(device)).total_memory / (1 << 20)
    return env


def _slug(text: str, taken: set) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "entry"
    slug, n = base, 2
    while slug in taken:
        slug, n = f"{base}-{n}", n + 1
    taken.add(slug)
    return slug


def worker_env() -> dict:
    """The environment of a worker process: this one's, unbuffered, with this checkout's src/ first on the path so
    the worker imports this very diffspeed, whichever interpreter runs it."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _run_isolated(job: dict, folder: Path, timeout: float | None, tick, python: str | None = None) -> dict:
    """Run the worker in a fresh process of ``python`` (default: this interpreter); a crash, a kill or a timeout
    becomes a failed result."""
    job_path, result_path, log_path = folder / "job.json", folder / "result.json", folder / "log.txt"
    job_path.write_text(json.dumps(job, indent=2) + "\n")
    result_path.unlink(missing_ok=True)
    expired = threading.Event()
    with open(log_path, "w") as log, subprocess.Popen(
            [python or sys.executable, "-m", "diffspeed.bench.worker", str(job_path), str(result_path)],
            stdout=subprocess.PIPE, stderr=log, text=True, env=worker_env()) as proc:
        # a watchdog, not a check between output lines: a worker that hangs silently prints nothing
        watchdog = threading.Timer(timeout, lambda: (expired.set(), _stop(proc))) if timeout else None
        if watchdog is not None:
            watchdog.start()
        try:
            for line in proc.stdout:  # one JSON line per image
                if line.startswith('{"progress"'):
                    tick()
            code = proc.wait()
        finally:
            if watchdog is not None:
                watchdog.cancel()
    timed_out = expired.is_set()
    if code != 0:  # a killed worker cannot clean up: sweep the spill folders it left (owned by a dead pid)
        from diffspeed.core.spill import sweep_stale

        sweep_stale()
    if result_path.is_file() and not timed_out:
        return json.loads(result_path.read_text())
    tail = log_path.read_text()[-2000:]
    why = f"timed out after {timeout:.0f} s" if timed_out else f"the worker process exited with status {code}"
    return new_result(job["entry"]["name"], "failed", f"{why}; last log lines: {tail.strip()[-600:]}", "process")


def _stop(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM first, so the worker removes its spill folders (diffspeed.core.spill); SIGKILL after ``grace``."""
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()


def where_to_run(entry: Entry, device: str, peer_python: str | None = None) -> tuple[str | None, str | None]:
    """``(interpreter, None)`` to run ``entry`` with, or ``(None, why it cannot run)`` where that is clear without
    the model (a peer's package or device, a recipe's unknown names, bad values or hardware needs). A peer whose
    package does not import in this interpreter runs in ``peer_python`` (``DIFFSPEED_PEER_PYTHON``) where it
    imports there; recipes always run here."""
    from diffspeed.bench.peers import build_peer
    from diffspeed.core import RecipeError

    if entry.kind != "peer":
        try:
            Recipe.from_dict(entry.recipe or {}, source="bench entry")
        except RecipeError as err:
            return None, "; ".join(err.problems)
        return sys.executable, None
    peer = build_peer(entry.peer, entry.settings)
    why = peer.device_problem(device) or peer.missing(device, python=sys.executable, env=worker_env())
    if why is None:
        return sys.executable, None
    if not peer_python or peer.device_problem(device):
        return None, why  # the peer's own install hint says how (tools/peer_venv.sh for optimum-intel)
    there = peer.missing(device, python=peer_python, env=worker_env())
    if there is None:
        return peer_python, None
    return None, f"{why}; and under {PEER_PYTHON_ENV}={peer_python}: {there}"


def _load_images(paths: list[str]) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255.0 for p in paths])


def _compare(rows: list[dict], fidelity: bool) -> None:
    from diffspeed.bench.metrics import fidelity as measure_fidelity

    base = rows[0]
    ok = base["status"] == "ok"
    reference = _load_images(base["images"]) if ok and fidelity else None
    for row in rows:
        row["ratios"], row["fidelity"] = {}, None
        if row["status"] != "ok" or not ok:
            continue
        row["ratios"]["speed"] = base["timing"]["median_s"] / row["timing"]["median_s"]
        row["ratios"]["memory"] = row["memory"]["peak_mb"] / base["memory"]["peak_mb"]
        if reference is not None and len(row["images"]) == len(reference):
            images = _load_images(row["images"])
            if images.shape == reference.shape:
                row["fidelity"] = measure_fidelity(images, reference)


def pareto_front(rows: list[dict], fidelity: bool) -> list[str]:
    """Names of the entries no other entry beats on both axes: faster and closer to the baseline (or, without
    fidelity, faster and leaner)."""
    def point(r):
        if fidelity:
            return r["ratios"]["speed"], r["fidelity"]["psnr_db"]
        return r["ratios"]["speed"], -r["ratios"]["memory"]

    rows = [r for r in rows if r["status"] == "ok" and r["ratios"] and (not fidelity or r["fidelity"])]
    return [r["name"] for r in nondominated(rows, point)]


def nondominated(items: list, point) -> list:
    """The items whose ``point`` (x, y), both larger-is-better, no other item's point beats on both axes."""
    pts = [(item, point(item)) for item in items]
    return [item for item, (x, y) in pts
            if not any(x2 >= x and y2 >= y and (x2 > x or y2 > y) for _, (x2, y2) in pts)]


def card_cfg(model: str) -> tuple[float, str]:
    """The CFG scale the bench runs ``model`` at when none is given, and where it comes from: a shipped model's
    card (``training.json``'s recommended scale, as ``diffspeed generate`` uses; tiny-sd: 3), read without
    loading the pipeline; otherwise the web UI's 7."""
    from diffspeed.generate import DEFAULT_CFG, card_recommended_cfg
    from diffspeed.pipelines.load import SHIPPED, shipped_path

    cfg = card_recommended_cfg(str(shipped_path(model))) if model in SHIPPED else None
    return (DEFAULT_CFG, "default") if cfg is None else (cfg, "model card")


def with_accelerator_settings(entry: Entry) -> Entry:
    """A recipe entry with an ``accelerator`` runs at the accelerator's recommended steps and CFG (from
    :func:`diffspeed.optim.accelerator.recommended`; a step-distilled LoRA is made for 2-8 steps), not the
    bench's, which the baseline keeps: ``settings["steps"]`` / ``settings["cfg"]`` / ``settings["sampler"]``,
    unless the entry already says. Other entries come back unchanged."""
    tables = [t for t in (entry.recipe or {}).get("optimization", []) if isinstance(t, dict)
              and t.get("name") == "accelerator"] if entry.kind == "recipe" else []
    if not tables:
        return entry
    from diffspeed.optim.accelerator import AcceleratorConfig, recommended

    try:
        rec = recommended(AcceleratorConfig(**{k: v for k, v in tables[-1].items() if k != "name"}))
    except (DiffspeedError, TypeError, ValueError):  # a bad table: the entry is skipped with the recipe's error
        return entry
    extra = {"steps": rec.steps, "cfg": rec.cfg_scale, "sampler": rec.sampler}
    return dataclasses.replace(entry, settings={**extra, **entry.settings})


def _adherence(rows: list[dict], scenes: list | None) -> None:
    """Each row's prompt adherence: the colour check's background and shape accuracy
    (:func:`diffspeed.tiny.check.score_images`) of the images it saved; None where it cannot be measured."""
    from PIL import Image

    from diffspeed.tiny.check import score_images

    for row in rows:
        row["adherence"] = None
        if scenes is None or row["status"] != "ok" or len(row.get("images", [])) != len(scenes):
            continue
        images = []
        for path in row["images"]:
            with Image.open(path) as im:
                images.append(im.convert("RGB"))
        score = score_images(images, scenes)
        row["adherence"] = {"background": score.background_accuracy, "shape": score.shape_accuracy,
                            "images": score.images}


def bench(model: str = "tiny-sd", *, entries: list[Entry] | None = None, presets="all", peers: bool = True,
          queue: tuple[QueueItem, ...] | None = None, prompts: int | None = None, steps: int = 20,
          size: int | tuple[int, int] | None = None, sampler: str | None = "DPM++ 2M", cfg: float | None = None,
          runs: int = 5,
          warmup: int = 1, device: str | None = None, dtype: str | None = None, out: str | Path = "bench-results",
          timeout: float | None = 1800.0, plugins: list[str] = (), threads: int | None = None,
          progress: bool = True, command: str | None = None, noise_check: bool = True,
          peer_python: str | None = None) -> dict:
    """Benchmark ``entries`` (default: every preset and every peer) against the baseline; write the report.

    ``noise_check``: measure the baseline once more at the end ("baseline again"); its speed ratio, which
    should be 1.00x, shows how far this machine's timings drift during the run (``data["noise"]``).

    ``cfg``: None runs at the shipped model's recommended scale (its card; tiny-sd: 3), else 7. An entry whose
    recipe has an ``accelerator`` runs at its recommended steps and CFG instead of ``steps`` and ``cfg`` (see
    :func:`with_accelerator_settings`). When every prompt of the queue is a colour-check caption and the
    weights are trained, each row also gets ``adherence``: the colour check's background and shape accuracy.

    ``peer_python``: the interpreter of a second environment for the peers whose package does not import in this
    one (default: ``$DIFFSPEED_PEER_PYTHON``; ``tools/peer_venv.sh`` makes one for optimum-intel); each such row
    records the interpreter and versions it ran with (``interpreter``).

    Returns what ``results.json`` holds. Every entry runs in its own process (see :mod:`.worker`); one that
    fails or is skipped is recorded with its reason and the rest go on.
    """
    from tqdm.auto import tqdm

    from diffspeed.bench.report import write_atomic, write_reports
    from diffspeed.pipelines.load import resolve_device

    missing = [pip for mod, pip in (("skimage", "scikit-image"), ("matplotlib", "matplotlib"))
               if importlib.util.find_spec(mod) is None]
    if missing:
        raise DiffspeedError(f"bench: needs {' and '.join(missing)} for its metrics and plots; install them with "
                             "pip install 'diffspeed[bench]'", field="bench")
    check_range("steps", steps, 1, 1000)
    check_range("runs", runs, 1, 100)
    check_range("warmup", warmup, 0, 20)
    cfg_source = "given"
    if cfg is None:
        cfg, cfg_source = card_cfg(model)
    check_range("cfg_scale", cfg, 0.0, 50.0, kind=float)
    if sampler is not None:
        from diffspeed.pipelines.samplers import get_sampler

        get_sampler(sampler)  # an unknown name fails here, naming the field, not in every worker
    queue = tuple(queue or default_queue(model))
    if prompts is not None:
        check_range("prompts", prompts, 1, len(queue))
        queue = queue[:prompts]
    device = str(resolve_device(device))
    peer_python = peer_python or os.environ.get(PEER_PYTHON_ENV) or None
    width, height = _size(model, size)
    random_weights = model.startswith("random:")
    from diffspeed.hardware import probe

    profile = probe(device=device)  # measured once per machine and torch version, then read from the cache
    todo = [BASELINE] + list(entries if entries is not None else
                             preset_entries(presets, device, profile) + ([Entry.of_peer(p) for p in default_peers()]
                                                                if peers else []))
    todo = [with_accelerator_settings(e) for e in todo]
    if noise_check and len(todo) > 1:
        todo.append(BASELINE_AGAIN)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    common = {"model": model, "device": device, "dtype": dtype, "sampler": sampler, "steps": steps,
              "width": width, "height": height, "cfg": cfg, "runs": runs, "warmup": warmup,
              "queue": [asdict(q) for q in queue], "plugins": [str(p) for p in plugins], "threads": threads,
              "save_images": not random_weights}  # noise images would only fill the disk
    taken: set = set()
    rows = []
    bar = tqdm(total=len(todo) * (warmup + runs * len(queue)), unit="image", desc="bench", disable=not progress)
    for entry in todo:
        slug = _slug(entry.name, taken)
        folder = out / "entries" / slug
        folder.mkdir(parents=True, exist_ok=True)
        bar.set_postfix_str(entry.name[:40])
        done = [0]

        def tick(done=done):
            done[0] += 1
            bar.update(1)

        # plugins register their optimizations in the workers only, so only a worker can judge their recipes
        python, why = ((sys.executable, None) if plugins and entry.kind != "peer" else
                       where_to_run(entry, device, peer_python))
        why = entry.settings.get("invalid") or why
        if why:  # known before loading anything: no process is started for it
            row = new_result(entry.name, "skipped", why, "setup")
        else:
            job = common | {"entry": asdict(entry), "images_dir": str(folder / "images")}
            row = _run_isolated(job, folder, timeout, tick, python)
        bar.update(warmup + runs * len(queue) - done[0])
        row |= {"kind": entry.kind, "source": entry.source, "what": entry.describe(), "slug": slug,
                "recipe": entry.recipe, "peer": entry.peer, "settings": {k: v for k, v in entry.settings.items()
                                                                         if k != "invalid"},
                "log": str(folder / "log.txt") if (folder / "log.txt").is_file() else None}
        # what the entry ran (or would have run) with; the worker says which scheduler its calls really used
        ran, own = row.get("sampling") or {}, {} if entry.kind == "peer" else entry.settings
        row["sampling"] = {"steps": int(own.get("steps", steps)), "cfg": float(own.get("cfg", cfg)),
                           "sampler": ran.get("sampler", own.get("sampler", sampler)),
                           "scheduler": ran.get("scheduler")}
        rows.append(row)
        if entry is BASELINE and row["status"] == "ok" and common["width"] is None:  # the model's native size
            common |= {"width": row["width"], "height": row["height"]}
    bar.close()
    _compare(rows, not random_weights)
    scenes = None if random_weights else scenes_of(queue)
    _adherence(rows, scenes)
    for row in rows:  # the report folder can move: paths inside it are relative
        row["images"] = [os.path.relpath(p, out) for p in row.get("images", [])]
    data = {"schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": command or " ".join(["diffspeed", *sys.argv[1:]]),
            "environment": environment(device),
            "hardware": profile.to_dict(),
            "settings": {**{k: v for k, v in common.items() if k not in ("plugins",)}, "model_kind":
                         "random weights" if random_weights else "trained", "cfg_source": cfg_source,
                         "adherence": (f"colour check (diffspeed.tiny.check): background and shape accuracy of "
                                       f"each entry's {len(queue)} images" if scenes is not None else None),
                         "isolation": "one process per entry", "peer_python": peer_python,
                         "timing": "CUDA events" if device.startswith("cuda") else "perf_counter",
                         "memory": "max_memory_allocated / reserved" if device.startswith("cuda")
                         else "peak RSS (VmHWM) of the entry's process after loading"},
            "fidelity_note": ("random weights: the images are noise, so fidelity is not computed (it would be "
                              "meaningless); only speed and memory count") if random_weights else None,
            "entries": rows}
    again = next((r for r in rows if r["name"] == BASELINE_AGAIN.name and r["kind"] == "baseline"), None)
    data["noise"] = ({"baseline_again_speed": again["ratios"]["speed"],
                      "note": f"the baseline measured again at the end ran at {again['ratios']['speed']:.2f}x "
                              "of the first: speed ratios closer to 1 than that are within this run's noise"}
                     if again and again.get("ratios") else None)
    data["pareto"] = pareto_front([r for r in rows if r is not again], not random_weights)
    data["files"] = write_reports(data, out)
    write_atomic(out / "results.json", json.dumps(strict_json(data), indent=2, allow_nan=False) + "\n")
    return data


def strict_json(value):
    """``value`` with non-finite floats as the strings "inf" / "-inf" / "nan" (identical images have PSNR inf),
    so results.json is strict JSON that every parser reads; ``float()`` turns them back."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _size(model: str, size) -> tuple[int | None, int | None]:
    """(width, height); (None, None) lets the baseline run at the model's native size and the rest follow."""
    if size is None:
        if not model.startswith("random:"):
            return None, None
        size = 256
    w, h = (size, size) if isinstance(size, int) else size
    check_side("width", w)
    check_side("height", h)
    return int(w), int(h)


def suite_from_recipe(path: str) -> list[Entry]:
    recipe = Recipe.load(path)
    return [Entry.of_recipe(recipe, recipe.name or Path(path).stem, f"file {path}")]
