"""The resolver: the one place where a request's references become images and loaded models.

A :class:`~diffspeed.request.GenerateRequest` is pure data; :class:`Resolver` turns its references into what a
call needs -- images (a path, or a base64 image), the ControlNet, the refiner, and models through a
:class:`~diffspeed.pipelines.cache.ModelCache` -- and keeps what it loaded, so a request never reloads from
disk what is already resident. One resolver per process (a server keeps one for its lifetime; the Python API
makes a fresh one per call unless given one).

``allow_paths=False`` (the server) refuses every path: images must be inline base64, and ControlNets and
refiners must be names the resolver lists -- shipped ones, those found under ``models_dir``, or loaded objects
registered with :meth:`Resolver.add`. A request can then never make the server read a file of its choosing.
"""

from __future__ import annotations

import base64
import binascii
import io
import threading
import warnings
import weakref
from collections import OrderedDict
from pathlib import Path

from diffspeed._lazy import lazy_import
from diffspeed.errors import DiffspeedError
from diffspeed.request import GenerateRequest, is_inline_image

torch = lazy_import("torch")

DEFAULT_MAX_PIXELS = 4096 * 4096  # decoded pixels of one input image; larger is refused before decoding
MAX_CONTROLNETS = 4  # loaded ControlNets kept per (folder, dtype, device)


def inline_bytes(ref: str, field: str) -> bytes:
    """The bytes of a base64 image reference (raw, or a ``data:...;base64,`` URI); bad data names the field."""
    data = ref
    if ref.startswith("data:"):
        _, comma, data = ref.partition(",")
        if not comma:
            raise DiffspeedError(f"{field}: a data URI is data:image/...;base64,<data>; this one has no comma",
                                 field=field)
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as err:
        raise DiffspeedError(f"{field}: not valid base64 ({err})", field=field) from err


