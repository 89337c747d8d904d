"""diffspeed: fast Stable Diffusion inference, with the quality cost of every speed-up measured.

exit codes:
  0    success
  1    runtime failure: out of memory, a failed write, a bench entry that failed (its report is still written),
       a tune run in which no candidate meets the goal (its report is still written)
  2    invalid input: usage, validation, unknown names, unreadable or hostile files
  130  interrupted (Ctrl-C)
Errors are one line on stderr; --debug shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import warnings
from pathlib import Path

from diffspeed.errors import DiffspeedError, DiffspeedRuntimeError

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
# what a command was doing when it ran out of memory, and what to try instead
_OUT_OF_MEMORY = {
    "generate": ("generating", "try --preset low-vram-6gb (or low-vram-4gb), or a smaller --width/--height/"
                               "--batch-size"),
    "bench": ("benchmarking", "try --preset low-vram-6gb or a smaller --size"),
    "convert": ("converting", "try --no-verify, which skips loading the result back"),
}


# GenerateRequest fields -> (option strings, extra help) where the CLI's name differs from --field-name
_FLAG_NAMES = {"negative_prompt": ("-n", "--negative-prompt"), "mask_image": ("--mask", "--mask-image")}
_GROUPS = {"init_image": "img2img / inpaint / hires fix", "controlnet": "ControlNet / SDXL refiner"}


def add_request_arguments(parser) -> None:
    """One option per :class:`~diffspeed.request.GenerateRequest` field, derived from the model: its name,
    type, default and description (``prompt`` is positional; booleans get ``--x/--no-x``)."""
    import typing

    from diffspeed.request import GenerateRequest

    group = parser
    for name, info in GenerateRequest.model_fields.items():
        if name in _GROUPS:
            group = parser.add_argument_group(_GROUPS[name])
        help_text = info.description or name
        if name == "prompt":
            group.add_argument("prompt", help=help_text)
            continue
        flags = _FLAG_NAMES.get(name, (f"--{name.replace('_', '-')}",))
        default = info.default
        kinds = [t for t in typing.get_args(info.annotation) or (info.annotation,) if t is not type(None)]
        kind = next((t for t in kinds if t in (bool, int, float)), str)
        if kind is bool:
            group.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction, default=default,
                               help=f"{help_text} (default: {'on' if default else 'off'})")
            continue
        shown = "" if default is None or default == "" else f" (default: {default})"
        group.add_argument(*flags, dest=name, type=kind, default=default, help=help_text + shown)
    parser.add_argument("--no-overlay", dest="inpaint_overlay", action="store_false",
                        help="the same as --no-inpaint-overlay")


def request_from_args(args):
    """The :class:`GenerateRequest` of parsed ``args`` (see :func:`add_request_arguments`)."""
    from diffspeed.request import GenerateRequest

    return GenerateRequest(**{name: getattr(args, name) for name in GenerateRequest.model_fields})


def _add_generate(sub) -> None:
    from diffspeed.pipelines.load import DEFAULT_MODEL

    p = sub.add_parser("generate", help="text to image; writes PNGs with web-UI 'parameters' metadata")
    add_request_arguments(p)
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="shipped name (tiny-sd, tiny-sdxl), diffusers folder, .safetensors file or hub id")
    p.add_argument("--allow-pickle", action="store_true", help="allow .ckpt/.pt/.bin (read weights_only)")
    p.add_argument("--config-dir", default=None, help="diffusers folder whose configs describe a single-file "
                   "--model (default: detected SD 1.x / 2.x / SDXL full-size configs)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N, mps, xpu or xpu:N (default: cuda if "
                   "available, else cpu)")
    p.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: fp16 on GPU, fp32 on CPU)")
    p.add_argument("--out", default="outputs", help="output folder (created; files are never overwritten)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                   help="apply a LoRA (.safetensors, diffusers or kohya layout, or the shipped "
                   "tiny-sd-lora-monochrome), weight default 1 (repeatable)")
    p.add_argument("--fuse-lora", action="store_true", help="fold the LoRAs into the weights before generating")
    p.add_argument("--preset", default=None, help="a goal preset: quality, balanced, fastest, low-vram-8gb, "
                   "low-vram-6gb, low-vram-4gb: the recipe for this device's hardware class (see diffspeed presets)")
    p.add_argument("--recipe", default=None, help="a recipe file (.toml or .json) of optimizations")
    p.add_argument("--opt", action="append", default=[], metavar="NAME[:KEY=VALUE,...]",
                   help="add an optimization, e.g. --opt cfg_cutoff:fraction=0.5 (repeatable; after --recipe's)")
    p.add_argument("--accelerator", default=None, metavar="NAME[:WEIGHT]",
                   help="a step-distilled LoRA with its sampler, steps and guidance: lcm, tcd, hyper-sd or "
                   "lightning (tiny-sd ships an lcm one; others need --accelerator-lora); --steps/--cfg-scale win")
    p.add_argument("--accelerator-lora", default=None, metavar="FILE",
                   help="the distilled LoRA's .safetensors file (or folder) for --accelerator")
    p.set_defaults(func=cmd_generate, precheck=check_generate_args, loads_models=True)


def check_generate_args(args) -> None:
    """What can be checked before any model loads, without torch: the device's form and the output folder."""
    from diffspeed.pipelines.load import check_device

    check_device(args.device)
    check_out_dir(args.out, "out")
    accelerator_entries([args.accelerator] if args.accelerator else [], args.accelerator_lora)


