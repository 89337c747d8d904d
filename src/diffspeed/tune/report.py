"""The tune run's outputs: ``results.json`` (schema ``diffspeed.tune/1``), ``report.md`` and ``report.html``
(every candidate, the front, the choice, what was not searched and why) and ``plots/front.png`` (speed against
fidelity, or against memory on random weights; drawn only when matplotlib is installed)."""

from __future__ import annotations

import html
import importlib.util
import json
import math
from pathlib import Path

from diffspeed._io import write_text_beside

SCHEMA = "diffspeed.tune/1"


def _f(v, spec: str, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "exact"
    return format(v, spec) + unit


def rows(data: dict) -> list[dict]:
    """One plain row per measurement, the table both reports print."""
    front = {(t["key"], t["level"]) for t in data["front"]}
    chosen = data["choice"] and (data["choice"]["key"], data["choice"]["level"])
    out = []
    for t in data["trials"]:
        r = t["result"]
        mark = "chosen" if (t["key"], t["level"]) == chosen else "front" if (t["key"], t["level"]) in front else ""
        ok = r.get("status") == "ok"
        status = "ok" if t["feasible"] else "; ".join(t["problems"]) if ok else f"{r.get('status')}: {r.get('error')}"
        out.append({"mark": mark, "label": t["label"], "source": t["source"], "level": t["level"],
                    "speed": _f(r.get("speed"), ".2f", "x") if ok else "", "spi": _f(r.get("seconds_per_image"), ".3f")
                    if ok else "", "memory": _f(r.get("memory_mb"), ".0f") if ok else "",
                    "ssim": _f(r.get("ssim"), ".3f") if ok else "", "psnr": _f(r.get("psnr_db"), ".1f") if ok else "",
                    "adherence": _f(r.get("adherence"), ".0%") if ok else "", "status": status})
    return out


COLUMNS = [("mark", ""), ("label", "recipe"), ("source", "from"), ("level", "level"), ("speed", "speed"),
           ("spi", "s/image"), ("memory", "peak MB"), ("ssim", "SSIM"), ("psnr", "PSNR dB"),
           ("adherence", "adherence"), ("status", "meets the goal")]


def _md_table(items: list[dict]) -> list[str]:
    lines = ["| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in items:
        cells = [str(r[k]).replace("|", "/") for k, _ in COLUMNS]
        if r["mark"]:
            cells[1] = f"**{cells[1]}**"
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _header(data: dict) -> list[str]:
    s = data["settings"]
    goal = [f"peak memory <= {s['max_memory_mb']:.0f} MB" if s.get("max_memory_mb") else "no memory budget"]
    goal += [f"{k} >= {v:g}" for k, v in (("SSIM", s.get("min_ssim")), ("PSNR dB", s.get("min_psnr")),
                                         ("adherence", s.get("min_adherence"))) if v is not None]
    size = "x".join(map(str, s["size"])) if s.get("size") else "native size"
    return [f"model {s['model']}, {size}, {s['steps']} steps, sampler {s['sampler']}, CFG {s.get('cfg') or 'card'}; "
            f"strategy {s['strategy']}, seed {s['seed']}, budget {s['time_budget_s']:.0f} s",
            f"goal: {', '.join(goal)}",
            f"stopped: {data['stopped']}; measuring time {data['spent_s']:.0f} s; {data['measured']} measured now, "
            f"{data['replayed']} from the log; front and choice from the {data['level']} level",
            f"hardware: {data.get('hardware_summary') or '-'}"]


def markdown(data: dict, files: dict) -> str:
    lines = [f"# diffspeed tune: {data['settings']['model']}", "", *[f"- {h}" for h in _header(data)], "",
             f"**{data['message']}**", ""]
    if data["choice"]:
        lines += [f"Recipe: `{files.get('recipe', 'tuned.toml')}` (`diffspeed generate --recipe "
                  f"{files.get('recipe', 'tuned.toml')} ...`)", ""]
    lines += [f"- note: {n}" for n in data["notes"]] + ([""] if data["notes"] else [])
    lines += ["## Front", "", *_md_table([r for r in rows(data) if r["mark"]]), ""]
    if files.get("plot"):
        lines += [f"![front]({files['plot']})", ""]
    lines += ["## Every measurement", "", *_md_table(rows(data)), ""]
    space = data["space"]
    valid = f"{space['valid_points']} valid" if space.get("valid_points") is not None else "over 200,000 valid"
    lines += ["## Search space", "", f"{space['grid_points']} grid points, {valid} ({space['incompatible_pairs']} "
              f"pairs of settings that validation refuses together)", ""]
    lines += [f"- {name}: {', '.join(labels)}" for name, labels in space["dimensions"].items()]
    lines += ["", "Not searched:", ""] + [f"- {s['name']}: {s['why']}" for s in space["skipped"]]
    lines += [f"- {p['label']}: {p['why']}" for p in data["pruned"]]
    return "\n".join(lines) + "\n"


def html_report(data: dict, files: dict) -> str:
    esc = html.escape

    def table(items):
        head = "".join(f"<th>{esc(h)}</th>" for _, h in COLUMNS)
        body = "".join("<tr" + (' class="front"' if r["mark"] else "") + ">" +
                       "".join(f"<td>{esc(str(r[k]))}</td>" for k, _ in COLUMNS) + "</tr>" for r in items)
        return f"<table><tr>{head}</tr>{body}</table>"

    parts = [f"<h1>diffspeed tune: {esc(data['settings']['model'])}</h1>", "<ul>",
             *[f"<li>{esc(h)}</li>" for h in _header(data)], "</ul>", f"<p><b>{esc(data['message'])}</b></p>"]
    parts += [f"<p>note: {esc(n)}</p>" for n in data["notes"]]
    parts += ["<h2>Front</h2>", table([r for r in rows(data) if r["mark"]])]
    if files.get("plot"):
        parts.append(f'<img src="{esc(files["plot"])}" alt="front">')
    parts += ["<h2>Every measurement</h2>", table(rows(data)), "<h2>Not searched</h2><ul>"]
    parts += [f"<li>{esc(s['name'])}: {esc(s['why'])}</li>" for s in data["space"]["skipped"]]
    parts += [f"<li>{esc(p['label'])}: {esc(p['why'])}</li>" for p in data["pruned"]] + ["</ul>"]
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:3px 6px}tr.front{background:#fde8e8;font-weight:bold}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>diffspeed tune</title><style>{style}</style>"
            f"</head><body>{''.join(parts)}</body></html>\n")


def draw_front(data: dict, out: Path) -> str | None:
    """``plots/front.png``: every full-level measurement (screening ones pale), the front, the choice."""
    if importlib.util.find_spec("matplotlib") is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axis = data["axis"]
    pts = [(t, t["result"]) for t in data["trials"] if t["result"].get("status") == "ok"]
    pts = [(t, r["speed"], _axis_value(r, axis)) for t, r in pts if _axis_value(r, axis) is not None]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 5))
    front = {(t["key"], t["level"]) for t in data["front"]}
    for t, x, y in pts:
        on = (t["key"], t["level"]) in front
        ax.scatter([x], [y], s=40 if on else 18, color="tab:red" if on else "tab:blue",
                   alpha=1.0 if t["level"] == "full" else 0.3, zorder=3)
        if on:
            ax.annotate(t["label"][:40], (x, y), fontsize=6.5, xytext=(4, 4), textcoords="offset points")
    if data["choice"]:
        c = data["choice"]
        ax.scatter([c["result"]["speed"]], [_axis_value(c["result"], axis)], marker="*", s=220, color="gold",
                   edgecolor="black", zorder=4, label="chosen")
        ax.legend(fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("speed vs baseline (x, log scale; pale: screening runs)")
    ax.set_ylabel({"ssim": "SSIM to the baseline", "psnr_db": "PSNR to the baseline (dB, capped at 60)",
                   "adherence": "colour-check adherence", "memory": "peak memory (MB, lower is better)"}[axis])
    ax.grid(alpha=0.3)
    fig.tight_layout()
    (out / "plots").mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "plots" / "front.png", dpi=110)
    plt.close(fig)
    return "plots/front.png"


def _axis_value(r: dict, axis: str):
    if axis == "memory":
        return r.get("memory_mb")
    v = r.get(axis)
    return min(v, 60.0) if axis == "psnr_db" and v is not None else v


def strict(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value


def write_reports(data: dict, out: Path, files: dict) -> dict:
    out = Path(out)
    plot = draw_front(data, out)
    files = dict(files) | ({"plot": plot} if plot else {})
    files |= {"results": "results.json", "report_md": "report.md", "report_html": "report.html"}
    write_text_beside(out / "report.md", markdown(data, files), field="out")
    write_text_beside(out / "report.html", html_report(data, files), field="out")
    write_text_beside(out / "results.json", json.dumps(strict(data | {"files": files}), indent=2,
                                                       allow_nan=False) + "\n", field="out")
    return files
