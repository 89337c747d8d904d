"""The bench's report: ``report.md`` and ``report.html`` (summary table, one image grid per prompt, the
speed-vs-fidelity scatter with its Pareto front), drawn with matplotlib from what ``results.json`` holds.

Every speed and memory figure is a ratio to the baseline measured in the same run; the machine, the versions
and the exact command sit at the top of both reports.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

import numpy as np

from diffspeed._io import write_text_beside

FASTER = "speed > 1x is faster than the baseline; memory < 1x is leaner"


def _fmt(v, spec=".2f", none="") -> str:
    if v is None:
        return none
    if isinstance(v, float) and math.isinf(v):
        return "exact"
    return format(v, spec)


def summary_rows(data: dict) -> list[dict]:
    """One plain row per entry: the table both reports print."""
    out = []
    for r in data["entries"]:
        t, m, f, ratios = r.get("timing") or {}, r.get("memory") or {}, r.get("fidelity") or {}, r.get("ratios") or {}
        notes = []
        d = r.get("derived") or {}
        if "cache_hit_rate" in d:
            notes.append(f"cache hits {d['cache_hit_rate']:.0%}")
        if d.get("skipped_macs_fraction"):
            notes.append(f"MACs skipped {d['skipped_macs_fraction']:.0%}")
        if d.get("cfg_off_fraction"):
            notes.append(f"CFG off {d['cfg_off_fraction']:.0%} of calls")
        if d.get("nan_fallbacks"):
            notes.append(f"{d['nan_fallbacks']} fp32 VAE re-decodes")
        idle = sorted(k.split(":", 1)[1] for k, v in (r.get("stats") or {}).items() if k.startswith("no_effect:") and v)
        if idle:  # the effect check: applied, but did nothing for these calls
            notes.insert(0, f"no effect: {', '.join(idle)}")
        if r["status"] != "ok":
            notes.insert(0, f"{r['status']}: {r['error']}")
        a, sampling = r.get("adherence"), r.get("sampling") or {}
        # adherence: "-" where it cannot be measured (not colour-check prompts, random weights)
        bg, shape = ((f"{a['background']:.0%}", f"{a['shape']:.0%}") if a else
                     ("-", "-") if r["status"] == "ok" else ("", ""))
        out.append({"name": r["name"], "status": r["status"], "kind": r["kind"], "what": r.get("what", ""),
                    "median": _fmt(t.get("median_s"), ".3f"),
                    "range": f"{t['min_s']:.3f}-{t['max_s']:.3f}" if t else "",
                    "it_s": _fmt(t.get("it_per_s")),
                    "speed": _fmt(ratios.get("speed"), ".2f") + ("x" if ratios else ""),
                    "peak": _fmt(m.get("peak_mb"), ".0f"),
                    "memory": _fmt(ratios.get("memory"), ".2f") + ("x" if ratios else ""),
                    "psnr": _fmt(f.get("psnr_db"), ".1f"), "ssim": _fmt(f.get("ssim"), ".3f"),
                    "bg_acc": bg, "shape_acc": shape, "steps": _fmt(sampling.get("steps"), "d"),
                    "cfg": _fmt(sampling.get("cfg"), "g"), "sampler": sampling.get("sampler") or "",
                    "ms_ssim": _fmt(f.get("ms_ssim"), ".3f"), "lpips": _fmt(f.get("lpips"), ".3f"),
                    "setup": _fmt(r.get("setup_s")), "first": _fmt(r.get("first_call_s")),
                    "pareto": r["name"] in data.get("pareto", []), "notes": "; ".join(notes)})
    return out


COLUMNS = (("name", "entry"), ("steps", "steps"), ("cfg", "CFG"), ("sampler", "sampler"),
           ("median", "s/image (median)"), ("range", "min-max s"), ("it_s", "it/s"),
           ("speed", "speed vs baseline"), ("peak", "peak MB"), ("memory", "memory vs baseline"),
           ("psnr", "PSNR dB"), ("ssim", "SSIM"), ("bg_acc", "background acc."), ("shape_acc", "shape acc."),
           ("ms_ssim", "MS-SSIM"), ("lpips", "LPIPS"), ("setup", "setup s"), ("first", "first call s"),
           ("notes", "notes"))
FIDELITY_COLUMNS = ("psnr", "ssim", "ms_ssim", "lpips")
SAMPLING_COLUMNS = ("steps", "cfg", "sampler")


def columns(data: dict) -> list[tuple[str, str]]:
    """The table's columns: no fidelity for random weights; steps / CFG / sampler only when some entry ran with
    other ones than the baseline (an accelerator's few steps), so each row's are then shown."""
    def sampling(r):
        s = r.get("sampling") or {}
        return s.get("steps"), s.get("cfg"), s.get("sampler")

    base = next((r for r in data["entries"] if r.get("kind") == "baseline"), None)
    differ = base is not None and any(sampling(r) != sampling(base) for r in data["entries"] if r.get("sampling"))
    return [c for c in COLUMNS if not (data.get("fidelity_note") and c[0] in FIDELITY_COLUMNS)
            and (differ or c[0] not in SAMPLING_COLUMNS)]


def hardware_line(hw: dict) -> str:
    """The profile the numbers hold for: half-precision speed differs 100x between CPUs (issue 14)."""
    if hw["kind"] == "cuda":
        what = (f"CUDA {hw['name']}, {hw['capability']}, {hw['memory_mb'] or 0:.0f} MB, "
                f"SDPA {', '.join(hw['sdpa_backends']) or 'none'}")
    else:
        caps = "".join(f", {k}={v}" for k, v in (hw.get("isa_limits") or {}).items())
        what = (f"CPU {hw['name']}, capability {hw['capability']}{caps}, flags {' '.join(hw['flags']) or 'none'}, "
                f"{hw['cores']} cores, {(hw['memory_mb'] or 0) / 1024:.1f} GiB")
    ratios = "; ".join(f"{d} {op} {r:.3g}x the time of fp32" for d, ops in (hw.get("measured") or {}).items()
                       for op, r in ops.items()) or "not probed"
    return f"hardware: {what}, torch {hw.get('torch_version')}; probe ({hw.get('source')}): {ratios}"


def _header_lines(data: dict) -> list[str]:
    s, env = data["settings"], data["environment"]
    size = f"{s['width']}x{s['height']}" if s.get("width") else "native size"
    lines = [f"command: {data['command']}",
             f"model: {s['model']} ({s['model_kind']}); {len(s['queue'])} prompts x {s['runs']} runs after "
             f"{s['warmup']} warm-up image(s); {s['steps']} steps, {size}, CFG {s['cfg']:g}"
             + (" (the model card's)" if s.get("cfg_source") == "model card" else "")
             + f", sampler {s['sampler'] or 'the model default'}",
             f"machine: {env['device']} ({env['cpu']}, {env['cpu_count']} cores, {env['threads']} torch threads), "
             f"{env['platform']}",
             *([hardware_line(data["hardware"])] if data.get("hardware") else []),
             f"versions: python {env['python']}, torch {env['torch']}, diffusers {env['diffusers']}, "
             f"transformers {env['transformers']}" + (f", CUDA {env['cuda']}" if env.get("cuda") else ""),
             f"method: {s['isolation']}; timing by {s['timing']}; memory: {s['memory']}; {FASTER}"]
    if data.get("noise"):
        lines.append(f"noise: {data['noise']['note']}")
    if data.get("fidelity_note"):
        lines.append(f"fidelity: {data['fidelity_note']}")
    lines.append(f"prompt adherence: {s['adherence']}; chance is about 1/9 (background) and 1/8 (shape)"
                 if s.get("adherence") else "prompt adherence: not measured (\"-\"): it needs trained weights and "
                 "colour-check prompts (the tiny queue or --adherence N)")
    if any((r.get("sampling") or {}).get("steps") not in (None, s["steps"]) or (r.get("sampling") or {}).get("cfg")
           not in (None, s["cfg"]) for r in data["entries"]):
        lines.append("steps/CFG: some entries run at their own steps and CFG (an accelerator at its recommended "
                     "ones, with its sampler): see the steps, CFG and sampler columns; the baseline runs at the "
                     "bench's")
    notes = sorted({n for r in data["entries"] for n in ((r.get("fidelity") or {}).get("notes") or [])})
    lines += [f"note: {n}" for n in notes]
    return lines


def markdown(data: dict, files: dict) -> str:
    cols = columns(data)
    lines = [f"# diffspeed bench: {data['settings']['model']}", ""] + [f"- {h}" for h in _header_lines(data)]
    lines += ["", "| " + " | ".join(c[1] for c in cols) + " |", "|" + " --- |" * len(cols)]
    for row in summary_rows(data):
        cells = [(f"**{row[k]}**" if k == "name" and row["pareto"] else str(row[k]).replace("|", "/")) for k, _ in cols]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "**Bold**: on the Pareto front (no other entry is both faster and "
              + ("closer to the baseline" if not data.get("fidelity_note") else "leaner") + ").", ""]
    lines += ["## What each entry applied", ""] + [f"- **{r['name']}** ({r['source']}): `{r['what']}`"
                                                  for r in data["entries"]]
    for key, title in (("scatter", "Speed vs fidelity"), ("memory_plot", "Speed vs memory")):
        if files.get(key):
            lines += ["", f"## {title}", "", f"![{title}]({files[key]})"]
    if files.get("grids"):
        lines += ["", "## Images (last timed run, same seeds)", ""]
        lines += [f"![prompt {i + 1}]({g})" for i, g in enumerate(files["grids"])]
    return "\n".join(lines) + "\n"


def html_report(data: dict, files: dict) -> str:
    cols = columns(data)
    esc = html.escape
    head = "".join(f"<li>{esc(h)}</li>" for h in _header_lines(data))
    rows = []
    for row in summary_rows(data):
        cls = " ".join(c for c in ("pareto" if row["pareto"] else "", row["status"]) if c)
        cells = "".join(f"<td>{esc(str(row[k]))}</td>" for k, _ in cols)
        rows.append(f'<tr class="{cls}" title="{esc(row["what"])}">{cells}</tr>')
    table = (f"<table><thead><tr>{''.join(f'<th>{esc(t)}</th>' for _, t in cols)}</tr></thead>"
             f"<tbody>{''.join(rows)}</tbody></table>")
    figures = "".join(f'<figure><img src="{esc(files[k])}" alt="{esc(t)}"><figcaption>{esc(t)}</figcaption></figure>'
                      for k, t in (("scatter", "speed vs fidelity"), ("memory_plot", "speed vs memory"))
                      if files.get(k))
    grids = "".join(f'<figure><img src="{esc(g)}" alt="grid {i + 1}"><figcaption>{esc(p["prompt"])} '
                    f'(seed {p["seed"]})</figcaption></figure>'
                    for i, (g, p) in enumerate(zip(files.get("grids", []), data["settings"]["queue"])))
    # The check writes its verdict into the page, so a headless browser's DOM dump shows whether every image
    # decoded and no script failed.
    script = """
window.diffspeedErrors = [];
window.addEventListener('error', e => {  // script errors, and (capture phase) resources that failed
  if (!(e.target && e.target.src)) window.diffspeedErrors.push('script error: ' + e.message);
}, true);
window.addEventListener('load', () => {
  const bad = [...document.images].filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src);
  const errors = window.diffspeedErrors.concat(bad.map(s => 'image failed: ' + s));
  document.body.dataset.check = errors.length ? 'errors: ' + errors.join(' | ') : 'ok';
  document.getElementById('check').textContent = errors.length ? errors.join('; ') : 'all images loaded';
});"""
    style = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;"
             "font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}td:first-child,"
             "td:last-child{text-align:left}tr.pareto td:first-child{font-weight:bold}tr.failed{background:#fdd}"
             "tr.skipped{color:#888}figure{display:inline-block;margin:1em}img{max-width:100%;image-rendering:"
             "pixelated}#check{color:#888;font-size:12px}")
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>diffspeed bench: "
            f"{esc(data['settings']['model'])}</title><style>{style}</style><script>{script}</script></head><body>"
            f"<h1>diffspeed bench: {esc(data['settings']['model'])}</h1><ul>{head}</ul>{table}"
            f"<p>Bold: on the Pareto front. Hover a row for what it applied.</p>{figures}<h2>Images</h2>{grids}"
            f"<p id=\"check\"></p></body></html>\n")


def _load(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def draw_grids(data: dict, out: Path) -> list[str]:
    """One PNG per prompt: the baseline and every entry that ran, labelled with its speed and PSNR."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ran = [r for r in data["entries"] if r["status"] == "ok" and r["images"]]
    if not ran:
        return []
    (out / "grids").mkdir(exist_ok=True)
    files = []
    for i, item in enumerate(data["settings"]["queue"]):
        cols = min(len(ran), 6)
        nrows = math.ceil(len(ran) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(2.2 * cols, 2.5 * nrows + 0.4), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for ax, r in zip(axes.flat, ran):
            ax.imshow(_load(out / r["images"][i]), interpolation="nearest")
            f, ratios = r.get("fidelity") or {}, r.get("ratios") or {}
            psnr = _fmt(f["per_image_psnr_db"][i], ".1f") if f else None
            sub = f"{ratios.get('speed', 1):.2f}x" + (f", {psnr} dB" if psnr else "")
            ax.set_title(f"{r['name'][:28]}\n{sub}", fontsize=7)
        fig.suptitle(f"{item['prompt'][:110]} (seed {item['seed']})", fontsize=8)
        fig.tight_layout()
        path = out / "grids" / f"prompt-{i + 1}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(str(path.relative_to(out)))
    return files


def _scatter(points, pareto, xlabel, ylabel, title, path: Path, ycap_label: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for i, (name, x, y) in enumerate(sorted(points, key=lambda p: (p[2], p[1]))):
        on = name in pareto
        ax.scatter([x], [y], s=40 if on else 22, color="tab:red" if on else "tab:blue", zorder=3)
        # neighbours in height alternate above and below their point, so close labels do not overprint
        ax.annotate(name[:34], (x, y), fontsize=6.5, xytext=(4, 4 if i % 2 else -9), textcoords="offset points")
    front = sorted((x, y) for n, x, y in points if n in pareto)
    if len(front) > 1:
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="tab:red", lw=1, alpha=0.6,
                label="Pareto front")
        ax.legend(fontsize=8)
    ax.axvline(1.0, color="gray", lw=0.6, ls="--")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x" if v in (0.5, 2, 3, 5) else ""))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title + (f"\n{ycap_label}" if ycap_label else ""), fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_plots(data: dict, out: Path) -> dict:
    (out / "plots").mkdir(exist_ok=True)
    ran = [r for r in data["entries"] if r["status"] == "ok" and r.get("ratios")]
    files = {}
    model = data["settings"]["model"]
    if not data.get("fidelity_note") and any(r.get("fidelity") for r in ran):
        finite = [r["fidelity"]["psnr_db"] for r in ran
                  if r.get("fidelity") and math.isfinite(r["fidelity"]["psnr_db"])]
        cap = max(max(finite, default=0.0) + 5, 40.0)
        pts = [(r["name"], r["ratios"]["speed"], min(r["fidelity"]["psnr_db"], cap)) for r in ran if r.get("fidelity")]
        path = out / "plots" / "speed-vs-fidelity.png"
        _scatter(pts, data.get("pareto", []), "speed vs baseline (x, log scale)", "PSNR to the baseline (dB)",
                 f"{model}: speed vs fidelity (red: Pareto front)", path, f"identical images plotted at {cap:.0f} dB")
        files["scatter"] = str(path.relative_to(out))
    pts = [(r["name"], r["ratios"]["speed"], r["ratios"]["memory"]) for r in ran]
    if pts:
        path = out / "plots" / "speed-vs-memory.png"
        from diffspeed.bench.runner import pareto_front

        lean = set(pareto_front(ran, fidelity=False))
        _scatter(pts, lean, "speed vs baseline (x, log scale)", "peak memory vs baseline (x)",
                 f"{model}: speed vs peak memory (red: faster-and-leaner front)", path)
        files["memory_plot"] = str(path.relative_to(out))
    return files


def write_atomic(path: Path, text: str) -> None:
    """A reader never sees half a report, and an interrupted run leaves the previous one whole."""
    write_text_beside(Path(path), text, field="out")


def write_reports(data: dict, out: Path) -> dict:
    out = Path(out)
    files = {"results": "results.json", "grids": draw_grids(data, out), **draw_plots(data, out)}
    files["report_md"], files["report_html"] = "report.md", "report.html"
    write_atomic(out / "report.md", markdown(data, files))
    write_atomic(out / "report.html", html_report(data, files))
    return files


def load_results(folder: str | Path) -> dict:
    """``results.json`` back as ``bench`` returned it (PSNR "inf" strings as floats), e.g. to redraw the reports
    with :func:`write_reports` after changing this module, without measuring again."""
    import json

    data = json.loads((Path(folder) / "results.json").read_text())
    for entry in data["entries"]:
        f = entry.get("fidelity")
        if f:
            f["psnr_db"] = float(f["psnr_db"])
            f["per_image_psnr_db"] = [float(v) for v in f["per_image_psnr_db"]]
    return data
