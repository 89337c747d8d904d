"""The server's job queue: bounded, FIFO, batching equal keys, with timeouts, interrupt/skip/cancel and progress.

Generic over the work: ``JobQueue(run_batch, ...)`` calls ``run_batch(jobs, control)`` on one worker thread, one
batch at a time, outside the queue's lock; ``run_batch`` returns one result per job, in order. Every job's
``future`` (a ``concurrent.futures.Future``) resolves exactly once: with that result, or with the exception that
ended it (``JobTimeout``, ``JobCancelled``, ``ShuttingDown``, or whatever the work raised; ``QueueFull`` is
raised by ``submit`` itself). Callers in asyncio await ``asyncio.wrap_future(job.future)``; cancelling that
awaitable while the job is still queued takes the job out of the queue.

Batching: the worker takes the oldest queued job, then adds queued jobs with an equal ``key`` in FIFO order
(first fit) while the batch's total ``n_images`` stays <= ``max_batch``; a job larger than ``max_batch`` runs
alone. A batch that raises is retried job by job (each alone, at its place in the queue), so one bad request
does not fail the others; a job that raises alone fails with that exception.

Stopping: the work polls ``control.stop_reason()`` at each step and stops when it is not None, returning what
it made so far as a normal result (the web UI's interrupt/skip semantics). ``"timeout"`` means a job of the
batch passed its deadline: that job fails with ``JobTimeout`` and its batch-mates, whose results were cut short,
go back to the queue at their place and run again. The queue imports neither torch nor any web framework.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import logging
import math
import statistics
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from diffspeed.errors import DiffspeedError, DiffspeedRuntimeError

log = logging.getLogger(__name__)

JobState = Literal["queued", "running", "done", "failed", "cancelled"]
StopReason = Literal["interrupt", "skip", "timeout"]
FINAL_STATES = frozenset({"done", "failed", "cancelled"})

HISTORY = 256  # finished jobs kept, so progress(job_id) still answers for a recent one
RECENT_BATCHES = 32  # batch durations kept for the ETA and Retry-After estimates
DEFAULT_BATCH_SECONDS = 10.0  # the estimate before any batch has finished (an SD 1.5 batch on a mid GPU)
_WATCH_CAP = 5.0  # the deadline watcher re-reads the clock at least this often (seconds)


class QueueFull(DiffspeedRuntimeError):
    """``max_queue`` jobs are waiting; ``retry_after`` (whole seconds, >= 1) estimates when a slot opens."""

    def __init__(self, message: str, *, retry_after: int):
        super().__init__(message)
        self.retry_after = max(1, int(retry_after))


class ShuttingDown(DiffspeedRuntimeError):
    """The queue is shutting down: it accepts nothing new, and queued jobs end with this."""


class JobTimeout(DiffspeedRuntimeError):
    """The job passed its deadline, queued or running."""


class TaskIdInUse(DiffspeedError):
    """A ``task_id`` of a queued or running job was given again (the app answers 409)."""


class JobCancelled(DiffspeedRuntimeError):
    """The job was cancelled while it was queued."""


@dataclass(eq=False)
class Job:
    """One request in the queue. The queue writes its fields under its lock; readers get a recent snapshot."""

    id: str  # uuid4 hex, or the caller's task_id (the web UI's force_task_id)
    key: Hashable  # jobs with equal keys may run in one batch
    payload: Any
    n_images: int = 1  # counted against max_batch
    created: float = 0.0  # queue clock (time.monotonic by default)
    deadline: float | None = None  # queue clock; None: no timeout
    no: int = 0  # submission number, 1-based: FIFO order, and the web UI's job_no
    state: JobState = "queued"
    future: Future = field(default_factory=Future, repr=False)
    step: int = 0  # progress: step of steps, as the work reports it (several passes reported as one)
    steps: int = 0
    started: float | None = None  # queue clock, when its batch started (reset if it goes back to the queue)
    finished: float | None = None
    timestamp: str = ""  # wall clock at start, YYYYmmddHHMMSS (the web UI's job_timestamp)
    alone: bool = False  # run without batch-mates: a retry after its batch failed

    @property
    def progress(self) -> float:
        """0..1: steps done over all steps while running, 1 once finished."""
        if self.state in FINAL_STATES:
            return 1.0
        return min(self.step / self.steps, 1.0) if self.state == "running" and self.steps > 0 else 0.0


@dataclass(frozen=True)
class FinishedJob:
    """What the history keeps of a finished job for ``progress(job_id)``: no payload and no result, which can
    be large (images), so 256 of them cost little."""

    id: str
    no: int
    state: JobState
    n_images: int
    created: float
    started: float | None
    finished: float
    step: int
    steps: int
    timestamp: str
    error: str | None  # the exception's type name, None when done

    progress = 1.0

    @classmethod
    def of(cls, job: Job, error: BaseException | None) -> FinishedJob:
        return cls(
            id=job.id, no=job.no, state=job.state, n_images=job.n_images, created=job.created,
            started=job.started, finished=job.finished, step=job.step, steps=job.steps, timestamp=job.timestamp,
            error=type(error).__name__ if error is not None else None,
        )


class Control:
    """What the work gets with its batch: report progress, poll for a reason to stop, set a status line."""

    def __init__(self, queue: JobQueue, jobs: Sequence[Job], started: float):
        self._queue = queue
        self.jobs: tuple[Job, ...] = tuple(jobs)
        self.started = started
        self.textinfo: str | None = None  # a status line for /progress ("Loading model", ...)
        # written under the queue's lock
        self.interrupted = False
        self.skipped = False
        self.told: set[str] = set()  # every reason stop_reason() has returned

    def step(self, job: Job | None, i: int, n: int) -> None:
        """Report step ``i`` of ``n`` for ``job``, or for every job of the batch when ``job`` is None."""
        self._queue._report_step(self, job, i, n)

    def stop_reason(self) -> StopReason | None:
        """None, or why the work should stop now: "interrupt", "timeout" (a job passed its deadline), "skip".

        Interrupt and timeout hold for the rest of the batch; skip holds until ``reset_skip()``."""
        return self._queue._stop_reason(self)

    def reset_skip(self) -> None:
        """The work moved on to its next pass (the web UI's skip ends the current image, not the job)."""
        with self._queue._cond:
            self.skipped = False


class _Pending:
    """Futures to resolve and events to emit once the lock is released (their callbacks may call back in)."""

    def __init__(self) -> None:
        self.outcomes: list[tuple[Job, Any, BaseException | None]] = []
        self.events: list[tuple[str, dict]] = []


_NO_RESULT = object()


class JobQueue:
    """A bounded FIFO queue of jobs run in batches by one worker thread. See the module docstring."""

    def __init__(
        self,
        run_batch: Callable[[list[Job], Control], Sequence[Any]],
        *,
        max_queue: int,
        max_batch: int,
        timeout: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_event: Callable[[str, dict], None] | None = None,
        history: int = HISTORY,
    ):
        for name, value in (("max_queue", max_queue), ("max_batch", max_batch), ("history", history)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DiffspeedError(f"{name} must be an int >= 1, got {value!r}", field=name)
        self.timeout = _check_timeout("timeout", timeout)
        self.max_queue = max_queue
        self.max_batch = max_batch
        self._run_batch = run_batch
        self._clock = clock
        self._on_event = on_event
        self._cond = threading.Condition()
        self._queue: list[Job] = []  # queued jobs, ordered by submission number
        self._live: dict[str, Job] = {}  # queued and running jobs by id
        self._history: OrderedDict[str, FinishedJob] = OrderedDict()  # finished jobs, oldest first
        self._history_size = history
        self._control: Control | None = None  # the running batch
        self._closing = False
        self._worker: threading.Thread | None = None
        self._watcher: threading.Thread | None = None
        self._numbers = itertools.count(1)
        self._recent: deque[tuple[int, int, float]] = deque(maxlen=RECENT_BATCHES)  # clean runs: (jobs, images, s)
        self._sizes: deque[int] = deque(maxlen=RECENT_BATCHES)  # jobs in each recent batch, stopped or failed too
        self._counts = dict.fromkeys(
            ("done", "failed", "cancelled", "timed_out", "images", "rejected_full", "batches"), 0
        )

    # ---------------------------------------------------------------- public API

    def start(self) -> None:
        """Start the worker and the deadline watcher (submit does it on first use). Idempotent."""
        with self._cond:
            if self._worker is not None or self._closing:
                return
            self._worker = threading.Thread(target=self._work, name="diffspeed-jobs", daemon=True)
            self._watcher = threading.Thread(target=self._watch, name="diffspeed-jobs-deadlines", daemon=True)
            self._worker.start()
            self._watcher.start()

    def submit(
        self, payload: Any, key: Hashable, n_images: int = 1, *, task_id: str | None = None,
        timeout: float | None = None,
    ) -> Job:
        """Queue a job and return it; its ``future`` gives the result.

        ``timeout`` (seconds, from now, queued and running together) overrides the queue's default. Raises
        ``QueueFull`` when ``max_queue`` jobs are waiting (running ones do not count), ``ShuttingDown`` after
        ``shutdown`` began, ``DiffspeedError`` (a ValueError) for a bad ``n_images`` or ``timeout`` or a
        ``task_id`` already in use by a queued or running job (``TaskIdInUse``)."""
        if isinstance(n_images, bool) or not isinstance(n_images, int) or n_images < 1:
            raise DiffspeedError(f"n_images must be an int >= 1, got {n_images!r}", field="n_images")
        timeout = self.timeout if timeout is None else _check_timeout("timeout", timeout)
        if task_id is not None and (not isinstance(task_id, str) or not task_id):
            raise DiffspeedError(f"task_id must be a non-empty string, got {task_id!r}", field="task_id")
        hash(key)  # a TypeError now, not in the worker
        pending = _Pending()
        try:
            with self._cond:
                if self._closing:
                    raise ShuttingDown("the server is shutting down and accepts no new jobs")
                self._expire(pending)
                if task_id is not None and task_id in self._live:
                    raise TaskIdInUse(f"force_task_id {task_id!r} belongs to a queued or running request; "
                                      f"wait for it, or send another id", field="force_task_id")
                if task_id is not None:  # a finished job's id may be used again: progress reports the new one
                    self._history.pop(task_id, None)
                if len(self._queue) >= self.max_queue:
                    self._counts["rejected_full"] += 1
                    pending.events.append(("rejected", {}))
                    retry_after = self._retry_after()
                    raise QueueFull(
                        f"the queue is full ({self.max_queue} jobs waiting); retry in about {retry_after} s",
                        retry_after=retry_after,
                    )
                now = self._clock()
                job = Job(
                    id=task_id or uuid.uuid4().hex, key=key, payload=payload, n_images=n_images, created=now,
                    deadline=None if timeout is None else now + timeout, no=next(self._numbers),
                )
                self._queue.append(job)
                self._live[job.id] = job
                self._cond.notify_all()
        finally:
            self._settle(pending)
        job.future.add_done_callback(functools.partial(self._future_done, job.id))
        self.start()
        return job

    def cancel(self, job_id: str) -> bool:
        """Take a queued job out of the queue (its future raises ``JobCancelled``). False for a job that is
        unknown, running or finished."""
        pending = _Pending()
        with self._cond:
            job = self._live.get(job_id)
            if job is None or job.state != "queued":
                return False
            self._finish(pending, job, error=JobCancelled(f"job {job_id} was cancelled"))
            self._cond.notify_all()
        self._settle(pending)
        return True

    def interrupt(self) -> bool:
        """Ask the running batch to stop ("interrupt"); its jobs return what they made. False when idle."""
        with self._cond:
            if self._control is None:
                return False
            self._control.interrupted = True
            return True

    def skip(self) -> bool:
        """Ask the running batch to skip its current pass ("skip"). False when idle."""
        with self._cond:
            if self._control is None:
                return False
            self._control.skipped = True
            return True

    def check_timeouts(self) -> int:
        """Fail every job past its deadline now; returns how many. The watcher thread calls this at each
        deadline; with an injected clock, call it after moving the clock."""
        pending = _Pending()
        with self._cond:
            self._expire(pending)
        self._settle(pending)
        return len(pending.outcomes)

    def progress(self, job_id: str | None = None) -> dict:
        """The web UI's /progress answer, for ``job_id`` or else for the running job.

        ``queue.position``: 0 running, 1.. queued, None unknown or finished; ``job_state`` is the job's state
        (None when there is no such job)."""
        with self._cond:
            now = self._clock()
            control = self._control
            running = [j for j in control.jobs if j.state == "running"] if control else []
            if job_id is None:
                job = running[0] if running else None
            else:
                job = self._live.get(job_id) or self._history.get(job_id)
            position = None
            if job is not None and job_id is not None:
                if job.state == "running":
                    position = 0
                elif job.state == "queued":
                    position = 1 + self._queue.index(job)
            in_batch = job is not None and job.state == "running" and control is not None and job in control.jobs
            stopping = in_batch and bool(control.interrupted or control.skipped or control.told)
            return {
                "progress": job.progress if job is not None else 0.0,
                "eta_relative": self._eta(job, now) if job is not None else 0.0,
                "state": {
                    "skipped": in_batch and control.skipped,
                    "interrupted": in_batch and control.interrupted,
                    "stopping_generation": self._closing or stopping,
                    "job": job.id if job is not None else "",
                    "job_count": len(running) + len(self._queue),
                    "job_timestamp": job.timestamp if job is not None else "",
                    "job_no": job.no if job is not None else 0,
                    "sampling_step": job.step if job is not None else 0,
                    "sampling_steps": job.steps if job is not None else 0,
                },
                "queue": {"depth": len(self._queue), "running": len(running), "position": position},
                "job_state": job.state if job is not None else None,
                "textinfo": control.textinfo if in_batch else None,
            }

    def stats(self) -> dict:
        """Counters for metrics and /health: depth, running, done, failed (timed_out among them), cancelled,
        images (of done jobs), rejected_full, batches, and the sizes (jobs) of recent batches, oldest first."""
        with self._cond:
            running = sum(j.state == "running" for j in self._control.jobs) if self._control else 0
            return {
                "depth": len(self._queue), "running": running, **self._counts,
                "recent_batch_sizes": list(self._sizes),
                "closing": self._closing,
            }

    @property
    def closing(self) -> bool:
        return self._closing

    def shutdown(self, grace: float = 0.0) -> None:
        """Stop accepting jobs and fail every queued one with ``ShuttingDown`` at once; give the running batch
        ``grace`` seconds (real time) to finish, then interrupt it (its jobs still resolve). Idempotent."""
        pending = _Pending()
        with self._cond:
            self._closing = True
            for job in list(self._queue):
                self._finish(pending, job, error=ShuttingDown("the server is shutting down; the job did not start"))
            self._cond.notify_all()
        self._settle(pending)
        end = time.monotonic() + max(0.0, grace)
        with self._cond:
            while self._control is not None and (left := end - time.monotonic()) > 0:
                self._cond.wait(left)
            if self._control is not None:
                self._control.interrupted = True

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the worker to end (after ``shutdown``). If it is still running after ``timeout`` seconds
        during a shutdown, its jobs fail with ``ShuttingDown`` so no future is left waiting; returns False."""
        end = None if timeout is None else time.monotonic() + timeout
        for thread in (self._worker, self._watcher):
            if thread is not None:
                thread.join(None if end is None else max(0.0, end - time.monotonic()))
        if not any(t is not None and t.is_alive() for t in (self._worker, self._watcher)):
            return True
        pending = _Pending()
        with self._cond:
            if self._closing:
                for job in list(self._live.values()):
                    self._finish(pending, job, error=ShuttingDown("the server shut down before the job finished"))
                self._cond.notify_all()
        self._settle(pending)
        return False

    def __enter__(self) -> JobQueue:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown(0.0)
        self.join()

    # ---------------------------------------------------------------- worker side

    def _work(self) -> None:
        try:
            while self._work_once():
                pass
        finally:
            # the normal end (shutdown), or the worker broke (a BaseException from the work): nothing stays open
            pending = _Pending()
            with self._cond:
                self._closing = True
                self._control = None
                for job in list(self._live.values()):
                    self._finish(pending, job, error=ShuttingDown("the job worker stopped"))
                self._cond.notify_all()
            self._settle(pending)

    def _work_once(self) -> bool:
        pending = _Pending()
        with self._cond:
            while not self._queue and not self._closing:
                self._cond.wait()
            self._expire(pending)
            control = None if self._closing else self._take(pending)
            closing = self._closing
        self._settle(pending)
        if control is not None:
            self._run(control)
        return not closing

    def _take(self, pending: _Pending) -> Control | None:
        """Under the lock: the next batch, marked running, or None."""
        batch: list[Job] = []
        images = 0
        for job in list(self._queue):
            if batch and (job.alone or batch[0].alone or job.key != batch[0].key
                          or images + job.n_images > self.max_batch):
                continue
            # a future cancelled by its caller (asyncio.wrap_future's task cancelled) is claimed by nobody
            if not (job.future.running() or job.future.set_running_or_notify_cancel()):
                self._finish(pending, job, error=JobCancelled(f"job {job.id} was cancelled"))
                continue
            batch.append(job)
            images += job.n_images
            if images >= self.max_batch or job.alone:
                break
        if not batch:
            return None
        now = self._clock()
        stamp = datetime.now().strftime("%Y%m%d%H%M%S")
        for job in batch:
            self._queue.remove(job)
            job.state, job.started, job.timestamp, job.step, job.steps = "running", now, stamp, 0, 0
        self._control = Control(self, batch, now)
        return self._control

    def _run(self, control: Control) -> None:
        jobs = list(control.jobs)
        start = self._clock()
        results: list[Any] | None = None
        error: Exception | None = None
        try:
            results = list(self._run_batch(jobs, control))
            if len(results) != len(jobs):
                raise DiffspeedRuntimeError(f"the work returned {len(results)} results for {len(jobs)} jobs")
        except Exception as exc:  # any failure of the work ends in the jobs' futures
            error, results = exc, None
            log.info("a batch of %d job(s) failed: %s: %s", len(jobs), type(exc).__name__, exc)
        pending = _Pending()
        with self._cond:
            self._control = None
            self._after_batch(pending, control, results, error, self._clock() - start)
            self._cond.notify_all()
        self._settle(pending)

    def _after_batch(self, pending: _Pending, control: Control, results, error, seconds: float) -> None:
        jobs = control.jobs
        images = sum(j.n_images for j in jobs)
        stopped = sorted(control.told) or None
        self._counts["batches"] += 1
        self._sizes.append(len(jobs))
        if not control.told and error is None:
            self._recent.append((len(jobs), images, seconds))
        pending.events.append(("batch", {"size": len(jobs), "images": images, "seconds": seconds,
                                         "stopped": stopped, "error": type(error).__name__ if error else None}))
        cut_by_timeout = "timeout" in control.told
        user_stopped = control.interrupted or control.skipped or bool(control.told & {"interrupt", "skip"})
        retry_alone = error is not None and len(jobs) > 1 and not user_stopped
        now = self._clock()
        for i, job in enumerate(jobs):
            if job.state != "running":  # timed out during the run, or given up by join()
                continue
            if job.deadline is not None and now >= job.deadline:
                self._finish(pending, job, error=_timeout(job, "running"))
            elif cut_by_timeout:  # a batch-mate timed out and the work stopped early: run this one again
                self._requeue(pending, job, alone=job.alone)
            elif error is None:
                self._finish(pending, job, result=results[i])
            elif retry_alone:
                self._requeue(pending, job, alone=True)
            else:
                self._finish(pending, job, error=error)

    def _requeue(self, pending: _Pending, job: Job, *, alone: bool) -> None:
        if self._closing:
            self._finish(pending, job, error=ShuttingDown("the server is shutting down; the job did not finish"))
            return
        job.state, job.started, job.timestamp, job.step, job.steps, job.alone = "queued", None, "", 0, 0, alone
        bisect.insort(self._queue, job, key=lambda j: j.no)

    def _report_step(self, control: Control, job: Job | None, i: int, n: int) -> None:
        if job is not None and job not in control.jobs:
            raise ValueError(f"job {job.id} is not in this batch")
        with self._cond:
            for j in control.jobs if job is None else (job,):
                j.steps = max(0, int(n))
                j.step = min(max(0, int(i)), j.steps)

    def _stop_reason(self, control: Control) -> StopReason | None:
        pending = _Pending()
        with self._cond:
            now = self._clock()
            late = [j for j in control.jobs if j.deadline is not None and now >= j.deadline]
            for job in late:
                if job.state == "running":
                    self._finish(pending, job, error=_timeout(job, "running"))
            reason: StopReason | None
            if control.interrupted:
                reason = "interrupt"
            elif late:
                reason = "timeout"
            elif control.skipped:
                reason = "skip"
            else:
                reason = None
            if reason is not None:
                control.told.add(reason)
        self._settle(pending)
        return reason

    # ---------------------------------------------------------------- deadlines

    def _watch(self) -> None:
        while True:
            pending = _Pending()
            with self._cond:
                self._expire(pending)
                done = self._closing and not self._live
                if not done and not pending.outcomes:
                    self._cond.wait(self._next_wait())
            self._settle(pending)
            if done:
                return

    def _next_wait(self) -> float | None:
        running = [j for j in self._control.jobs if j.state == "running"] if self._control else []
        deadlines = [j.deadline for j in (*self._queue, *running) if j.deadline is not None]
        if not deadlines:
            return None
        return min(max(min(deadlines) - self._clock(), 0.0) + 0.001, _WATCH_CAP)

    def _expire(self, pending: _Pending) -> None:
        """Under the lock: fail queued and running jobs past their deadline."""
        now = self._clock()
        for job in [j for j in self._queue if j.deadline is not None and now >= j.deadline]:
            self._finish(pending, job, error=_timeout(job, "queued"))
        if self._control is not None:
            for job in self._control.jobs:
                if job.state == "running" and job.deadline is not None and now >= job.deadline:
                    self._finish(pending, job, error=_timeout(job, "running"))

    # ---------------------------------------------------------------- bookkeeping

    def _finish(self, pending: _Pending, job: Job, *, result: Any = _NO_RESULT, error: BaseException | None = None):
        """Under the lock: move a queued or running job to its final state; its future resolves in _settle."""
        assert job.state in ("queued", "running"), job.state
        if job.state == "queued":
            self._queue.remove(job)
        now = self._clock()
        job.finished = now
        if error is None:
            job.state = "done"
            self._counts["done"] += 1
            self._counts["images"] += job.n_images
            wait = (job.started if job.started is not None else now) - job.created
            pending.events.append(("done", {"latency": now - job.created, "wait": wait}))
        else:
            job.state = "cancelled" if isinstance(error, JobCancelled) else "failed"
            self._counts["cancelled" if job.state == "cancelled" else "failed"] += 1
            self._counts["timed_out"] += isinstance(error, JobTimeout)
            pending.events.append(("failed", {"error": type(error).__name__, "latency": now - job.created}))
        del self._live[job.id]
        self._history[job.id] = FinishedJob.of(job, error)
        while len(self._history) > self._history_size:
            self._history.popitem(last=False)
        pending.outcomes.append((job, None if error is not None else result, error))

    def _settle(self, pending: _Pending) -> None:
        """Outside the lock: resolve futures (their callbacks run here) and emit events."""
        for job, result, error in pending.outcomes:
            if job.future.cancelled():
                continue
            try:
                if error is None:
                    job.future.set_result(result)
                else:
                    job.future.set_exception(error)
            except InvalidStateError:  # cancelled by its caller in between
                pass
        if self._on_event is not None:
            for name, data in pending.events:
                try:
                    self._on_event(name, data)
                except Exception:  # metrics must never break the queue
                    log.exception("the job queue's on_event callback failed on %r", name)

    def _future_done(self, job_id: str, future: Future) -> None:
        if future.cancelled():  # e.g. the asyncio task awaiting it was cancelled: the client went away
            self.cancel(job_id)

    def _batch_seconds(self) -> float:
        return statistics.median(s for _, _, s in self._recent) if self._recent else DEFAULT_BATCH_SECONDS

    def _job_seconds(self) -> float:
        """Seconds per job, from recent batches (a batch of n jobs costs less than n batches)."""
        jobs = sum(n for n, _, _ in self._recent)
        return sum(s for _, _, s in self._recent) / jobs if jobs else DEFAULT_BATCH_SECONDS

    def _running_left(self, now: float) -> float:
        """Estimated seconds until the running batch ends (0 when idle)."""
        control = self._control
        if control is None:
            return 0.0
        elapsed = now - control.started
        job = next((j for j in control.jobs if j.steps > 0), None)
        if job is not None and job.step > 0:
            return max(elapsed * (job.steps - job.step) / job.step, 0.0)
        return max(self._batch_seconds() - elapsed, 0.0)

    def _eta(self, job: Job | FinishedJob, now: float) -> float:
        if job.state == "running":
            return self._running_left(now)
        if job.state == "queued":
            ahead = self._queue.index(job)
            return self._running_left(now) + ahead * self._job_seconds() + self._batch_seconds()
        return 0.0

    def _retry_after(self) -> int:
        """A slot opens when the worker takes the next batch, that is when the running batch ends."""
        now = self._clock()
        left = self._running_left(now) if self._control is not None else self._batch_seconds()
        return max(1, math.ceil(left))


def _check_timeout(name: str, value: float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
        raise DiffspeedError(f"{name} must be a positive number of seconds or None, got {value!r}", field=name)
    return float(value)


def _timeout(job: Job, where: str) -> JobTimeout:
    limit = job.deadline - job.created if job.deadline is not None else 0.0
    return JobTimeout(f"job {job.id} timed out while {where} (limit {limit:g} s)")