def check_out_dir(path: str, field: str) -> None:
    """Fail now, not after the whole generation, if ``path`` cannot be (created as) a writable folder: write and
    remove a temporary file in it, or in the nearest existing folder it would be created in."""
    target = Path(path).expanduser()
    if target.exists() and not target.is_dir():
        raise DiffspeedError(f"{field}: {path} is a file; give a folder (it is created if missing)", field=field)
    here = next(p for p in (target, *target.parents) if p.exists())  # "." ends the chain of a relative path
    if not here.is_dir():
        raise DiffspeedError(f"{field}: cannot create {path}: {here} is a file", field=field)
    try:
        with tempfile.NamedTemporaryFile(dir=here, prefix=".diffspeed-write-check-"):
            pass
    except OSError as err:
        raise DiffspeedError(f"{field}: cannot write in {here} ({err.strerror or err})", field=field) from err


def _value(text: str):
    """A CLI value as TOML would read it: true/false, none, int, float, else the string itself."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_opt(spec: str) -> dict:
    """``name:key=value,key=value`` -> ``{"name": name, key: value, ...}``."""
    name, _, rest = spec.partition(":")
    item = {"name": name.strip()}
    for pair in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = pair.partition("=")
        if not eq:
            raise DiffspeedError(f"--opt {spec!r}: expected key=value, got {pair!r}", field="opt")
        item[key.strip()] = _value(value)
    return item


def build_recipe(recipe_path: str | None, opts: list[str], preset: str | None = None, device: str = "cpu",
                 accelerator: dict | None = None):
    """The preset's recipe for ``device``, then the recipe file's optimizations, then the ``--opt`` ones, then
    the ``--accelerator`` (a recipe entry, see :func:`diffspeed.optim.accelerator.parse_accelerator`)."""
    from diffspeed.core import Recipe

    data = {"optimization": []}
    if preset:
        from diffspeed.presets import preset_recipe

        data = preset_recipe(preset, device).to_dict()
    if recipe_path:
        base = Recipe.load(recipe_path).to_dict()
        data = base | {"optimization": data["optimization"] + base.get("optimization", [])}
    data["optimization"] = data.get("optimization", []) + [parse_opt(o) for o in opts] + \
        ([accelerator] if accelerator else [])
    return Recipe.from_dict(data, source=" + ".join(filter(None, [preset and f"preset {preset}", recipe_path,
                                                                   opts and "--opt",
                                                                   accelerator and "--accelerator"])) or "--opt")


def cmd_generate(args) -> int:
    import diffspeed
    from diffspeed.generate import resolve_sampling
    from diffspeed.hardware import SlowDtypeWarning
    from diffspeed.pipelines.load import resolve_device
    from diffspeed.resolve import Resolver

    request = request_from_args(args)  # steps, sampler, cfg_scale: None lets resolve_sampling decide
    resolver = Resolver()
    resolver.check(request)  # a missing image or ControlNet/refiner folder fails before any model loads
    from diffspeed.pipelines.lora import parse_lora_spec, resolve_lora_path

    loras = [(resolve_lora_path(p), w) for p, w in map(parse_lora_spec, args.lora)]  # fail before loading
    # only a preset depends on the device (its hardware class): finding out whether CUDA is there needs torch,
    # which a recipe file's or an --opt's validation does not
    device = str(resolve_device(args.device)) if args.preset else (args.device or "cpu")
    accelerator = accelerator_entries([args.accelerator] if args.accelerator else [], args.accelerator_lora)
    recipe = build_recipe(args.recipe, args.opt, args.preset, device, accelerator[0] if accelerator else None)
    resolve_sampling(request, recipe)  # a request/recipe sampler conflict fails before any model loads
    pipe = diffspeed.load(args.model, dtype=args.dtype, device=args.device, allow_pickle=args.allow_pickle,
                          config_dir=args.config_dir)
    if loras:
        from diffspeed.pipelines.lora import fuse_loras, load_lora

        for path, weight in loras:
            load_lora(pipe, path, weight=weight)
        if args.fuse_lora:
            fuse_loras(pipe)
    with warnings.catch_warnings(record=True) as caught:  # quiet_loading hides UserWarnings: keep ours
        warnings.simplefilter("always", SlowDtypeWarning)
        fast = diffspeed.accelerate(pipe, recipe, strict=False)  # no-effect optimizations are printed as events
    for w in caught:
        if issubclass(w.category, SlowDtypeWarning):
            print(f"diffspeed: warning: {w.message}", file=sys.stderr)
    with fast:
        result = diffspeed.generate(pipe, request, runner=fast if recipe.optimizations else None,
                                    preset=args.preset, resolver=resolver)
    for path in diffspeed.save_images(result, args.out):
        print(path)
    if recipe.optimizations:
        print("optimizations: " + ", ".join(c.name for c in recipe.optimizations))
        print("stats: " + ", ".join(f"{k}={v}" for k, v in sorted(result.stats.items())))
    for event in result.events:  # NaN fallbacks, optimizations without effect, a prompt cut at 77 tokens
        print(event)
    used = result.request
    print(f"{len(result.images)} image(s), seed {result.seeds[0]}, {used.sampler} {used.steps} steps, CFG "
          f"{used.cfg_scale:g}: {result.seconds_per_image:.2f} s/image, {result.steps_per_second:.2f} it/s")
    return 0


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="speed, peak memory and fidelity of presets, recipes and peers against a "
                       "same-run baseline, one process each; writes results.json, report.md and report.html")
    p.add_argument("--model", default="tiny-sd", help="shipped name, path, or random:sd15 / random:sdxl "
                   "(full-size architecture, random weights: speed and memory only)")
    e = p.add_argument_group("what to compare (default: every preset and every installed peer)")
    e.add_argument("--preset", action="append", default=[], help="a preset (quality, balanced, fastest, "
                   "low-vram-8gb, low-vram-6gb, low-vram-4gb; each resolved for this machine's hardware class) "
                   "or 'all' (repeatable)")
    e.add_argument("--recipe", action="append", default=[], help="a recipe file, .toml or .json (repeatable)")
    e.add_argument("--opt", action="append", default=[], metavar="NAME[:KEY=VALUE,...]",
                   help="optimizations that together form one more entry (repeatable)")
    e.add_argument("--suite", action="append", default=[], choices=["classic", "caching"],
                   help="classic: one entry per classic optimization; caching: DeepCache/ToMe/HyperTile/T-GATE")
    e.add_argument("--peers", action=argparse.BooleanOptionalAction, default=None,
                   help="also run the peers (DeepCache package, tomesd, diffusers' enable_*, compile, PAB hook and "
                   "documented settings, optimum-intel's OpenVINO pipeline: in the interpreter $DIFFSPEED_PEER_PYTHON "
                   "names, made by tools/peer_venv.sh); default: on when nothing else is chosen")
    e.add_argument("--accelerator", action="append", default=[], metavar="NAME[:WEIGHT]",
                   help="one more entry: a step-distilled LoRA (lcm, tcd, hyper-sd, lightning), run at its "
                   "recommended steps, CFG and sampler while the baseline keeps --steps/--cfg-scale (repeatable)")
    e.add_argument("--accelerator-lora", default=None, metavar="FILE",
                   help="the distilled LoRA's .safetensors file (or folder) for every --accelerator (default: the "
                   "one shipped for the model: tiny-sd lcm)")
    e.add_argument("--only", action="append", default=[], help="keep only entries whose name contains this")
    e.add_argument("--plugin", action="append", default=[], help="module or .py file registering more "
                   "optimizations, imported by every entry's process")
    q = p.add_argument_group("workload")
    q.add_argument("--queue", default=None, help="tiny, seed001 (the SDXL guide's 4 prompts) or a JSON/TOML "
                   "file of {prompt, seed}; default: tiny for the tiny models, seed001 otherwise")
    q.add_argument("--prompts", type=int, default=None, help="use only the first N prompts of the queue")
    q.add_argument("--adherence", type=int, default=None, metavar="N",
                   help="the queue is the first N of the colour check's 60 held-out prompts (seeds 0..N-1), "
                   "for prompt adherence (background/shape accuracy, reported for every colour-check queue)")
    q.add_argument("--steps", type=int, default=20, help="denoising steps of every entry")
    q.add_argument("--size", type=int, default=None, help="image edge in pixels (default: the model's; 256 "
                   "for random:)")
    q.add_argument("--sampler", default="DPM++ 2M", help="sampler of every entry, baseline included (default: "
                   "DPM++ 2M, as diffspeed generate; 'model' keeps the model's own scheduler)")
    q.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance scale of every entry "
                   "but an --accelerator's (default: the model card's recommended scale, tiny-sd 3; else 7)")
    q.add_argument("--runs", type=int, default=5, help="timed passes over the queue (seed 001: 5)")
    q.add_argument("--warmup", type=int, default=1, help="warm-up images before timing (compile happens here)")
    q.add_argument("--device", default=None, help="cpu, cuda, cuda:N, mps, xpu or xpu:N (default: cuda if "
                   "available, else cpu)")
    q.add_argument("--dtype", default=None, help="load dtype: fp32, fp16, bf16 (default: fp16 on GPU, fp32 CPU)")
    q.add_argument("--threads", type=int, default=None, help="torch CPU threads per entry (default: torch's)")
    q.add_argument("--timeout", type=float, default=1800.0, help="seconds one entry may take before it is "
                   "recorded as failed")
    p.add_argument("--out", default=None, help="report folder (default bench-results/<model>)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_bench, precheck=check_bench_args, loads_models=True)


def bench_out(args) -> str:
    return args.out or f"bench-results/{args.model.replace(':', '-').replace('/', '_')}"


def check_bench_args(args) -> None:
    """The device's form and the report folder, before any entry runs (without torch)."""
    from diffspeed.pipelines.load import check_device

    check_device(args.device)
    check_out_dir(bench_out(args), "out")
    if args.adherence is not None:
        from diffspeed.bench.queue import HELD_OUT
        from diffspeed.errors import check_range

        check_range("adherence", args.adherence, 1, HELD_OUT)
        if args.queue:
            raise DiffspeedError("adherence: --adherence N is the queue (N held-out colour-check prompts); give it "
                                 "or --queue, not both", field="adherence")
    accelerator_entries(args.accelerator, args.accelerator_lora)