class Resolver:
    """Images and models for requests, with caches; thread-safe.

    ``cache``: the :class:`ModelCache` models come from (a new one if None). ``allow_paths``: whether file paths
    are accepted (see the module docstring). ``models_dir``: a folder whose ``controlnet/<name>`` and
    ``refiner/<name>`` subfolders are listed by name. ``max_image_pixels``: the largest input image, in pixels.
    """

    def __init__(self, cache=None, *, allow_paths: bool = True, models_dir: str | Path | None = None,
                 max_image_pixels: int = DEFAULT_MAX_PIXELS):
        from diffspeed.pipelines.cache import ModelCache

        self.models = cache if cache is not None else ModelCache()
        self.allow_paths = allow_paths
        self.models_dir = Path(models_dir).expanduser() if models_dir is not None else None
        self.max_image_pixels = max_image_pixels
        self._added: dict[str, object] = {}
        self._controlnets: OrderedDict[tuple, object] = OrderedDict()
        self._refiners: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # base pipe -> {key: refiner}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------------ names
    def add(self, name: str, model) -> None:
        """Register a loaded ControlNetModel or refiner pipeline under ``name`` for requests to use."""
        if not isinstance(name, str) or not name:
            raise DiffspeedError("name: must be non-empty text", field="name")
        self._added[name] = model

    def controlnet_names(self) -> list[str]:
        from diffspeed.pipelines.workflows import SHIPPED_CONTROLNETS

        return sorted(set(self._installed(SHIPPED_CONTROLNETS, "config.json")) | set(self._found("controlnet"))
                      | {n for n, m in self._added.items() if _is_controlnet(m)})

    def refiner_names(self) -> list[str]:
        return sorted(set(self._installed(("tiny-sdxl-refiner",), "model_index.json")) | set(self._found("refiner"))
                      | {n for n, m in self._added.items() if not _is_controlnet(m)})

    def _installed(self, names, marker: str) -> list[str]:
        from diffspeed.pipelines.load import installed_models_dir

        shipped = installed_models_dir()
        return [n for n in names if shipped is not None and (shipped / n / marker).is_file()]

    def _found(self, kind: str) -> dict[str, Path]:
        """``models_dir/<kind>/<name>`` folders (a diffusers folder each)."""
        if self.models_dir is None:
            return {}
        root = self.models_dir / kind
        marker = "config.json" if kind == "controlnet" else "model_index.json"
        if not root.is_dir():
            return {}
        return {p.name: p for p in sorted(root.iterdir()) if (p / marker).is_file()}

    def _folder(self, spec: str, kind: str) -> str | Path:
        """What to load for ``spec``: a shipped name as it is, a listed name's folder, or (if paths are
        allowed) the path; otherwise a clear error listing the names."""
        listed = self.controlnet_names() if kind == "controlnet" else self.refiner_names()
        found = self._found(kind)
        if spec in found:
            return found[spec]
        if spec in listed or self.allow_paths:
            return spec
        raise DiffspeedError(f"{kind}: {spec!r} is not one of this server's {kind}s ({', '.join(listed) or 'none'}); "
                             f"paths are not accepted", field=kind)

    # ------------------------------------------------------------------------------------------ checks
    def check(self, request: GenerateRequest) -> None:
        """Fail now, before any model loads, on a reference that cannot resolve: a missing image file, a path
        where paths are refused, an unknown or missing ControlNet or refiner folder."""
        from diffspeed.pipelines.workflows import controlnet_dir, refiner_dir

        for name in ("init_image", "mask_image", "control_image"):
            ref = getattr(request, name)
            if ref is not None and not is_inline_image(ref):
                self._image_path(ref, name)
        if request.controlnet is not None and request.controlnet not in self._added:
            controlnet_dir(self._folder(request.controlnet, "controlnet"))
        if request.refiner is not None and request.refiner not in self._added:
            refiner_dir(self._folder(request.refiner, "refiner"))

    def _image_path(self, ref: str, field: str) -> Path:
        if not self.allow_paths:
            raise DiffspeedError(f"{field}: must be a base64 image (raw or a data:image/...;base64, URI); file "
                                 f"paths are not accepted here", field=field)
        path = Path(ref).expanduser()
        if not path.is_file():
            raise DiffspeedError(f"{field}: no such image file: {path}", field=field)
        return path

    # ------------------------------------------------------------------------------------------ images
    def image(self, ref, field: str, mode: str = "RGB"):
        """The PIL image of a reference (base64 or a path); a decompression bomb or a non-image is refused
        with the field, before its pixels are decoded."""
        from PIL import Image

        from diffspeed.pipelines.workflows import load_image

        if isinstance(ref, Image.Image) or not isinstance(ref, str):
            return load_image(ref, field, mode)  # a resolved object, e.g. from older callers
        if not is_inline_image(ref):
            path = self._image_path(ref, field)
            self._check_pixels(path, field)
            return load_image(path, field, mode)
        return self.open_inline(ref, field).convert(mode)

    def open_inline(self, ref: str, field: str):
        """A base64 image reference decoded as it is (its text chunks in ``.info``), once its header passed
        the pixel limit."""
        from PIL import Image

        raw = inline_bytes(ref, field)
        self._check_pixels(io.BytesIO(raw), field)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(raw))
                image.load()
                return image
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise DiffspeedError(f"{field}: the image has more than {Image.MAX_IMAGE_PIXELS:,} pixels (the "
                                 f"decompression-bomb limit)", field=field) from err
        except (OSError, ValueError, SyntaxError, EOFError) as err:
            raise DiffspeedError(f"{field}: cannot read the data as an image ({err})", field=field) from err

    def _check_pixels(self, source, field: str) -> None:
        """Read only the header: refuse an image larger than ``max_image_pixels`` without decoding it."""
        from PIL import Image

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(source) as im:
                    w, h = im.size
        except Image.DecompressionBombError:
            w = h = self.max_image_pixels + 1  # PIL's own limit is over twice ours: refused below
        except (OSError, ValueError, SyntaxError, EOFError) as err:
            raise DiffspeedError(f"{field}: cannot read the data as an image ({err})", field=field) from err
        if w * h > self.max_image_pixels:
            raise DiffspeedError(f"{field}: the image is {w}x{h} = {w * h:,} pixels, more than the limit of "
                                 f"{self.max_image_pixels:,}; send a smaller image", field=field)

    # ------------------------------------------------------------------------------------------ models
    def model(self, source, **kwargs):
        """A pipeline from the model cache (see :meth:`ModelCache.get`)."""
        return self.models.get(source, **kwargs)

    def controlnet(self, spec: str, pipe):
        """The ControlNet ``spec`` names, fitted to ``pipe`` (dtype, device, family); loaded once per folder,
        dtype and device, then kept (the last ``MAX_CONTROLNETS``)."""
        from diffspeed.pipelines.workflows import controlnet_dir, load_controlnet

        if spec in self._added:
            return load_controlnet(self._added[spec], pipe)
        from diffspeed.pipelines.cache import _files_version

        path = controlnet_dir(self._folder(spec, "controlnet"))
        key = (str(path.resolve()), _files_version(path), str(pipe.unet.dtype), str(pipe.unet.device))
        with self._lock:
            model = self._controlnets.get(key)
            if model is not None:
                self._controlnets.move_to_end(key)
        if model is None:
            model = load_controlnet(spec if spec in self.controlnet_names() else path, pipe)
            with self._lock:
                self._controlnets[key] = model
                while len(self._controlnets) > MAX_CONTROLNETS:
                    self._controlnets.popitem(last=False)
        return load_controlnet(model, pipe)  # the fit check, every time

    def refiner(self, spec: str, base):
        """The refiner pipeline ``spec`` names for ``base``: loaded once per base pipeline (it shares the base's
        VAE and, when identical, its second text encoder), then kept while the base lives."""
        from diffspeed.pipelines.workflows import load_refiner

        if spec in self._added:
            return load_refiner(self._added[spec], base)
        folder = self._folder(spec, "refiner")
        key = (str(folder), id(getattr(base, "vae", None)), id(getattr(base, "text_encoder_2", None)))
        with self._lock:
            kept = self._refiners.setdefault(base, {})
            refiner = kept.get(key)
        if refiner is None:
            refiner = load_refiner(folder, base)
            with self._lock:
                kept.clear()  # one refiner per base: an older one would pin a swapped-out VAE
                kept[key] = refiner
        return refiner


def _is_controlnet(model) -> bool:
    return type(model).__name__.startswith("ControlNet")

