"""``diffspeed bench``: time each optimization against the baseline measured in the same run.

Method (after seed 001's benchmark and nanoGPT's bench.py): fixed prompts and seeds, one warm-up call per
candidate, then ``repeats`` timed calls with device synchronisation around each; report the median and the
spread, peak memory (sampled RSS on the CPU, ``max_memory_allocated`` on CUDA), and fidelity to the baseline
images (PSNR, and SSIM when scikit-image is installed). Every figure is a ratio to the baseline of this run,
written next to the machine, the versions and the exact command.
"""

from __future__ import annotations

import functools
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from diffspeed.bench.peers import Peer, deepcache_package, tomesd_package
from diffspeed.core import Accelerated, OptConfig, Recipe, RecipeError, all_optimizations

PROMPTS = (  # (prompt, seed): four subjects like seed 001's portrait / interior / macro / 3D set
    ("a red circle at top left and a yellow star at center on a blue background", 877866765),
    ("a white square at bottom right on a black to gray gradient background", 556782245),
    ("a purple triangle at center on an orange background", 225789945),
    ("a green star at top and a blue circle at bottom on a white background", 987867834),
)


@dataclass
class Measurement:
    name: str
    recipe: list[dict]
    seconds: list[float] = field(default_factory=list)  # per timed call (all prompts)
    peak_mb: float | None = None
    psnr_db: float | None = None
    ssim: float | None = None
    skipped: str | None = None
    first_call_s: float | None = None  # warm-up call: includes compile time where there is one
    stats: dict = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds) if self.seconds else float("nan")