def accelerator_entries(specs: list[str], lora: str | None) -> list[dict]:
    """The recipe entries of ``--accelerator`` specs (each with ``--accelerator-lora``), validated without torch
    (generate takes one, bench several)."""
    if lora is not None and not specs:
        raise DiffspeedError("accelerator-lora: give --accelerator NAME to say which method the file is for",
                             field="accelerator-lora")
    if lora is not None:
        from diffspeed.pipelines.lora import resolve_lora_path

        try:
            path = resolve_lora_path(lora)
        except DiffspeedError as err:
            raise DiffspeedError(f"accelerator-lora: {str(err).removeprefix('lora: ')}",
                                 field="accelerator-lora") from None
        lora = str(path.resolve()) if Path(lora).expanduser().exists() else lora  # the workers' cwd may differ
    from diffspeed.optim.accelerator import parse_accelerator

    return [parse_accelerator(spec, lora, field="accelerator") for spec in specs]


def bench_entries(args, device: str, size: int | None):
    from diffspeed.bench.peers import default_peers
    from diffspeed.bench.runner import SUITES, Entry, preset_entries, suite_from_recipe

    chose = bool(args.preset or args.recipe or args.opt or args.suite or args.accelerator)
    presets = "all" if not chose or "all" in args.preset else args.preset
    entries = preset_entries(presets, device) if (presets == "all" or presets) else []
    for path in args.recipe:
        entries += suite_from_recipe(path)
    if args.opt:
        recipe = build_recipe(None, args.opt)
        entries.append(Entry.of_recipe(recipe, " + ".join(args.opt), "--opt"))
    for suite in args.suite:
        entries += SUITES[suite](size or 64)
    for spec, table in zip(args.accelerator, accelerator_entries(args.accelerator, args.accelerator_lora)):
        name = f"accelerator {spec.strip().lower()}"  # its steps / CFG: bench's with_accelerator_settings
        entries.append(Entry(name, "recipe", "--accelerator", {"optimization": [table]}))
    if args.peers or (args.peers is None and not chose):
        entries += [Entry.of_peer(p) for p in default_peers()]
    if args.only:
        entries = [e for e in entries if any(o in e.name for o in args.only)]
    return entries


