"""The web UI's "parameters" PNG text chunk: written with every image, readable by other SD tools.

Format (AUTOMATIC1111 ``infotext``)::

    <prompt>
    Negative prompt: <negative prompt>
    Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Model hash: 0123456789, Model: name

The last line holds the settings; every line before it is the prompt, up to the first line that starts with
``Negative prompt:``, which begins the negative prompt. Escaping, so that any text reads back as written:

- a settings value is written JSON-quoted when it holds ``,``, ``:``, ``"``, a line break or leading/trailing
  whitespace (the web UI quotes the first three the same way);
- the prompt (and the negative prompt) is written JSON-quoted on one line when the plain layout cannot carry it:
  a line of it starts with ``Negative prompt:``, it starts with ``"``, it has leading or trailing whitespace or
  a carriage return, or it ends the text (no settings follow) and its last line reads as a settings line.
  Ordinary prompts stay as they are, so other readers see them unchanged; a reader that does not know this
  rule shows the quoted text.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

KEY = "parameters"
NEGATIVE = "Negative prompt:"
_PAIR = re.compile(r'\s*([\w ]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def _quote(value) -> str:
    text = str(value)
    plain = not any(c in text for c in ',:"\n\r') and text == text.strip()
    return text if plain else json.dumps(text, ensure_ascii=False)


def _is_settings(line: str) -> bool:
    """Whether the parser would take ``line`` for the settings line (see :func:`parse_parameters`)."""
    return ":" in line and _PAIR.match(line) is not None


def _carry(text: str, final: bool) -> str:
    """``text`` as it can stand for a prompt in the layout: itself, or JSON-quoted on one line. ``final``: no
    settings line follows, so a last line that looks like one would be read as one."""
    lines = text.split("\n")
    plain = (not text.startswith('"') and text == text.strip() and "\r" not in text
             and not any(line.startswith(NEGATIVE) for line in lines) and not (final and _is_settings(lines[-1])))
    return text if plain else json.dumps(text, ensure_ascii=False)


def _uncarry(text: str) -> str:
    """Inverse of :func:`_carry`: plain prompts never start with ``"``, so a quoted one is unambiguous."""
    if text.startswith('"') and "\n" not in text:
        try:
            value = json.loads(text)
        except ValueError:
            return text  # written by another tool; keep what is there
        if isinstance(value, str):
            return value
    return text


def format_parameters(prompt: str, negative_prompt: str, params: dict) -> str:
    lines = [_carry(prompt, final=not (negative_prompt or params))]
    if negative_prompt:
        lines.append(f"{NEGATIVE} {_carry(negative_prompt, final=not params)}")
    if params:
        lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in params.items()))
    return "\n".join(lines)


def parse_parameters(text: str) -> dict:
    """Inverse of :func:`format_parameters`: ``{"prompt", "negative_prompt", <each key>: str}``."""
    *head, last = text.strip().split("\n")
    if not _is_settings(last) or last.startswith(NEGATIVE):  # no settings line at all
        head, last = head + [last], ""
    prompt_lines, neg_lines, in_neg = [], [], False
    for line in head:
        if not in_neg and line.startswith(NEGATIVE):
            in_neg = True
            # only the one space the writer puts after the label: str.strip() would also eat whitespace that
            # belongs to the prompt (U+2028 ends its first line, say), which the writer left unquoted
            line = line[len(NEGATIVE):].removeprefix(" ")
        (neg_lines if in_neg else prompt_lines).append(line)
    out = {"prompt": _uncarry("\n".join(prompt_lines)), "negative_prompt": _uncarry("\n".join(neg_lines))}
    for key, value in _PAIR.findall(last):
        value = value.strip()
        out[key.strip()] = json.loads(value) if value.startswith('"') else value
    return out


def save_png(image: Image.Image, path: str | Path, parameters: str) -> Path:
    """Write ``image`` as PNG (whatever ``path``'s suffix: callers write to temporary names) with the chunk."""
    info = PngInfo()
    info.add_text(KEY, parameters)
    image.save(path, format="PNG", pnginfo=info)
    return Path(path)


def png_bytes(image: Image.Image, parameters: str) -> bytes:
    """The PNG file of ``image`` with the parameters chunk, in memory (the server's base64 images)."""
    import io

    info = PngInfo()
    info.add_text(KEY, parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def read_text(source) -> str:
    """The raw parameters text of a PNG file (path) or an open PIL image."""
    if isinstance(source, Image.Image):
        text = source.info.get(KEY)
    else:
        with Image.open(os.fspath(source)) as im:
            text = im.info.get(KEY)
    if text is None:
        raise ValueError(f"{getattr(source, 'filename', None) or source} has no {KEY!r} text chunk")
    return text


def read_parameters(path: str | Path) -> dict:
    return parse_parameters(read_text(path))
