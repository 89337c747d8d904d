"""What a server lists -- models, LoRAs -- by name. Requests can name only what is listed: never a path."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

from diffspeed.errors import DiffspeedError

SINGLE_FILE = (".safetensors",)  # the server loads no pickles


@dataclass(frozen=True)
class ModelEntry:
    name: str  # what requests and the title use
    source: str  # what diffspeed.load takes: a shipped name or a path (never shown)
    hash: str  # the web UI's short hash
    kind: str  # "shipped", "directory" or "single-file"
    native_size: int | None = None
    recommended_cfg: float | None = None

    @property
    def title(self) -> str:
        return f"{self.name} [{self.hash}]" if self.hash else self.name


@dataclass(frozen=True)
class LoraEntry:
    name: str
    path: Path = field(repr=False)  # its .safetensors file (never shown)

    @property
    def source(self) -> str:
        """What ``load_lora`` takes: a shipped name as it is (so its infotext names it), else the file."""
        from diffspeed.pipelines.lora import SHIPPED_LORAS

        return self.name if self.name in SHIPPED_LORAS else str(self.path)


class Catalog:
    """Models: the server's ``--model``, the shipped models and those under ``models_dir`` (``*.safetensors``
    files and diffusers folders, at its top or in ``Stable-diffusion/``); LoRAs: the shipped ones and
    ``models_dir/Lora/*.safetensors``. ``refresh()`` rescans (``model_hash`` is memoized on file size and time)."""

    def __init__(self, default_model: str, models_dir: str | Path | None = None):
        self.models_dir = Path(models_dir).expanduser() if models_dir is not None else None
        self._lock = threading.Lock()
        self._models: dict[str, ModelEntry] = {}
        self._loras: dict[str, LoraEntry] = {}
        self.default = self._entry(default_model)
        self.refresh()

    # ------------------------------------------------------------------------------------------ scan
    def refresh(self) -> None:
        from diffspeed.pipelines.load import SHIPPED, shipped_path

        found = {self.default.name: self.default}
        for name in SHIPPED:
            if name != "tiny-sdxl-refiner" and (shipped_path(name) / "model_index.json").is_file():
                found.setdefault(name, self._entry(name))
        for folder in self._model_folders():
            for path in sorted(folder.iterdir()):
                if (path.is_file() and path.suffix in SINGLE_FILE) or (path / "model_index.json").is_file():
                    entry = self._entry(str(path))
                    found.setdefault(entry.name, entry)
        loras = {}
        from diffspeed.pipelines.load import installed_models_dir
        from diffspeed.pipelines.lora import SHIPPED_LORAS

        shipped = installed_models_dir()
        for name in SHIPPED_LORAS if shipped is not None else ():
            files = sorted((shipped / name).glob("*.safetensors"))
            if len(files) == 1:
                loras[name] = LoraEntry(name, files[0])
        if self.models_dir is not None:
            for sub in ("Lora", "lora", "LoRA"):
                for path in sorted((self.models_dir / sub).glob("*.safetensors")):
                    loras.setdefault(path.stem, LoraEntry(path.stem, path))
        with self._lock:
            self._models, self._loras = found, loras

    def _model_folders(self) -> list[Path]:
        if self.models_dir is None:
            return []
        return [d for d in (self.models_dir, self.models_dir / "Stable-diffusion") if d.is_dir()]

    def _entry(self, source: str) -> ModelEntry:
        from diffspeed.generate import _card_cfg
        from diffspeed.pipelines.load import SHIPPED, model_hash, shipped_path

        if source in SHIPPED:
            path, kind, name = shipped_path(source), "shipped", source
        else:
            path = Path(source).expanduser()
            if not path.exists():
                raise DiffspeedError(f"model: no such file or folder: {source} (a server serves local models: a "
                                     f"shipped name, a .safetensors file or a diffusers folder)", field="model")
            kind = "directory" if path.is_dir() else "single-file"
            name = path.name
        size = _native_size(path) if path.is_dir() else None
        cfg = _card_cfg(str(path)) if kind == "shipped" else None
        return ModelEntry(name, str(source if kind == "shipped" else path.resolve()), model_hash(path), kind, size,
                          cfg)

    # ------------------------------------------------------------------------------------------ look-ups
    def models(self) -> list[ModelEntry]:
        with self._lock:
            return list(self._models.values())

    def loras(self) -> list[LoraEntry]:
        with self._lock:
            return list(self._loras.values())

    def entry(self, name: str) -> ModelEntry:
        """The listed model called exactly ``name`` (a name :meth:`model` returned)."""
        with self._lock:
            return self._models[name]

    def model(self, title: str) -> ModelEntry:
        """The model a title, a name or a name with another hash names; a clear error listing them otherwise."""
        want = title.strip()
        bare = want.split(" [", 1)[0] if want.endswith("]") else want
        with self._lock:
            for entry in self._models.values():
                if want in (entry.title, entry.name) or bare == entry.name or bare == Path(entry.name).stem:
                    return entry
            names = ", ".join(e.title for e in self._models.values())
        raise DiffspeedError(f"sd_model_checkpoint: {title!r} is not one of this server's models ({names})",
                             field="sd_model_checkpoint")

    def lora(self, name: str) -> LoraEntry:
        with self._lock:
            entry = self._loras.get(name)
            names = ", ".join(self._loras) or "none"
        if entry is None:
            raise DiffspeedError(f"prompt: <lora:{name}:...> names no LoRA of this server ({names})", field="prompt")
        return entry


def _native_size(folder: Path) -> int | None:
    """Pixels of the model's native square size, from its configs (no weights read)."""
    try:
        unet = json.loads((folder / "unet" / "config.json").read_text())
        vae = json.loads((folder / "vae" / "config.json").read_text())
    except (OSError, ValueError):
        return None
    sample = unet.get("sample_size")
    blocks = vae.get("block_out_channels") or [0]
    return sample * 2 ** (len(blocks) - 1) if isinstance(sample, int) else None