def cmd_bench(args) -> int:
    from diffspeed.bench.queue import default_queue, load_queue
    from diffspeed.bench.runner import bench
    from diffspeed.pipelines.load import resolve_device, silence_libraries

    silence_libraries()  # main()'s quiet_loading, now that the libraries load
    device = str(resolve_device(args.device))
    entries = bench_entries(args, device, args.size)
    if args.adherence is not None:
        from diffspeed.bench.queue import colour_check_queue

        queue = colour_check_queue(args.adherence)
    else:
        queue = load_queue(args.queue) if args.queue else default_queue(args.model)
    out = bench_out(args)
    data = bench(args.model, entries=entries, queue=queue, prompts=args.prompts, steps=args.steps, size=args.size,
                 sampler=None if args.sampler == "model" else args.sampler, cfg=args.cfg_scale, runs=args.runs,
                 warmup=args.warmup, device=args.device,
                 dtype=args.dtype, out=out, timeout=args.timeout, plugins=args.plugin, threads=args.threads,
                 progress=not args.quiet)
    print((Path(out) / "report.md").read_text())
    failed = [e["name"] for e in data["entries"] if e["status"] == "failed"]
    print(f"wrote {out}/results.json, report.md, report.html" + (f"; failed: {', '.join(failed)}" if failed else ""))
    if failed:  # the report is complete, but a benchmark with holes must not pass a CI step
        print(f"diffspeed: error: {len(failed)} bench entr{'y' if len(failed) == 1 else 'ies'} failed: "
              f"{', '.join(failed)} (see {out}/report.md)", file=sys.stderr)
        return EXIT_FAILURE
    return 0


