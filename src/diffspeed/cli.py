"""The ``diffspeed`` command line. Bad input prints one line naming the field and exits with status 2."""

from __future__ import annotations

import argparse
import sys

from diffspeed.errors import DiffspeedError

EXIT_USAGE = 2


def _add_generate(sub) -> None:
    from diffspeed.pipelines.load import DEFAULT_MODEL
    from diffspeed.pipelines.samplers import SAMPLERS
    from diffspeed.pipelines.workflows import HIRES_UPSCALERS

    p = sub.add_parser("generate", help="text to image; writes PNGs with web-UI 'parameters' metadata")
    p.add_argument("prompt")
    p.add_argument("-n", "--negative-prompt", default="")
    p.add_argument("--seed", type=int, default=-1, help="-1 (default) picks a random seed and reports it")
    p.add_argument("--steps", type=int, default=None, help="default 20, or the recipe's sampler steps")
    p.add_argument("--cfg-scale", type=float, default=7.0)
    p.add_argument("--width", type=int, default=None, help="default: the model's native size")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--sampler", default=None,
                   help=f"default DPM++ 2M, or the recipe's sampler; one of: {', '.join(SAMPLERS)}")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="shipped name (tiny-sd, tiny-sdxl), diffusers folder, .safetensors file or hub id")
    p.add_argument("--allow-pickle", action="store_true", help="allow .ckpt/.pt/.bin (read weights_only)")
    p.add_argument("--config-dir", default=None, help="diffusers folder whose configs describe a single-file "
                   "--model (default: detected SD 1.x / 2.x / SDXL full-size configs)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: fp16 on GPU, fp32 on CPU)")
    p.add_argument("--out", default="outputs", help="output folder (created; files are never overwritten)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                   help="apply a LoRA (.safetensors, diffusers or kohya layout), weight default 1 (repeatable)")
    p.add_argument("--fuse-lora", action="store_true", help="fold the LoRAs into the weights before generating")
    w = p.add_argument_group("img2img / inpaint / hires fix")
    w.add_argument("--init-image", default=None, help="img2img: start from this image (size: the image's, or "
                   "--width/--height)")
    w.add_argument("--mask", default=None, help="inpaint: mask image, white = repaint (needs --init-image)")
    w.add_argument("--denoising-strength", type=float, default=None,
                   help="0..1 (default 0.75 for img2img/inpaint, 0.7 for the hires pass)")
    w.add_argument("--mask-blur", type=int, default=4, help="inpaint mask edge blur in pixels, 0..64")
    w.add_argument("--no-overlay", action="store_true",
                   help="inpaint: keep the generated pixels outside the mask instead of pasting the original")
    w.add_argument("--hires-scale", type=float, default=1.0, help="hires fix: upscale factor 1..4 (1 = off)")
    w.add_argument("--hires-steps", type=int, default=0, help="hires fix: second-pass steps (0 = --steps)")
    w.add_argument("--hires-upscaler", default="Latent", help=f"hires fix upscaler: {', '.join(HIRES_UPSCALERS)}")
    c = p.add_argument_group("ControlNet / SDXL refiner")
    c.add_argument("--control-image", default=None, help="ControlNet: the control image (needs --controlnet)")
    c.add_argument("--controlnet", default=None, help="ControlNet: a diffusers ControlNetModel folder or a shipped "
                   "name (tiny-sd-controlnet-mask, tiny-sdxl-controlnet-mask)")
    c.add_argument("--control-scale", type=float, default=1.0, help="ControlNet weight, 0..2")
    c.add_argument("--control-start", type=float, default=0.0, help="fraction of the steps where control starts")
    c.add_argument("--control-end", type=float, default=1.0, help="fraction of the steps where control ends")
    c.add_argument("--refiner", default=None, help="SDXL refiner: shipped name (tiny-sdxl-refiner) or folder")
    c.add_argument("--refiner-switch-at", type=float, default=0.8,
                   help="fraction of the steps after which the refiner takes over, 0.01..1")
    c.add_argument("--refiner-mode", default="ensemble", help="ensemble (hand over noisy latents) or img2img "
                   "(refine the finished image at strength 1 - switch-at)")
    p.add_argument("--recipe", default=None, help="a recipe file (.toml or .json) of optimizations")
    p.add_argument("--opt", action="append", default=[], metavar="NAME[:KEY=VALUE,...]",
                   help="add an optimization, e.g. --opt cfg_cutoff:fraction=0.5 (repeatable; after --recipe's)")
    p.set_defaults(func=cmd_generate)


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


def build_recipe(recipe_path: str | None, opts: list[str]):
    from diffspeed.core import Recipe

    data = {"optimization": []}
    if recipe_path:
        base = Recipe.load(recipe_path)
        data = base.to_dict()
    data["optimization"] = data.get("optimization", []) + [parse_opt(o) for o in opts]
    return Recipe.from_dict(data, source=recipe_path or "--opt")


def cmd_generate(args) -> int:
    import diffspeed

    recipe = build_recipe(args.recipe, args.opt)
    chosen = next((c for c in recipe.optimizations if c.name == "sampler"), None)
    request = diffspeed.GenerateRequest(
        prompt=args.prompt, negative_prompt=args.negative_prompt, seed=args.seed,
        steps=args.steps if args.steps is not None else ((chosen and chosen.steps) or 20),
        cfg_scale=args.cfg_scale, width=args.width, height=args.height, batch_size=args.batch_size,
        sampler=args.sampler or (chosen and chosen.sampler) or "DPM++ 2M", init_image=args.init_image,
        mask_image=args.mask, denoising_strength=args.denoising_strength, mask_blur=args.mask_blur,
        inpaint_overlay=not args.no_overlay, hires_scale=args.hires_scale, hires_steps=args.hires_steps,
        hires_upscaler=args.hires_upscaler, control_image=args.control_image, controlnet=args.controlnet,
        control_scale=args.control_scale, control_start=args.control_start, control_end=args.control_end,
        refiner=args.refiner, refiner_switch_at=args.refiner_switch_at, refiner_mode=args.refiner_mode)
    from diffspeed.pipelines.lora import parse_lora_spec, resolve_lora_path

    loras = [(resolve_lora_path(p), w) for p, w in map(parse_lora_spec, args.lora)]  # fail before loading
    pipe = diffspeed.load(args.model, dtype=args.dtype, device=args.device, allow_pickle=args.allow_pickle,
                          config_dir=args.config_dir)
    if loras:
        from diffspeed.pipelines.lora import fuse_loras, load_lora

        for path, weight in loras:
            load_lora(pipe, path, weight=weight)
        if args.fuse_lora:
            fuse_loras(pipe)
    with diffspeed.accelerate(pipe, recipe) as fast:
        result = diffspeed.generate(pipe, request, runner=fast if recipe.optimizations else None)
        stats, events = result.stats, result.events
    for path in diffspeed.save_images(result, args.out):
        print(path)
    if recipe.optimizations:
        print("optimizations: " + ", ".join(c.name for c in recipe.optimizations))
        print("stats: " + ", ".join(f"{k}={v}" for k, v in sorted(stats.items())))
        for event in events:
            print(event)
    print(f"{len(result.images)} image(s), seed {result.seeds[0]}: {result.seconds_per_image:.2f} s/image, "
          f"{result.steps_per_second:.2f} it/s")
    return 0


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="time every optimization against a same-run baseline; write a report")
    p.add_argument("--model", default="tiny-sd", help="shipped name, path, or random:sd15 / random:sdxl "
                   "(full-size architecture, random weights: speed and memory only)")
    p.add_argument("--suite", default="classic", choices=["classic", "caching"],
                   help="classic: the classic menu; caching: feature caching / token merging with their peers")
    p.add_argument("--prompts", type=int, default=4, help="how many of the 4 built-in prompts to use (1..4)")
    p.add_argument("--sampler", default=None, help="sampler of every entry, baseline included (default: the "
                   "model's scheduler)")
    p.add_argument("--recipe", default=None, help="bench this recipe file instead of a suite")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--size", type=int, default=None, help="image edge in pixels (default: the model's)")
    p.add_argument("--cfg-scale", type=float, default=7.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", action="append", default=[], help="run only suite entries containing this text")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None, help="report path without suffix (default benchmarks/<model>)")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    from diffspeed.bench.runner import PROMPTS, SUITES, run_bench, save_report, suite_from_recipe
    from diffspeed.errors import check_range
    from diffspeed.generate import native_size
    from diffspeed.pipelines.load import load

    check_range("steps", args.steps, 1, 1000)
    check_range("repeats", args.repeats, 1, 100)
    check_range("prompts", args.prompts, 1, len(PROMPTS))
    if args.model.startswith("random:"):
        from diffspeed.bench.models import random_pipeline

        pipe = random_pipeline(args.model.split(":", 1)[1])
        fidelity = False
    else:
        pipe = load(args.model, device=args.device)
        fidelity = True
    pipe.set_progress_bar_config(disable=True)
    if args.sampler:
        from diffspeed.pipelines.samplers import get_sampler

        pipe.scheduler = get_sampler(args.sampler).build(pipe.scheduler.config)
    size = args.size or native_size(pipe)[0]
    check_range("size", size, 64, 2048)
    suite = suite_from_recipe(args.recipe) if args.recipe else SUITES[args.suite](size)
    if args.only:
        suite = [s for s in suite if any(o in s[0] for o in args.only)]
    data = run_bench(pipe, args.model, suite, steps=args.steps, size=size, cfg=args.cfg_scale,
                     repeats=args.repeats, fidelity=fidelity, n_prompts=args.prompts)
    name = args.out or f"benchmarks/{args.model.replace(':', '-').replace('/', '_')}-{args.suite}"
    md, js = save_report(data, name)
    print(md.read_text())
    print(f"wrote {md} and {js}")
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
    p.set_defaults(func=cmd_convert)


def cmd_convert(args) -> int:
    from diffspeed.pipelines.convert import convert_checkpoint

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


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: one line, exit 2, like ours
        self.exit(EXIT_USAGE, f"diffspeed: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from diffspeed import __version__

    parser = _Parser(prog="diffspeed", description=__doc__)
    parser.add_argument("--version", action="version", version=f"diffspeed {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_generate(sub)
    _add_bench(sub)
    _add_convert(sub)
    p = sub.add_parser("optimizations", help="list every optimization with its fields, defaults and ranges")
    p.add_argument("--matrix", action="store_true", help="print the optimization x workflow compatibility matrix")
    p.set_defaults(func=cmd_optimizations)
    return parser


def main(argv: list[str] | None = None) -> int:
    from diffspeed.pipelines.load import quiet_loading

    args = build_parser().parse_args(argv)
    try:
        with quiet_loading():  # stderr carries diffspeed's own one-line errors, not the libraries' chatter
            return args.func(args)
    except DiffspeedError as err:
        print(f"diffspeed: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("diffspeed: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
