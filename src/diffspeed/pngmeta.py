"""The web UI's "parameters" PNG text chunk: written with every image, readable by other SD tools.

Format (AUTOMATIC1111 ``infotext``)::

    <prompt>
    Negative prompt: <negative prompt>
    Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Model hash: 0123456789, Model: name

Values that contain ", " or ":" are written JSON-quoted, as the web UI does.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

KEY = "parameters"
_PAIR = re.compile(r'\s*([\w ]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def _quote(value) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if ("," in text or ":" in text or '"' in text) else text


def format_parameters(prompt: str, negative_prompt: str, params: dict) -> str:
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in params.items()))
    return "\n".join(lines)


def parse_parameters(text: str) -> dict:
    """Inverse of :func:`format_parameters`: ``{"prompt", "negative_prompt", <each key>: str}``."""
    *head, last = text.strip().split("\n")
    if not _PAIR.match(last) or ":" not in last:  # no settings line at all
        head, last = head + [last], ""
    prompt_lines, neg_lines, in_neg = [], [], False
    for line in head:
        if line.startswith("Negative prompt:"):
            in_neg = True
            line = line[len("Negative prompt:"):].strip()
        (neg_lines if in_neg else prompt_lines).append(line)
    out = {"prompt": "\n".join(prompt_lines), "negative_prompt": "\n".join(neg_lines)}
    for key, value in _PAIR.findall(last):
        value = value.strip()
        out[key.strip()] = json.loads(value) if value.startswith('"') else value
    return out


def save_png(image: Image.Image, path: str | Path, parameters: str) -> Path:
    info = PngInfo()
    info.add_text(KEY, parameters)
    image.save(path, pnginfo=info)
    return Path(path)


def read_parameters(path: str | Path) -> dict:
    with Image.open(path) as im:
        text = im.info.get(KEY)
    if text is None:
        raise ValueError(f"{path} has no {KEY!r} text chunk")
    return parse_parameters(text)