def _add_tune(sub) -> None:
    p = sub.add_parser("tune", help="search the optimizations for the fastest recipe on this model and machine within "
                       "a memory budget and a fidelity floor, measured with the bench; writes tuned.toml and a report")
    p.add_argument("--model", default="tiny-sd", help="shipped name, path, or random:sd15 / random:sdxl (random "
                   "weights: speed and memory only, no fidelity floor)")
    w = p.add_argument_group("workload (what every candidate and the baseline run)")
    w.add_argument("--size", default=None, metavar="WxH", help="image size, WIDTHxHEIGHT or one edge (default: the "
                   "model's; 256 for random:)")
    w.add_argument("--steps", type=int, default=20, help="denoising steps")
    w.add_argument("--sampler", default="DPM++ 2M", help="sampler ('model' keeps the model's own scheduler)")
    w.add_argument("--cfg-scale", type=float, default=None, help="CFG scale (default: the model card's, tiny-sd 3; "
                   "else 7)")
    w.add_argument("--runs", type=int, default=3, help="timed passes of a full measurement (screening: one pass over "
                   "one prompt)")
    w.add_argument("--device", default=None, help="cpu, cuda, cuda:N, mps, xpu or xpu:N (default: cuda if "
                   "available, else cpu)")
    w.add_argument("--dtype", default=None, help="load dtype: fp32, fp16, bf16 (default: fp16 on GPU, fp32 CPU)")
    w.add_argument("--threads", type=int, default=None, help="torch CPU threads per candidate (default: torch's)")
    w.add_argument("--timeout", type=float, default=1800.0, help="seconds one candidate may take")
    g = p.add_argument_group("goal")
    g.add_argument("--max-memory", default=None, metavar="SIZE", help="peak memory budget, e.g. 6GB, 6144MB, 5.5GiB "
                   "(peak RSS on the CPU, allocated memory on CUDA; default: none)")
    g.add_argument("--min-ssim", type=float, default=None, help="fidelity floor: SSIM to the baseline's images, 0..1")
    g.add_argument("--min-psnr", type=float, default=None, help="fidelity floor: PSNR to the baseline's images, dB")
    g.add_argument("--min-adherence", type=float, default=None, help="floor on the colour check's accuracy "
                   "(background and shape, averaged; the tiny models), 0..1")
    s = p.add_argument_group("search")
    s.add_argument("--time-budget", default="30m", help="measuring time, e.g. 10m, 90s, 1h30m (seconds if bare); "
                   "the search stops in time and reports the best so far")
    s.add_argument("--include", action="append", default=[], metavar="NAMES", help="search only these "
                   "optimizations (comma-separated, repeatable; also the opt-in ones: sampler, accelerator, freeu, "
                   "compile, openvino)")
    s.add_argument("--exclude", action="append", default=[], metavar="NAMES", help="never search these "
                   "(comma-separated, repeatable)")
    s.add_argument("--seed", type=int, default=0, help="seed of the search's random choices: the same seed and "
                   "measurements give the same search")
    s.add_argument("--strategy", default="model", choices=["model", "random"], help="model: screen main effects, "
                   "an additive surrogate, then full runs of the best; random: random full runs (for comparison)")
    s.add_argument("--batch", type=int, default=4, help="candidates per bench run")
    s.add_argument("--promote", type=int, default=4, help="screened candidates measured in full")
    s.add_argument("--no-presets", dest="presets", action="store_false", help="do not seed the search with the "
                   "presets (nor compare with them)")
    p.add_argument("--out", default=None, help="folder for tuned.toml, the reports and the resumable log "
                   "measurements.jsonl (default tune-results/<model>; a rerun continues from its log)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_tune, precheck=check_tune_args, loads_models=True)


def check_tune_args(args) -> None:
    """Every setting, before anything loads (without torch): one line naming the field, exit 2."""
    from diffspeed.tune.options import TuneOptions

    args.tune_options = TuneOptions(
        model=args.model, size=args.size, steps=args.steps, sampler=None if args.sampler == "model" else args.sampler,
        cfg=args.cfg_scale, max_memory_mb=args.max_memory, min_ssim=args.min_ssim, min_psnr=args.min_psnr,
        min_adherence=args.min_adherence, time_budget_s=args.time_budget, include=tuple(args.include),
        exclude=tuple(args.exclude), out=args.out, seed=args.seed, runs=args.runs, batch=args.batch,
        promote=args.promote, presets=args.presets, strategy=args.strategy, device=args.device, dtype=args.dtype,
        threads=args.threads, timeout_s=args.timeout)
    check_out_dir(args.tune_options.out_dir(), "out")


def cmd_tune(args) -> int:
    from diffspeed.pipelines.load import silence_libraries
    from diffspeed.tune.run import tune

    silence_libraries()  # main()'s quiet_loading, now that the libraries load
    result = tune(options=args.tune_options, progress=not args.quiet)
    print(result.message)
    for t in result.front:
        r = t.result
        print(f"  front: {t.label} -- {r['speed']:.2f}x, peak {r['memory_mb']:.0f} MB"
              + (f", SSIM {r['ssim']:.3f}" if r.get("ssim") is not None else ""))
    for note in result.notes:
        print(f"note: {note}")
    print("wrote " + ", ".join(result.files.values()))
    if result.choice is None:
        print(f"diffspeed: error: {result.message}", file=sys.stderr)
        return EXIT_FAILURE
    return 0


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="checkpoint (.ckpt/.pt/.pth/.bin/.safetensors) -> verified .safetensors "
                       "in the original layout; pickles are read weights-only, never unpickled in full")
    p.add_argument("checkpoint", metavar="IN", help=".ckpt/.pt/.pth/.bin (read weights-only) or .safetensors")
    p.add_argument("output", metavar="OUT", help="the .safetensors file to write")
    p.add_argument("--fp16", action="store_true", help="cast floating weights to float16 (halves the file)")
    p.add_argument("--prune", action="store_true", help="drop EMA copies (model_ema.*), VAE training loss, "
                   "global_step and other non-weight entries")
    p.add_argument("--use-ema", action="store_true", help="replace the UNet weights by their EMA copies")
    p.add_argument("--vae", default=None, help="bake in this VAE (original layout, .safetensors or pickle)")
    p.add_argument("--config-dir", default=None, help="diffusers folder describing the model, for the "
                   "verification load (default: detected SD 1.x / 2.x / SDXL full-size configs)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--no-verify", action="store_true", help="skip loading OUT back (saves time and memory)")
    p.set_defaults(func=cmd_convert, loads_models=True)


def cmd_convert(args) -> int:
    from diffspeed.pipelines.convert import convert_checkpoint
    from diffspeed.pipelines.load import silence_libraries

    silence_libraries()  # main()'s quiet_loading, now that the libraries load

    report = convert_checkpoint(args.checkpoint, args.output, fp16=args.fp16, prune=args.prune, vae=args.vae,
                                force=args.force, use_ema=args.use_ema, config_dir=args.config_dir,
                                verify=not args.no_verify)
    print(report.summary())
    return 0


