"""``diffspeed serve --ray``: the same web-UI-compatible app, its generation on Ray Serve replicas.

Two deployments make one Serve application (:func:`deployment_app`):

- ``DiffspeedIngress`` serves ``create_app(config, backend=RayBackend(...))``: the very routes, limits, auth and
  status codes of the single-process server. It holds no model (``num_cpus=0``).
- ``DiffspeedModel``: N replicas (or autoscaled between A and B on ongoing requests), each a
  :class:`~diffspeed.server.backend.LocalBackend` -- one Engine (model switching through its RAM cache) fed by
  one bounded JobQueue -- so batching by key, interrupt, skip and timeouts behave exactly as in one process.
  ``@serve.batch`` gathers the requests that arrive together and hands them to the queue at once.

``/progress``, ``/interrupt``, ``/skip``, ``/metrics`` and cancelling by task id reach every model replica at
once with Serve's ``handle.broadcast`` (a Serve handle's ``remote`` reaches one replica only): the replica
holding the task answers, counts are summed. A broadcast bypasses the replicas' request limits, so progress
and interrupt answer while every replica is busy.

A request's exceptions cross the process boundary as :class:`RemoteError` (the queue's exceptions take
keyword-only arguments, which plain pickling loses) and are raised again in the ingress as the same types,
so QueueFull is 429, JobTimeout 504 and so on. Serve's own back-pressure (``max_queued_requests`` exceeded:
every replica has ``max_ongoing_requests`` in flight and the handle's queue is full) is QueueFull too.

Requests with the same batch composition give bit-identical images on any replica and in one process.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import deque
from typing import Any

from diffspeed.errors import DiffspeedError
from diffspeed.server.backend import LocalBackend, Outcome
from diffspeed.server.config import ServerConfig

APP_NAME = "diffspeed"
BROADCAST_S = 10.0  # seconds to wait for every replica's answer to a broadcast



def _serve():
    """Ray Serve, imported when a deployment is made (Ray is an optional extra; this module imports without)."""
    try:
        from ray import serve
    except ImportError as err:
        raise DiffspeedError(f"--ray needs Ray Serve: pip install 'ray[serve]' ({err.name} is missing)",
                             field="ray") from err
    return serve


# ------------------------------------------------------------------------------------------------ errors
class RemoteError(Exception):
    """An exception raised in a replica, carried as (class, args, attributes) so it is rebuilt exactly."""

    def __init__(self, cls: type, args: tuple, state: dict):
        super().__init__(cls, args, state)

    @classmethod
    def wrap(cls, err: BaseException) -> RemoteError:
        state = {k: v for k, v in vars(err).items() if not k.startswith("__")}
        return cls(type(err), tuple(err.args), state)

    def rebuild(self) -> BaseException:
        kind, args, state = self.args
        err = kind.__new__(kind)
        BaseException.__init__(err, *args)
        err.__dict__.update(state)
        return err


def _chain(err: BaseException | None):
    """``err`` and the causes Ray wraps around it (RayTaskError's ``cause``)."""
    for _ in range(8):
        if err is None:
            return
        yield err
        cause = getattr(err, "cause", None)
        err = None if cause is err else cause


def _back_pressure(err: BaseException) -> bool:
    return any(type(e).__name__ == "BackPressureError" for e in _chain(err))


def local_error(err: BaseException) -> BaseException:
    """The exception the app should see for ``err`` from a Serve call: a replica's own exception rebuilt
    from its RemoteError (unwrapping RayTaskError's cause), Serve's back-pressure as QueueFull."""
    from diffspeed.server.jobs import QueueFull

    for e in _chain(err):
        if type(e) is RemoteError:  # not Ray's RayTaskError(RemoteError), a subclass made for the raise
            return e.rebuild()
        if type(e).__name__ == "BackPressureError":
            retry = getattr(e, "retry_after_s", None) or 1
            return QueueFull(f"every replica's queue is full; retry in about {retry:.0f} s", retry_after=retry)
    return err


# ------------------------------------------------------------------------------------------------ merging
def merged_progress(snaps: list[dict], task_id: str | None) -> dict:
    """The web UI's /progress answer from every replica's ``queue.progress(task_id)``: the replica holding
    ``task_id`` (else the first one running something) answers, with job counts and queue depth summed."""
    answer = None
    for snap in snaps:
        if task_id is not None:
            live = snap.get("job_state") in ("queued", "running")
            if snap.get("job_state") is not None and (answer is None or live):  # a live job over a finished one
                answer = snap
        elif snap["state"]["job"] and answer is None:
            answer = snap
    answer = dict(answer or _idle())
    depth = sum(s["queue"]["depth"] for s in snaps)
    running = sum(s["queue"]["running"] for s in snaps)
    answer["state"] = {**answer["state"], "job_count": depth + running}
    answer["queue"] = {**answer["queue"], "depth": depth, "running": running}
    return answer


def merged_stats(stats: list[dict]) -> dict:
    """Queue counters summed over replicas (``replicas``: how many answered)."""
    total: dict[str, Any] = {"recent_batch_sizes": [], "closing": False, "replicas": len(stats)}
    for one in stats:
        for key, value in one.items():
            if key == "recent_batch_sizes":
                total[key] += value
            elif key == "closing":
                total[key] = total[key] or value
            elif isinstance(value, (int, float)):
                total[key] = total.get(key, 0) + value
    return total


def _idle() -> dict:
    state = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "", "job_count": 0,
             "job_timestamp": "", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
    return {"progress": 0.0, "eta_relative": 0.0, "state": state,
            "queue": {"depth": 0, "running": 0, "position": None}, "job_state": None, "textinfo": None}


# ------------------------------------------------------------------------------------------------ model replica
class EventLog:
    """A replica's job-queue events (batch sizes and seconds, outcomes, rejections), kept until the ingress
    drains them into its Prometheus metrics, so ``/metrics`` counts what every replica did."""

    def __init__(self, most: int = 100_000):
        self.events: deque[tuple[str, dict]] = deque(maxlen=most)

    def on_event(self, name: str, data: dict) -> None:  # the JobQueue's callback, from its threads
        self.events.append((name, dict(data)))

    def drain(self) -> list[tuple[str, dict]]:
        out = []
        while self.events:
            out.append(self.events.popleft())
        return out


class ModelReplica:
    """One model replica's state: a LocalBackend (Engine + JobQueue) serving the default model at once."""

    def __init__(self, config: ServerConfig):
        from diffspeed.server.app import make_resolver
        from diffspeed.server.catalog import Catalog

        self.config = config
        catalog = Catalog(config.model, config.models_dir)
        self.events = EventLog()
        self.backend = LocalBackend(config, catalog, make_resolver(config), self.events)
        self.backend.engine.load(catalog.default.name)
        self.backend.queue.start()

    def submit_all(self, items: list[tuple]) -> list:
        """``@serve.batch``'s body: each (work, task_id) into the queue, at once so they can share a batch;
        gives a job, or the RemoteError of what submitting raised (QueueFull, TaskIdInUse, ShuttingDown)."""
        jobs = []
        for work, task_id in items:
            try:
                jobs.append(self.backend.submit(work, task_id))
            except Exception as err:  # noqa: BLE001 -- handed to that request's caller
                jobs.append(RemoteError.wrap(err))
        return jobs

    async def run(self, job) -> Outcome:
        if isinstance(job, RemoteError):
            raise job
        try:
            return await self.backend.wait(job)  # cancelled (client gone): the queue drops the job
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001 -- rebuilt as the same type by the ingress
            raise RemoteError.wrap(err) from None

    def close(self) -> None:
        self.backend.shutdown_now(self.config.shutdown_grace)


# ------------------------------------------------------------------------------------------------ ingress side
class RayBackend:
    """The app's backend (LocalBackend's interface) on the model deployment's handle."""

    def __init__(self, config: ServerConfig, model_handle, device: str | None = None, metrics=None):
        self.config = config
        self.model = model_handle
        self.metrics = metrics  # the app's Metrics: the replicas' queue events are replayed into it
        self._device = device or config.device or "cpu"
        self._closing = False

    @property
    def device(self) -> str:
        return self._device

    @property
    def closing(self) -> bool:
        return self._closing

    async def start(self, model: str) -> None:
        self._device = await self.model.device.remote()  # also waits for a replica to be up

    async def stop(self, grace: float) -> None:
        self._closing = True  # Serve stops the replicas; each lets its running batch finish

    def shutdown_now(self, grace: float) -> None:
        self._closing = True

    def submit(self, work, task_id: str | None):
        from diffspeed.server.jobs import ShuttingDown

        if self._closing:
            raise ShuttingDown("the server is shutting down and accepts no new jobs")
        return self.model.generate.remote(work, task_id)

    async def wait(self, response) -> Outcome:
        try:
            return await response
        except asyncio.CancelledError:
            response.cancel()
            raise
        except Exception as err:  # noqa: BLE001 -- the replica's exception, as its own type
            if self.metrics is not None and _back_pressure(err):  # refused before any replica's queue saw it
                self.metrics.on_event("rejected", {})
            raise local_error(err) from None

    def _everyone(self, method: str, *args) -> list:
        """``method`` on every model replica (from the app's thread pool: sync routes run there)."""
        return self.model.broadcast(method, *args).results(timeout_s=BROADCAST_S)

    def progress(self, task_id: str | None = None) -> dict:
        return merged_progress(self._everyone("progress", task_id), task_id)

    def interrupt(self) -> bool:
        return any(self._everyone("interrupt"))

    def skip(self) -> bool:
        return any(self._everyone("skip"))

    def cancel(self, task_id: str) -> bool:
        return any(self._everyone("cancel", task_id))

    def stats(self) -> dict:
        """Every replica's counters summed; their queue events since the last call go into the metrics."""
        answers = self._everyone("stats_and_events")
        if self.metrics is not None:
            for _, events in answers:
                for name, data in events:
                    self.metrics.on_event(name, data)
        return merged_stats([stats for stats, _ in answers])

    async def load(self, model: str) -> None:
        """Load ``model`` on every replica (each through its RAM cache); a failure answers the request."""
        try:
            await self.model.broadcast("load", model).results_async()
        except Exception as err:  # noqa: BLE001
            raise local_error(err) from None


# ------------------------------------------------------------------------------------------------ deployments
def _deployments():
    """The two deployment classes (defined here so importing this module does not need Ray)."""
    serve = _serve()

    @serve.deployment(name="DiffspeedModel")
    class DiffspeedModel:
        def __init__(self, config: ServerConfig):
            self.replica = ModelReplica(config)
            self.submit_batch.set_max_batch_size(config.max_batch)

        @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005, max_concurrent_batches=64)
        async def submit_batch(self, items: list[tuple]) -> list:
            return self.replica.submit_all(items)

        async def generate(self, work, task_id: str | None) -> Outcome:
            job = await self.submit_batch((work, task_id))
            return await self.replica.run(job)

        def device(self) -> str:
            return self.replica.backend.device

        def progress(self, task_id: str | None) -> dict:
            return self.replica.backend.progress(task_id)

        def interrupt(self) -> bool:
            return self.replica.backend.interrupt()

        def skip(self) -> bool:
            return self.replica.backend.skip()

        def cancel(self, task_id: str) -> bool:
            return self.replica.backend.cancel(task_id)

        def stats_and_events(self) -> tuple[dict, list]:
            return self.replica.backend.stats(), self.replica.events.drain()

        async def load(self, model: str) -> None:
            try:
                await self.replica.backend.load(model)
            except Exception as err:  # noqa: BLE001
                raise RemoteError.wrap(err) from None

        def __del__(self):
            replica = getattr(self, "replica", None)
            if replica is not None:
                replica.close()

    @serve.deployment(name="DiffspeedIngress", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
    @serve.ingress()
    class DiffspeedIngress:
        def __init__(self, config: ServerConfig, model):
            self.backend = RayBackend(config, model)
            self.config = config

        def __serve_build_asgi_app__(self):
            from diffspeed.server.app import create_app

            app = create_app(self.config, backend=self.backend)
            self.backend.metrics = app.state.diffspeed.metrics
            return app

    return DiffspeedModel, DiffspeedIngress


def deployment_app(config: ServerConfig, *, replicas: int = 1, min_replicas: int | None = None,
                   max_replicas: int | None = None, num_gpus: float | None = None, cpus_per_replica: float = 1.0,
                   max_queued_requests: int | None = None):
    """The Serve application for ``config``: ``serve.run(deployment_app(...))``.

    ``replicas`` model replicas, or autoscaling between ``min_replicas`` and ``max_replicas`` (targeting
    ``max_batch`` ongoing requests each); ``num_gpus`` per replica (None: 1 where the cluster has GPUs, else
    none and ``cpus_per_replica`` CPUs). A replica takes ``max_queue + max_batch`` requests at once (its
    queue and its running batch); past that the handle queues ``max_queued_requests`` (default
    ``max_queue``) and refuses the rest with 429."""
    check_replicas(replicas, min_replicas, max_replicas)
    model_cls, ingress_cls = _deployments()
    if num_gpus is None:
        num_gpus = 1 if _cluster_gpus() > 0 else 0
    actor = {"num_gpus": num_gpus} if num_gpus else {"num_cpus": cpus_per_replica}
    options: dict[str, Any] = {
        "ray_actor_options": actor,
        "max_ongoing_requests": config.max_queue + config.max_batch,
        "max_queued_requests": config.max_queue if max_queued_requests is None else max_queued_requests,
    }
    if min_replicas is not None or max_replicas is not None:
        low = 1 if min_replicas is None else min_replicas
        options["autoscaling_config"] = {"min_replicas": low, "max_replicas": max_replicas or max(low, 1),
                                         "initial_replicas": max(low, 1), "target_ongoing_requests": config.max_batch}
    else:
        options["num_replicas"] = replicas
    model = model_cls.options(**options).bind(config)
    return ingress_cls.bind(config, model)


def check_replicas(replicas: int, min_replicas: int | None, max_replicas: int | None) -> None:
    if not isinstance(replicas, int) or replicas < 1:
        raise DiffspeedError(f"replicas must be an int >= 1, got {replicas!r}", field="replicas")
    if min_replicas is not None and (not isinstance(min_replicas, int) or min_replicas < 0):
        raise DiffspeedError(f"min_replicas must be an int >= 0, got {min_replicas!r}", field="min_replicas")
    if max_replicas is not None and (not isinstance(max_replicas, int) or max_replicas < 1
                                     or max_replicas < (min_replicas or 0)):
        raise DiffspeedError(f"max_replicas must be an int >= max(1, min_replicas), got {max_replicas!r}",
                             field="max_replicas")


def _cluster_gpus() -> float:
    import ray

    return ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0


def build_app(args: dict):
    """Serve's application builder (``import_path: diffspeed.server.ray_serve:build_app`` in a config file or
    a KubeRay RayService). ``args``: any ServerConfig field (model, preset, max_batch, max_queue,
    request_timeout, models_dir, api_auth as "user:pass,..."), plus replicas, min_replicas, max_replicas,
    num_gpus (per replica) and cpus_per_replica."""
    from diffspeed.server.config import parse_auth

    args = dict(args or {})
    deploy = {k: args.pop(k) for k in ("replicas", "min_replicas", "max_replicas", "num_gpus", "cpus_per_replica",
                                       "max_queued_requests") if k in args}
    for k in ("replicas", "min_replicas", "max_replicas", "max_queued_requests"):
        if k in deploy:
            deploy[k] = int(deploy[k])
    for k in ("num_gpus", "cpus_per_replica"):
        if k in deploy:
            deploy[k] = float(deploy[k])
    if isinstance(args.get("api_auth"), str):
        args["api_auth"] = parse_auth(args["api_auth"])
    known = {f.name for f in dataclasses.fields(ServerConfig)}
    unknown = sorted(set(args) - known)
    if unknown:
        raise DiffspeedError(f"build_app: unknown argument(s) {', '.join(unknown)}", field=unknown[0])
    return deployment_app(ServerConfig(**args), **deploy)


def serve_forever(config: ServerConfig, *, replicas: int = 1, min_replicas: int | None = None,
                  max_replicas: int | None = None, address: str | None = None) -> None:
    """``diffspeed serve --ray``: join the cluster at ``address`` (else start a local one on this machine),
    deploy on ``config.host:config.port``, serve until Ctrl-C or SIGTERM, then take the application down (and
    the local cluster; on a cluster joined, only this application)."""
    import signal
    from pathlib import Path

    check_replicas(replicas, min_replicas, max_replicas)
    serve = _serve()
    import ray

    # replicas run in other processes (other machines, other working directories): absolute paths
    config = dataclasses.replace(config, outputs_dir=str(Path(config.outputs_dir).resolve()),
                                 models_dir=str(Path(config.models_dir).resolve()) if config.models_dir else None)
    started = not ray.is_initialized()
    if started:
        ray.init(address=address or "local", include_dashboard=False)

    def stop(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
        serve.run(deployment_app(config, replicas=replicas, min_replicas=min_replicas, max_replicas=max_replicas),
                  name=APP_NAME, route_prefix="/")
        print(f"diffspeed: serving {config.model} on Ray Serve at http://{config.host}:{config.port}/ "
              f"(Ctrl-C stops)", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        if address is None:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
        if started:
            ray.shutdown()