def classic_suite(image_size: int) -> list[tuple[str, list[OptConfig]]]:
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
    suite = [
        (f"precision {half}", [PrecisionConfig(unet=half, text_encoder=half, vae=half)]),
        ("attention sliced", [AttentionConfig(backend="sliced")]),
        ("attention math", [AttentionConfig(backend="math")]),
        ("channels_last", [ChannelsLastConfig()]),
        ("vae_slicing", [VaeSlicingConfig()]),
        ("vae_tiling half-size tiles", [VaeTilingConfig(tile_size=max(32, image_size // 2 // 8 * 8))]),
        ("cfg_cutoff 0.5", [CfgCutoffConfig(fraction=0.5)]),
        ("freeu", [FreeUConfig()]),
        ("sampler DPM++ 2M Karras", [SamplerConfig(sampler="DPM++ 2M Karras")]),
    ]
    known = all_optimizations()
    if "staged" in known:
        suite.append(("staged", [known["staged"].Config()]))
    if "offload" in known:
        suite.append(("offload model", [known["offload"].Config(mode="model")]))
    if "compile" in known:
        suite.append(("compile", [known["compile"].Config()]))
    return suite


def caching_suite(image_size: int) -> list[tuple[str, list[OptConfig] | Peer]]:
    """Feature caching and token reduction, with the peers' packages at the same settings."""
    known = all_optimizations()
    suite: list = []
    if "deepcache" in known:
        dc = known["deepcache"].Config
        suite += [("deepcache interval 3 branch 0", [dc(interval=3, branch=0)]),
                  ("DeepCache package interval 3 branch 0", deepcache_package(3, 0)),
                  ("deepcache interval 5 branch 0", [dc(interval=5, branch=0)]),
                  ("deepcache interval 3 family default", [dc(interval=3)])]
    tile = max(16, image_size // 2)  # 2 x 2 tiles at the full latent resolution
    for name, kw, peer in (("tome", {"ratio": 0.5}, tomesd_package(0.5)), ("hypertile", {"tile_size": tile}, None),
                           ("tgate", {"gate_fraction": 0.4}, None)):
        if name in known:
            suite.append((f"{name} {' '.join(f'{k} {v}' for k, v in kw.items())}".strip(), [known[name].Config(**kw)]))
            if peer is not None:
                suite.append((peer.name, peer))
    return suite


SUITES = {"classic": classic_suite, "caching": caching_suite}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _generate(runner, pipe, steps: int, size: int, cfg: float, n_prompts: int = len(PROMPTS)) -> np.ndarray:
    prompts = [p for p, _ in PROMPTS[:n_prompts]]
    gens = [torch.Generator(pipe._execution_device).manual_seed(s) for _, s in PROMPTS[:n_prompts]]
    out = runner(prompts, num_inference_steps=steps, guidance_scale=cfg, width=size, height=size,
                 generator=gens, output_type="np")
    return np.asarray(out.images, dtype=np.float32)


def _fidelity(images: np.ndarray, reference: np.ndarray) -> tuple[float, float | None]:
    mse = float(np.mean((images - reference) ** 2))
    psnr = float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)
    try:
        from skimage.metrics import structural_similarity
    except ImportError:
        return psnr, None
    ssim = float(np.mean([structural_similarity(a, b, channel_axis=-1, data_range=1.0)
                          for a, b in zip(images, reference)]))
    return psnr, ssim


class _PeerRunner:
    """A peer's patch applied to the pipeline for the duration of a ``with`` block; calls go to the pipeline."""

    def __init__(self, pipe, peer: Peer):
        self.pipe, self.peer, self.stats = pipe, peer, {}
        self._disable = peer.enable(pipe)

    def __call__(self, *args, **kwargs):
        return self.pipe(*args, **kwargs)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._disable()


def measure(pipe, name: str, configs: list[OptConfig] | Peer, *, steps: int, size: int, cfg: float, repeats: int,
            reference: np.ndarray | None, n_prompts: int = len(PROMPTS)) -> Measurement:
    """Warm up once, time ``repeats`` calls, sample peak memory, compare with ``reference``. ``configs`` is a
    recipe (a list of configs) or a :class:`~diffspeed.bench.peers.Peer`."""
    from diffspeed.bench.memory import peak_memory

    is_peer = isinstance(configs, Peer)
    m = Measurement(name, [{"peer": configs.package, **configs.settings}] if is_peer else
                    [c.to_dict() for c in configs])
    try:
        if is_peer and configs.missing():
            raise RecipeError([configs.missing()], name)
        fast = _PeerRunner(pipe, configs) if is_peer else Accelerated(pipe, configs)
    except RecipeError as err:
        m.skipped = "; ".join(err.problems)
        return m
    gen = functools.partial(_generate, steps=steps, size=size, cfg=cfg, n_prompts=n_prompts)
    with fast:
        t0 = time.perf_counter()
        gen(fast, pipe)
        _sync()
        m.first_call_s = time.perf_counter() - t0
        images = None
        for _ in range(repeats):
            _sync()
            t0 = time.perf_counter()
            images = gen(fast, pipe)
            _sync()
            m.seconds.append(time.perf_counter() - t0)
        m.stats = dict(fast.stats)
        m.peak_mb = peak_memory(lambda: gen(fast, pipe))["peak_mb"]
    if reference is not None:
        m.psnr_db, m.ssim = _fidelity(images, reference)
    return m


def environment() -> dict:
    import diffusers
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
           "transformers": transformers.__version__, "platform": platform.platform(),
           "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
           "device": "cpu"}
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    return env


def run_bench(pipe, model_name: str, suite, *, steps: int, size: int, cfg: float, repeats: int,
              fidelity: bool = True, n_prompts: int = len(PROMPTS)) -> dict:
    kw = dict(steps=steps, size=size, cfg=cfg, repeats=repeats, n_prompts=n_prompts)
    base = measure(pipe, "baseline", [], reference=None, **kw)
    reference = _generate(pipe, pipe, steps, size, cfg, n_prompts) if fidelity else None
    rows = [base]
    for name, configs in suite:
        print(f"  {name} ...", file=sys.stderr, flush=True)
        rows.append(measure(pipe, name, configs, reference=reference, **kw))
    return {"model": model_name, "steps": steps, "size": size, "cfg": cfg, "repeats": repeats,
            "scheduler": type(pipe.scheduler).__name__, "prompts": [p for p, _ in PROMPTS[:n_prompts]],
            "environment": environment(),
            "command": " ".join(["diffspeed", *sys.argv[1:]]) if sys.argv and "diffspeed" in sys.argv[0]
            else " ".join(sys.argv), "results": [asdict(r) | {"median_s": r.median} for r in rows]}


def report_markdown(data: dict) -> str:
    rows = data["results"]
    base = rows[0]["median_s"]
    base_mem = rows[0]["peak_mb"]
    env = data["environment"]
    lines = [f"# diffspeed bench: {data['model']}", "",
             f"- command: `{data['command']}`",
             f"- {len(data['prompts'])} prompts x {data['steps']} steps, {data['size']}x{data['size']}, "
             f"CFG {data['cfg']}, {data.get('scheduler', 'the model scheduler')}, {data['repeats']} timed repeats "
             "after 1 warm-up",
             f"- machine: {env['device']} ({env['cpu']}, {env['threads']} threads), {env['platform']}",
             f"- versions: python {env['python']}, torch {env['torch']}, diffusers {env['diffusers']}, "
             f"transformers {env['transformers']}", "",
             "| optimization | median s | spread s | speed vs baseline | peak MB | memory vs baseline | "
             "PSNR dB | SSIM | first call s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r["skipped"]:
            lines.append(f"| {r['name']} | skipped: {r['skipped']} | | | | | | | |")
            continue
        spread = (max(r["seconds"]) - min(r["seconds"])) if r["seconds"] else float("nan")
        speed = base / r["median_s"]
        mem = (r["peak_mb"] / base_mem) if r["peak_mb"] and base_mem else float("nan")
        psnr = "" if r["psnr_db"] is None else ("exact" if r["psnr_db"] == float("inf") else f"{r['psnr_db']:.1f}")
        ssim = "" if r["ssim"] is None else f"{r['ssim']:.3f}"
        lines.append(f"| {r['name']} | {r['median_s']:.3f} | {spread:.3f} | {speed:.2f}x | {r['peak_mb']:.0f} | "
                     f"{mem:.2f}x | {psnr} | {ssim} | {r['first_call_s']:.2f} |")
    lines += ["", "Speed > 1 is faster than the baseline; memory < 1 is leaner. PSNR/SSIM compare with the "
              "baseline's images (same prompts and seeds); random-weight models get no fidelity columns."]
    return "\n".join(lines) + "\n"


def save_report(data: dict, out: str | Path) -> tuple[Path, Path]:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    md, js = out.with_suffix(".md"), out.with_suffix(".json")
    md.write_text(report_markdown(data))
    js.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return md, js


def suite_from_recipe(path: str) -> list[tuple[str, list[OptConfig]]]:
    recipe = Recipe.load(path)
    return [(recipe.name or Path(path).stem, list(recipe.optimizations))]
