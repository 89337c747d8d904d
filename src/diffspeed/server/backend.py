"""Where the app's generation runs: in this process (:class:`LocalBackend`) or on Ray Serve replicas.

The app talks to a backend only through these calls, so the single-process server and the Ray deployment
(:mod:`diffspeed.server.ray_serve`) serve the same routes with the same semantics: ``run`` (a result, or the
queue's exceptions: ``QueueFull`` -> 429, ``ShuttingDown`` -> 503, ``JobTimeout`` -> 504, ``JobCancelled`` /
``TaskIdInUse`` -> 409), ``progress``, ``interrupt``, ``skip``, ``cancel``, ``stats``, ``load`` and the
lifecycle ``start`` / ``stop``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from diffspeed.server.engine import Work
from diffspeed.server.jobs import JobQueue


@dataclass
class Outcome:
    """A finished request: the generation result and when its job started (the web UI's job_timestamp)."""

    result: Any  # a diffspeed.generate.GenerateResult
    job_timestamp: str | None = None


class LocalBackend:
    """One :class:`~diffspeed.server.engine.Engine` fed by one bounded :class:`JobQueue`, in this process."""

    def __init__(self, config, catalog, resolver, metrics=None):
        from diffspeed.server.engine import Engine

        self.config = config
        self.engine = Engine(catalog, resolver, device=config.device, dtype=config.dtype)
        self.queue = JobQueue(self.engine.run_batch, max_queue=config.max_queue, max_batch=config.max_batch,
                              timeout=config.request_timeout, on_event=metrics.on_event if metrics else None)

    @property
    def device(self) -> str:
        return self.engine.device

    @property
    def closing(self) -> bool:
        return self.queue.closing

    async def start(self, model: str) -> None:
        await asyncio.to_thread(self.engine.load, model)
        self.queue.start()

    async def stop(self, grace: float) -> None:
        await asyncio.to_thread(self.queue.shutdown, grace)
        await asyncio.to_thread(self.queue.join, 5.0)
        self.engine.close()

    def shutdown_now(self, grace: float) -> None:
        """From a signal handler's thread: stop taking work, answer the queued, let the running finish."""
        self.queue.shutdown(grace)

    def submit(self, work: Work, task_id: str | None):
        """Queue ``work``; returns the job (its ``future`` gives the result). Raises the queue's exceptions."""
        return self.queue.submit(work, work.key(), n_images=work.request.batch_size, task_id=task_id)

    async def wait(self, job) -> Outcome:
        result = await asyncio.wrap_future(job.future)
        return Outcome(result, job.timestamp)

    def progress(self, task_id: str | None = None) -> dict:
        return self.queue.progress(task_id)

    def interrupt(self) -> bool:
        return self.queue.interrupt()

    def skip(self) -> bool:
        return self.queue.skip()

    def cancel(self, task_id: str) -> bool:
        return self.queue.cancel(task_id)

    def stats(self) -> dict:
        return self.queue.stats()

    async def load(self, model: str) -> None:
        await asyncio.to_thread(self.engine.load, model)
