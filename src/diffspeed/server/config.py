"""The server's settings: one frozen object, made from ``diffspeed serve``'s options or by a Python caller."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from diffspeed.errors import DiffspeedError, check_range

MiB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; more is refused with 422 (413 for the body), naming the field."""

    max_width: int = 2048
    max_height: int = 2048
    max_steps: int = 150
    max_images: int = 8  # batch_size * n_iter of one request
    max_prompt_chars: int = 4000
    max_body_bytes: int = 32 * MiB
    max_image_pixels: int = 4096 * 4096  # decoded pixels of one input image; refused from its header

    def __post_init__(self):
        check_range("max_width", self.max_width, 64, 8192)
        check_range("max_height", self.max_height, 64, 8192)
        check_range("max_steps", self.max_steps, 1, 1000)
        check_range("max_images", self.max_images, 1, 64)
        check_range("max_prompt_chars", self.max_prompt_chars, 1, 1_000_000)
        check_range("max_body_bytes", self.max_body_bytes, 1024, 1024 * MiB)
        check_range("max_image_pixels", self.max_image_pixels, 64 * 64, 16384 * 16384)


@dataclass(frozen=True)
class ServerConfig:
    model: str = "tiny-sd"  # the model served when a request names none
    preset: str | None = None  # the recipe applied when a request names none
    host: str = "127.0.0.1"
    port: int = 7860
    api_auth: tuple[tuple[str, str], ...] = ()  # (user, password) pairs; empty: no authentication
    max_queue: int = 32  # jobs waiting (not counting the running batch); more get 429
    max_batch: int = 8  # images per pipeline call when compatible requests are batched; 1: no batching
    models_dir: str | None = None  # more models: *.safetensors / diffusers folders, Lora/, controlnet/, refiner/
    outputs_dir: str = "outputs/server"  # where save_images writes
    request_timeout: float = 600.0  # seconds from arrival to result, queued and running
    device: str | None = None
    dtype: str | None = None
    cache_models: int = 2  # loaded models kept in RAM for switching
    shutdown_grace: float = 30.0  # seconds the running batch may take to finish on SIGTERM
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self):
        check_range("port", self.port, 0, 65535)
        check_range("max_queue", self.max_queue, 1, 10_000)
        check_range("max_batch", self.max_batch, 1, 64)
        check_range("cache_models", self.cache_models, 1, 64)
        check_range("request_timeout", self.request_timeout, 1.0, 86_400.0, kind=float)
        check_range("shutdown_grace", self.shutdown_grace, 0.0, 3600.0, kind=float)
        if self.models_dir is not None and not Path(self.models_dir).expanduser().is_dir():
            raise DiffspeedError(f"models_dir: no such folder: {self.models_dir}", field="models_dir")
        for user, password in self.api_auth:
            if not user or not password or ":" in user:
                raise DiffspeedError("api_auth: each entry must be user:password with a non-empty user (no ':') "
                                     "and password", field="api_auth")

    @property
    def exposed(self) -> bool:
        """Whether the server listens beyond this machine (anything but a loopback address)."""
        if self.host in ("localhost", ""):
            return self.host == ""
        try:
            return not ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return True  # a host name: it may resolve to anything


def parse_auth(text: str | None) -> tuple[tuple[str, str], ...]:
    """``user:pass[,user2:pass2]`` -> pairs (the web UI's ``--api-auth`` form)."""
    if not text:
        return ()
    pairs = []
    for item in text.split(","):
        user, sep, password = item.strip().partition(":")
        if not sep or not user or not password:
            raise DiffspeedError(f"api_auth: expected user:password[,user2:password2], got {item.strip()!r}",
                                 field="api_auth")
        pairs.append((user, password))
    return tuple(pairs)
