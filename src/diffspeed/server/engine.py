"""The model side of the server: one pipeline at a time, the recipe and LoRAs of each batch, generate_batch.

:class:`Work` is one queued request, pure data plus its validated recipe. :meth:`Engine.run_batch` is the job
queue's work function: it switches the model (through the resolver's RAM cache), the LoRAs and the recipe only
when the batch needs different ones, and runs the batch as one call. A recipe is applied with ``accelerate``
and removed before another is applied; ``remove()`` restores the pipeline exactly, so a request gets the same
image whatever ran before it.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any

from diffspeed.request import GenerateRequest


@dataclass(frozen=True)
class Work:
    """One request as the queue carries it."""

    request: GenerateRequest
    model: str  # a catalog name
    recipe: Any  # a validated diffspeed.core.Recipe (maybe without optimizations)
    preset: str | None
    loras: tuple[tuple[str, float], ...] = ()

    @property
    def recipe_key(self) -> str:
        return json.dumps(self.recipe.to_dict().get("optimization", []), sort_keys=True)

    def key(self) -> tuple:
        """Requests with equal keys run as one pipeline call."""
        return (self.model, self.recipe_key, self.loras, self.request.batch_key())


class Engine:
    """Runs batches of :class:`Work` on one pipeline; thread-safe (one batch or switch at a time)."""

    def __init__(self, catalog, resolver, *, device: str | None = None, dtype: str | None = None):
        from diffspeed.pipelines.load import resolve_device

        self.catalog = catalog
        self.resolver = resolver
        self.device = resolve_device(device)
        self.dtype = dtype
        self._lock = threading.RLock()
        self._pipe = None
        self._model: str | None = None
        self._loras: tuple = ()
        self._fast = None
        self._fast_key: str | None = None

    @property
    def current_model(self) -> str | None:
        return self._model

    def load(self, name: str):
        """Make ``name`` (a catalog name) the loaded model; a model met before comes from the RAM cache."""
        with self._lock:
            if self._model == name and self._pipe is not None:
                return self._pipe
            entry = self.catalog.entry(name)
            self._drop_recipe()
            pipe = self.resolver.model(entry.source, device=self.device, dtype=self.dtype)
            pipe.set_progress_bar_config(disable=True)
            self._pipe, self._model, self._loras = pipe, name, ()
            return pipe

    def run_batch(self, jobs, control) -> list:
        """The job queue's work function: one ``generate_batch`` call for the batch's requests."""
        from diffspeed.generate import generate_batch

        work: Work = jobs[0].payload
        with self._lock:
            if self._model != work.model:
                control.textinfo = f"Loading {work.model}"
            pipe = self.load(work.model)
            self._set_loras(pipe, work.loras)
            runner = self._runner(pipe, work)
            control.textinfo = None

            def on_step(i: int, n: int) -> bool:
                control.step(None, i, n)
                return control.stop_reason() is not None

            return generate_batch(pipe, [j.payload.request for j in jobs], progress=False, runner=runner,
                                  preset=work.preset, resolver=self.resolver, on_step=on_step)

    def _runner(self, pipe, work: Work):
        """The Accelerated pipeline for ``work``'s recipe (kept while batches share it), or None for none."""
        import diffspeed

        if self._fast_key == work.recipe_key:
            return self._fast
        self._drop_recipe()
        if work.recipe.optimizations:
            self._fast = diffspeed.accelerate(pipe, work.recipe, strict=False)  # a no-op is an event, not a 500
        self._fast_key = work.recipe_key
        return self._fast

    def _drop_recipe(self) -> None:
        if self._fast is not None:
            fast, self._fast = self._fast, None
            fast.remove()
        self._fast_key = None

    def _set_loras(self, pipe, loras: tuple) -> None:
        """Activate exactly ``loras`` ((name, weight) pairs). Each LoRA is read from disk once per loaded
        pipeline and kept as an adapter; switching among loaded ones only changes their weights (an inactive
        adapter adds nothing: the image is the plain model's, bit for bit)."""
        import re

        from diffspeed.pipelines.lora import load_lora, set_loras

        if loras == self._loras:
            return
        adapters = {name: re.sub(r"[^A-Za-z0-9_]", "_", name) for name, _ in loras}
        loaded = {i.name for i in getattr(getattr(pipe, "diffspeed_loras", None), "loaded", {}).values()}
        missing = [name for name in adapters if adapters[name] not in loaded]
        if missing:
            self._drop_recipe()  # LoRA layers replace modules the recipe's hooks sit on
            for name in missing:
                load_lora(pipe, self.catalog.lora(name).source, weight=1.0, name=adapters[name])
        set_loras(pipe, {adapters[name]: float(weight) for name, weight in loras})
        self._loras = loras

    def close(self) -> None:
        with self._lock:
            self._drop_recipe()
            self._pipe = None
            self._model = None