def cmd_optimizations(args) -> int:
    from diffspeed.core import all_optimizations

    if args.matrix:
        from diffspeed.core.optimization import compatibility_matrix

        print(compatibility_matrix(document=True), end="")
        return 0

    for name, cls in sorted(all_optimizations().items()):
        flags = " [must be last]" if cls.last else ""
        print(f"{name}: {cls.summary}{flags}")
        for d in cls.Config.describe():
            allowed = (f"one of {', '.join(map(str, d['choices']))}" if d["choices"]
                       else f"{d['range'][0]}..{d['range'][1]}" if d["range"] else d["type"])
            print(f"    {d['field']} = {d['default']!r}  ({allowed})  {d['help']}")
        if not cls.Config.describe():
            print("    (no fields)")
    return 0


def cmd_presets(args) -> int:
    """Each preset: what it is for, and the recipe it resolves to on this machine (or every class's), and why."""
    from diffspeed import hardware
    from diffspeed.core.recipe import describe_tables
    from diffspeed.presets import CLASSES, PRESETS, load_preset, profile_class

    if args.probe:  # the only path that imports torch: it times a few small kernels, then caches the ratios
        profile = hardware.probe(device=_probe_device(), refresh=True)
    else:
        profile = hardware.detect("cpu")
    here, why = profile_class(profile)
    if args.profile:
        here, why = args.profile, f"chosen with --profile (this machine resolves to {here}: {why})"
    print(f"hardware: {profile.summary()}")
    print(f"presets resolve to {here}: {why}")
    if profile.kind == "cpu" and Path("/proc/driver/nvidia").exists():  # knowing more needs torch (CUDA)
        print("an NVIDIA driver is present: on the GPU the presets resolve to a cuda class; "
              "`diffspeed presets --probe` shows which")
    for name in PRESETS:
        preset = load_preset(name)
        print(f"\n{name}: {' '.join(preset.description.split())}")
        for cls in CLASSES if args.all_profiles else (here,):
            mark = " (here)" if args.all_profiles and cls == here else ""
            print(f"    {cls}{mark}: {' '.join(preset.uses[cls].split())}")
            print(f"        recipe: {describe_tables(preset.entries[cls]) or 'nothing'}")
            print("        chosen on: " + " ".join(preset.chosen_on[cls].split()))
    return 0


def _probe_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends "(default: X)" to an option's help, unless its help already says it or there is nothing to say
    (a flag, an unset value, an empty list). Descriptions keep their line breaks (the exit-code table)."""

    def _get_help_string(self, action):
        text, default = action.help or "", action.default
        if (not action.option_strings or "default" in text or default is None or default is False
                or default == [] or default == "" or default is argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):  # argparse's own errors: one line, exit 2, like ours
        self.exit(EXIT_USAGE, f"diffspeed: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from diffspeed import __version__

    parser = _Parser(prog="diffspeed", description=__doc__)
    parser.add_argument("--version", action="version", version=f"diffspeed {__version__}")
    parser.add_argument("--debug", action="store_true", help="on an error, show the traceback instead of one line")
    parser.set_defaults(precheck=None, loads_models=False)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_generate(sub)
    _add_bench(sub)
    _add_serve(sub)
    _add_batch(sub)
    _add_tune(sub)
    _add_convert(sub)
    p = sub.add_parser("presets", help="list the goal presets: what each is for, the recipe each resolves to on "
                       "this machine and why, and the numbers it was chosen on")
    p.add_argument("--probe", action="store_true", help="measure bf16/fp16 against fp32 here now (seconds; loads "
                   "torch) and cache the result; without it the CPU flags and any earlier probe decide")
    p.add_argument("--profile", default=None, choices=["cuda-bf16", "cuda-fp16", "cpu-bf16", "cpu-fp32"],
                   help="show the recipes of this hardware class instead of this machine's")
    p.add_argument("--all-profiles", action="store_true", help="show every hardware class's recipe")
    p.set_defaults(func=cmd_presets)
    p = sub.add_parser("optimizations", help="list every optimization with its fields, defaults and ranges")
    p.add_argument("--matrix", action="store_true", help="print the optimization x workflow compatibility matrix")
    p.set_defaults(func=cmd_optimizations)
    for p in sub.choices.values():  # --debug also after the command (unset there, the global one's value stays)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    return parser


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="the web UI's HTTP API (/sdapi/v1) and a web page, with a bounded queue, "
                       "request batching and a recipe per request")
    p.add_argument("--model", default="tiny-sd", help="the model requests get by default: a shipped name, a "
                   ".safetensors file or a diffusers folder (default: tiny-sd)")
    p.add_argument("--preset", default=None, help="the preset a request that names none gets (default: none)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine "
                   "only; anything else without --api-auth prints a warning)")
    p.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    p.add_argument("--api-auth", default=None, metavar="USER:PASS[,USER2:PASS2]",
                   help="HTTP Basic credentials required on every route (default: none)")
    p.add_argument("--max-queue", type=int, default=32, help="requests that may wait; more get 429 with "
                   "Retry-After (default: 32)")
    p.add_argument("--max-batch", type=int, default=8, help="images per pipeline call when compatible requests "
                   "are batched; 1 turns batching off (default: 8)")
    p.add_argument("--models-dir", default=None, help="a folder of more models (*.safetensors, diffusers folders, "
                   "Lora/, controlnet/, refiner/) that requests may name (default: none)")
    p.add_argument("--outputs-dir", default="outputs/server", help="where save_images writes (default: "
                   "outputs/server)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a request may take, queued and "
                   "running (default: 600)")
    p.add_argument("--max-steps", type=int, default=150, help="most steps a request may ask for (default: 150)")
    p.add_argument("--max-size", type=int, default=2048, help="largest width and height, hires size included "
                   "(default: 2048)")
    p.add_argument("--max-images", type=int, default=8, help="most images per request, batch_size * n_iter "
                   "(default: 8)")
    p.add_argument("--cache-models", type=int, default=2, help="loaded models kept in RAM for switching "
                   "(default: 2)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N, mps, xpu or xpu:N (default: cuda if "
                   "available, else cpu)")
    p.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: fp16 on GPU, fp32 on CPU)")
    ray = p.add_argument_group("Ray Serve", "scale out: the same API, generation on Ray Serve replicas (one GPU "
                               "each where the cluster has GPUs); needs pip install 'ray[serve]'")
    ray.add_argument("--ray", action="store_true", help="serve on Ray Serve instead of in this process")
    ray.add_argument("--replicas", type=int, default=None, help="model replicas, each with its own queue "
                     "(default: 1)")
    ray.add_argument("--min-replicas", type=int, default=None, help="autoscale: fewest replicas (0 allowed)")
    ray.add_argument("--max-replicas", type=int, default=None, help="autoscale: most replicas (scales on ongoing "
                     "requests, --max-batch per replica)")
    ray.add_argument("--ray-address", default=None, metavar="ADDR", help="an existing cluster (e.g. "
                     "ray://head:10001 or auto; default: start a local one on this machine)")
    p.set_defaults(func=cmd_serve, precheck=check_serve_args, loads_models=True)


def check_serve_args(args) -> None:
    from diffspeed.pipelines.load import check_device
    from diffspeed.server.config import parse_auth

    check_device(args.device)
    parse_auth(args.api_auth)
    ray_options = {"--replicas": args.replicas, "--min-replicas": args.min_replicas,
                   "--max-replicas": args.max_replicas, "--ray-address": args.ray_address}
    given = [flag for flag, value in ray_options.items() if value is not None]
    if given and not args.ray:
        raise DiffspeedError(f"{given[0]}: only with --ray", field=given[0].lstrip("-").replace("-", "_"))
    if args.replicas is not None and (args.min_replicas is not None or args.max_replicas is not None):
        raise DiffspeedError("--replicas: give either --replicas N or --min-replicas/--max-replicas, not both",
                             field="replicas")
    if args.ray:
        from diffspeed.server.ray_serve import check_replicas

        check_replicas(args.replicas or 1, args.min_replicas, args.max_replicas)


def cmd_serve(args) -> int:
    try:
        import uvicorn

        from diffspeed.server.app import create_app
    except ImportError as err:
        raise DiffspeedError(f"serve needs the server extra: pip install 'diffspeed[server]' ({err.name} is "
                             f"missing)", field="serve") from err
    from diffspeed.server.config import Limits, ServerConfig, parse_auth

    config = ServerConfig(model=args.model, preset=args.preset, host=args.host, port=args.port,
                          api_auth=parse_auth(args.api_auth), max_queue=args.max_queue, max_batch=args.max_batch,
                          models_dir=args.models_dir, outputs_dir=args.outputs_dir, request_timeout=args.timeout,
                          cache_models=args.cache_models, device=args.device, dtype=args.dtype,
                          limits=Limits(max_width=args.max_size, max_height=args.max_size, max_steps=args.max_steps,
                                        max_images=args.max_images))
    if config.exposed and not config.api_auth:
        print(f"diffspeed: warning: listening on {config.host} without --api-auth: anyone who can reach this "
              f"port can generate and read the server's model list", file=sys.stderr)
    if args.ray:
        from diffspeed.server.ray_serve import serve_forever

        if args.ray_address is None:
            _check_port(config.host, config.port)
        serve_forever(config, replicas=args.replicas or 1, min_replicas=args.min_replicas,
                      max_replicas=args.max_replicas, address=args.ray_address)
        return 0
    _check_port(config.host, config.port)
    app = create_app(config)
    server = _Server(uvicorn.Config(app, host=config.host, port=config.port, log_level="info",
                                    timeout_graceful_shutdown=config.shutdown_grace + 10))
    print(f"diffspeed: serving {config.model} on http://{config.host}:{config.port}/ (API: /sdapi/v1, docs: /docs)",
          file=sys.stderr)
    server.run()
    return 0


def _check_port(host: str, port: int) -> None:
    import socket

    try:
        with socket.create_server((host, port), reuse_port=False):
            pass
    except OSError as err:
        raise DiffspeedRuntimeError(f"port: cannot listen on {host}:{port} ({err.strerror or err}); is another "
                                    f"server running? pick another --port", field="port") from err


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, whose SIGTERM/Ctrl-C first closes the job queue: queued requests are answered 503
        at once and the running batch may finish (``shutdown_grace``), so no request is left without an answer
        while uvicorn waits for its connections."""

        def handle_exit(self, sig, frame) -> None:
            import signal
            import threading

            state = getattr(self.config.app.state, "diffspeed", None)
            if state is not None and not state.backend.closing:
                threading.Thread(target=state.backend.shutdown_now, args=(state.config.shutdown_grace,),
                                 daemon=True).start()
            super().handle_exit(sig, frame)
            # uvicorn re-raises a captured signal after its graceful shutdown, so the process would die by
            # SIGTERM; a finished graceful shutdown is a success here: exit 0 (Ctrl-C still exits 130)
            captured = getattr(self, "_captured_signals", None)
            if isinstance(captured, list) and sig == signal.SIGTERM:
                captured[:] = [s for s in captured if s != signal.SIGTERM]

    return Server


def _Server(config):  # noqa: N802 -- a class made on demand, so the CLI imports uvicorn only to serve
    return _server_class()(config)


def _add_batch(sub) -> None:
    from diffspeed.pipelines.load import DEFAULT_MODEL

    p = sub.add_parser("batch", help="bulk generation from a JSONL/CSV/TXT file of requests, resumable; in-process "
                       "or on Ray Data (--ray)")
    p.add_argument("prompts", help="a .jsonl (request fields per line, optional id), .csv (a header of field names) "
                   "or .txt (a prompt per line, # comments) file; image paths are relative to its folder")
    p.add_argument("--out", required=True, help="output folder: NNNNN-<seed>.png and results.jsonl; a rerun skips "
                   "complete outputs")
    p.add_argument("--model", default=DEFAULT_MODEL, help="shipped name, diffusers folder, .safetensors file or hub id")
    p.add_argument("--preset", default=None, help="a goal preset (see diffspeed presets)")
    p.add_argument("--recipe", default=None, help="a recipe file (.toml or .json) of optimizations")
    p.add_argument("--opt", action="append", default=[], metavar="NAME[:KEY=VALUE,...]",
                   help="add an optimization (repeatable; after --recipe's)")
    p.add_argument("--ray", action="store_true", help="run the chunks on Ray Data, an actor (one model) per worker")
    p.add_argument("--ray-address", default=None, help="an existing Ray cluster (default: start a local one)")
    p.add_argument("--workers", type=int, default=1, help="model copies working at once (more than 1 needs --ray)")
    p.add_argument("--batch-size", type=int, default=1, help="most images per pipeline call; consecutive compatible "
                   "requests are grouped (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="a request without a seed gets this plus the number of "
                   "images before it (default: 0)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (and Ray CPUs) per worker "
                   "(default: a local Ray cluster's CPUs shared among the workers; 1 on --ray-address; in-process: "
                   "torch's)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N, mps, xpu or xpu:N (default: cuda if "
                   "available, else cpu)")
    p.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: fp16 on GPU, fp32 on CPU)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_batch, precheck=check_batch_args, loads_models=True)


def check_batch_args(args) -> None:
    from diffspeed.pipelines.load import check_device

    check_device(args.device)
    check_out_dir(args.out, "out")
    if args.workers > 1 and not args.ray:
        raise DiffspeedError(f"workers: {args.workers} workers need --ray; without it the chunks run in this "
                             f"process, one at a time", field="workers")
    if args.ray_address and not args.ray:
        raise DiffspeedError("ray-address: only with --ray", field="ray_address")


def cmd_batch(args) -> int:
    import signal

    from diffspeed.batch import run_batch

    device = args.device or "cpu"
    if args.preset:
        from diffspeed.pipelines.load import resolve_device

        device = str(resolve_device(args.device))
    recipe = build_recipe(args.recipe, args.opt, args.preset, device)

    def terminate(signum, frame):  # SIGTERM as Ctrl-C: the finally blocks shut Ray down and close results.jsonl
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        summary = run_batch(args.prompts, args.out, model=args.model, recipe=recipe, preset=args.preset,
                            ray=args.ray, ray_address=args.ray_address, workers=args.workers,
                            batch_size=args.batch_size, seed=args.seed, device=args.device, dtype=args.dtype,
                            threads=args.threads, progress=not args.quiet)
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(summary.line())
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (the table in the module docstring)."""
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("diffspeed: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader left (`diffspeed presets | head`): nothing to report
        with contextlib.suppress(OSError, ValueError, AttributeError):  # and keep Python's exit flush quiet
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE
    except Exception as err:
        if args.debug:
            raise
        code, message = _describe_failure(err, args.command)
        print(f"diffspeed: error: {message}", file=sys.stderr)
        return code


def _run(args) -> int:
    if args.precheck is not None:
        args.precheck(args)
    if not args.loads_models:  # listing commands: nothing to quieten, and quiet_loading would import diffusers
        return args.func(args)
    from diffspeed.pipelines.load import quiet_loading

    # stderr carries diffspeed's own one-line errors, not the libraries' chatter; deferred, so that validation
    # inside the command still runs without torch
    with quiet_loading(defer=True):
        return args.func(args)


def _describe_failure(err: Exception, command: str) -> tuple[int, str]:
    """(exit status, one line) for an error that reached the top."""
    if isinstance(err, DiffspeedError):
        return err.exit_code, " ".join(str(err).split())
    if _out_of_memory(err):
        doing, hint = _OUT_OF_MEMORY.get(command, (f"running {command}", "try a smaller workload"))
        return EXIT_FAILURE, f"out of memory while {doing}; {hint}"
    first = next(iter(str(err).strip().splitlines()), "")
    return EXIT_FAILURE, f"{type(err).__name__}: {first} (run with --debug for the traceback)"


def _out_of_memory(err: Exception) -> bool:
    torch = sys.modules.get("torch")  # a torch OOM means torch is loaded: never import it just to ask
    return isinstance(err, MemoryError) or (torch is not None and isinstance(err, torch.OutOfMemoryError))


if __name__ == "__main__":
    sys.exit(main())
