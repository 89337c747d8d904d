"""The job queue: FIFO, batching, limits, timeouts, interrupt/skip/cancel, progress, shutdown, no lost work.

The work is a fake: it records each batch, then waits for a permit (or for ``open``) while polling
``stop_reason()``, so every test decides when a batch ends; every wait is bounded by ``T`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import re
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest

from diffspeed.errors import DiffspeedError, DiffspeedRuntimeError
from diffspeed.server.jobs import (
    Job,
    JobCancelled,
    JobQueue,
    JobTimeout,
    QueueFull,
    ShuttingDown,
    TaskIdInUse,
)

T = 5.0  # the bound on every wait: a broken queue fails the test instead of hanging it


class Work:
    """A fake ``run_batch``: results are ``"<payload>:<why it ended>"`` ("ok" or the stop reason)."""

    def __init__(self, *, open: bool = False, poll: bool = True, steps: tuple[int, int] | None = None, hook=None):
        self.batches: list[list] = []
        self.entered: queue.Queue = queue.Queue()  # each batch's payloads, when it starts
        self.open = threading.Event()  # let every batch through
        self.permits = threading.Semaphore(0)  # let one batch through per release()
        if open:
            self.open.set()
        self.poll = poll
        self.steps = steps
        self.hook = hook

    def release(self, n: int = 1) -> None:
        self.permits.release(n)

    def started(self) -> list:
        return self.entered.get(timeout=T)

    def __call__(self, jobs: list[Job], control) -> list[str]:
        payloads = [job.payload for job in jobs]
        self.batches.append(payloads)
        if self.hook is not None:
            self.hook(jobs, control)
        if self.steps is not None:
            control.step(None, *self.steps)
            control.textinfo = "working"
        self.entered.put(payloads)
        reason = self._wait(control)
        if "bad" in payloads:
            raise DiffspeedRuntimeError("boom")
        return [f"{p}:{reason or 'ok'}" for p in payloads]

    def _wait(self, control) -> str | None:
        deadline = time.monotonic() + T
        while time.monotonic() < deadline:
            if self.open.is_set() or self.permits.acquire(timeout=0.002):
                return None
            if self.poll and (reason := control.stop_reason()):
                return reason
        raise AssertionError("the test never let this batch finish")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def wait_until(predicate, what: str) -> None:
    deadline = time.monotonic() + T
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


@pytest.fixture
def make():
    made: list[tuple[JobQueue, Work]] = []

    def make(work: Work | None = None, **kwargs) -> tuple[JobQueue, Work]:
        work = work or Work()
        kwargs.setdefault("max_queue", 16)
        kwargs.setdefault("max_batch", 1)
        q = JobQueue(work, **kwargs)
        made.append((q, work))
        return q, work

    yield make
    for q, work in made:
        if isinstance(work, Work):
            work.open.set()
        q.shutdown(0)
        assert q.join(T)


def results(jobs) -> list:
    return [job.future.result(T) for job in jobs]


# ---------------------------------------------------------------- order and batching


def test_fifo_order(make):
    q, work = make(max_batch=1)
    first = q.submit("a", "k")
    assert work.started() == ["a"]
    jobs = [first] + [q.submit(p, "k") for p in "bcde"]
    assert [j.state for j in jobs] == ["running"] + ["queued"] * 4
    work.open.set()
    assert results(jobs) == ["a:ok", "b:ok", "c:ok", "d:ok", "e:ok"]
    assert work.batches == [["a"], ["b"], ["c"], ["d"], ["e"]]
    assert [j.no for j in jobs] == [1, 2, 3, 4, 5]
    assert all(j.state == "done" and j.finished >= j.started >= j.created for j in jobs)


def test_equal_keys_batch_first_fit_up_to_max_batch(make):
    q, work = make(max_batch=4)
    blocker = q.submit("x", "z")
    work.started()
    jobs = [q.submit("a1", "a", 2), q.submit("b1", "b"), q.submit("a2", "a"), q.submit("a3", "a", 2),
            q.submit("a4", "a")]
    work.open.set()
    results([blocker, *jobs])
    # a1+a2 = 3 images, a3 (2 more) does not fit, a4 does: a3 then waits behind the older b1
    assert work.batches == [["x"], ["a1", "a2", "a4"], ["b1"], ["a3"]]


def test_different_keys_are_not_batched(make):
    q, work = make(max_batch=8)
    blocker = q.submit("x", "z")
    work.started()
    jobs = [q.submit(f"{key}{i}", key) for i in range(2) for key in "ab"]
    work.open.set()
    results([blocker, *jobs])
    assert work.batches == [["x"], ["a0", "a1"], ["b0", "b1"]]


def test_max_batch_one_never_batches(make):
    q, work = make(max_batch=1)
    blocker = q.submit("x", "k")
    work.started()
    jobs = [q.submit(f"j{i}", "k") for i in range(3)]
    work.open.set()
    results([blocker, *jobs])
    assert work.batches == [["x"], ["j0"], ["j1"], ["j2"]]


def test_a_job_larger_than_max_batch_runs_alone(make):
    q, work = make(max_batch=2)
    blocker = q.submit("x", "z")
    work.started()
    jobs = [q.submit("big", "a", 5), q.submit("s1", "a"), q.submit("s2", "a")]
    work.open.set()
    assert results(jobs) == ["big:ok", "s1:ok", "s2:ok"]
    blocker.future.result(T)
    assert work.batches == [["x"], ["big"], ["s1", "s2"]]


# ---------------------------------------------------------------- limits and ids


def test_queue_full_counts_waiting_jobs_only(make):
    events = []
    clock = FakeClock()
    work = Work(hook=lambda jobs, control: clock.advance(30) if jobs[0].payload == "first" else None)
    q, _ = make(work=work, max_queue=2, clock=clock, on_event=lambda name, data: events.append((name, data)))
    q.submit("first", "k")
    work.started()
    work.release()
    wait_until(lambda: q.stats()["done"] == 1, "the first batch")  # one 30 s batch: the estimate
    running = q.submit("r", "k")
    work.started()
    waiting = [q.submit("q1", "k"), q.submit("q2", "k")]  # the running job does not count
    clock.advance(10)
    with pytest.raises(QueueFull, match="2 jobs waiting") as err:
        q.submit("q3", "k")
    assert isinstance(err.value, DiffspeedRuntimeError)
    assert err.value.retry_after == 20  # the running batch's 30 s less the 10 s it has run
    assert q.stats()["rejected_full"] == 1
    assert ("rejected", {}) in events
    work.open.set()
    assert results([running, *waiting]) == ["r:ok", "q1:ok", "q2:ok"]
    assert q.submit("q3", "k").future.result(T) == "q3:ok"  # room again


def test_retry_after_is_at_least_one_second(make):
    q, work = make(max_queue=1)
    q.submit("r", "k")
    work.started()
    q.submit("q", "k")
    with pytest.raises(QueueFull) as err:
        q.submit("q2", "k")
    assert err.value.retry_after >= 1


def test_duplicate_task_id(make):
    q, work = make(work=Work())
    job = q.submit("a", "k", task_id="t1")
    assert job.id == "t1"
    work.started()  # running now, held at the gate
    with pytest.raises(TaskIdInUse, match="'t1' belongs to a queued or running request") as err:
        q.submit("b", "k", task_id="t1")
    assert isinstance(err.value, DiffspeedError) and err.value.field == "force_task_id"
    work.open.set()
    assert job.future.result(T) == "a:ok"
    again = q.submit("b", "k", task_id="t1")  # a finished job's id may be used again (a client's retry)
    assert again.future.result(T) == "b:ok" and q.progress("t1")["progress"] == 1
    assert len(q.submit("c", "k").id) == 32  # uuid4 hex otherwise


def test_bad_arguments_are_refused():
    with pytest.raises(DiffspeedError, match="max_batch") as err:
        JobQueue(Work(), max_queue=4, max_batch=0)
    assert err.value.field == "max_batch"
    with pytest.raises(DiffspeedError, match="timeout"):
        JobQueue(Work(), max_queue=4, max_batch=1, timeout=-1)
    q = JobQueue(Work(), max_queue=4, max_batch=1)
    with pytest.raises(DiffspeedError, match="n_images") as err:
        q.submit("a", "k", 0)
    assert err.value.field == "n_images"
    with pytest.raises(DiffspeedError, match="timeout"):
        q.submit("a", "k", timeout=0)
    with pytest.raises(TypeError):
        q.submit("a", ["not", "hashable"])
    assert q.stats()["depth"] == 0
    assert q.join(0)  # never started


# ---------------------------------------------------------------- cancel, interrupt, skip


def test_cancel_queued_only(make):
    q, work = make()
    running = q.submit("r", "k")
    work.started()
    first, second = q.submit("q1", "k"), q.submit("q2", "k")
    assert q.cancel(first.id) is True
    assert first.state == "cancelled"
    with pytest.raises(JobCancelled):
        first.future.result(T)
    assert q.cancel(first.id) is False  # already finished
    assert q.cancel(running.id) is False  # running
    assert q.cancel("no-such-job") is False
    # the caller cancelling the future (asyncio.wrap_future's task cancelled) takes the job out too
    assert second.future.cancel()
    assert second.state == "cancelled" and q.stats()["depth"] == 0
    work.open.set()
    assert running.future.result(T) == "r:ok"
    assert q.cancel(running.id) is False
    assert work.batches == [["r"]]
    assert q.stats()["cancelled"] == 2


def test_cancelled_asyncio_waiter_cancels_the_queued_job(make):
    q, work = make()
    q.submit("r", "k")
    work.started()
    job = q.submit("q", "k")

    async def main():
        task = asyncio.ensure_future(asyncio.wrap_future(job.future))
        await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        for _ in range(3):  # the cancel reaches the concurrent future on a later loop turn
            await asyncio.sleep(0)

    asyncio.run(main())
    assert job.state == "cancelled"
    assert q.stats()["depth"] == 0


@pytest.mark.parametrize("method", ["interrupt", "skip"])
def test_interrupt_and_skip_reach_only_the_running_batch(make, method):
    q, work = make()
    assert getattr(q, method)() is False  # idle: nothing to stop, nothing remembered
    running = q.submit("r", "k")
    work.started()
    later = q.submit("later", "k")
    assert getattr(q, method)() is True
    # the web UI's semantics: an interrupted job returns what it made, as a normal result
    assert running.future.result(T) == f"r:{method}"
    assert running.state == "done"
    assert work.started() == ["later"]
    state = q.progress()["state"]
    assert state["interrupted"] is False and state["skipped"] is False and state["job"] == later.id
    work.release()
    assert later.future.result(T) == "later:ok"


def test_skip_lasts_until_reset(make):
    seen = []
    entered, go = threading.Event(), threading.Event()

    def run(jobs, control):
        entered.set()
        assert go.wait(T)
        seen.append(control.stop_reason())
        control.reset_skip()
        seen.append(control.stop_reason())
        return [None] * len(jobs)

    q = make(work=run)[0]
    job = q.submit("a", "k")
    assert entered.wait(T)
    q.skip()
    assert q.progress()["state"]["skipped"] is True
    go.set()
    job.future.result(T)
    assert seen == ["skip", None]


# ---------------------------------------------------------------- timeouts


def test_queued_job_times_out(make):
    clock = FakeClock()
    q, work = make(clock=clock, timeout=10)
    running = q.submit("r", "k", timeout=100)
    work.started()
    late = q.submit("w", "k")
    clock.advance(11)
    assert q.check_timeouts() == 1
    with pytest.raises(JobTimeout, match="queued"):
        late.future.result(T)
    assert late.state == "failed"
    assert q.stats()["depth"] == 0 and q.stats()["timed_out"] == 1
    work.open.set()
    assert running.future.result(T) == "r:ok"
    assert work.batches == [["r"]]


def test_queued_timeout_needs_no_caller(make):
    q, work = make()
    running = q.submit("r", "k")
    work.started()
    late = q.submit("w", "k", timeout=0.05)  # the watcher thread fails it while the worker is busy
    with pytest.raises(JobTimeout):
        late.future.result(T)
    assert running.state == "running"


def test_running_timeout_fails_the_job_and_reruns_its_batch_mates(make):
    clock = FakeClock()
    q, work = make(clock=clock, max_batch=2)
    blocker = q.submit("x", "z")
    work.started()
    slow = q.submit("a1", "a", timeout=5)
    mate = q.submit("a2", "a", timeout=100)
    work.release()
    assert work.started() == ["a1", "a2"]
    clock.advance(6)  # the work sees stop_reason() == "timeout" at its next poll
    with pytest.raises(JobTimeout, match="running"):
        slow.future.result(T)
    assert work.started() == ["a2"]  # its cut-short batch-mate went back to the queue and runs again
    work.release()
    assert mate.future.result(T) == "a2:ok"
    assert blocker.future.result(T) == "x:ok"
    assert work.batches == [["x"], ["a1", "a2"], ["a2"]]
    assert q.stats()["timed_out"] == 1


# ---------------------------------------------------------------- failures


def test_a_failing_batch_is_retried_job_by_job(make):
    q, work = make(max_batch=4)
    blocker = q.submit("x", "z")
    work.started()
    good1, bad, good2 = q.submit("g1", "a"), q.submit("bad", "a"), q.submit("g2", "a")
    work.open.set()
    assert results([blocker, good1, good2]) == ["x:ok", "g1:ok", "g2:ok"]
    with pytest.raises(DiffspeedRuntimeError, match="boom"):
        bad.future.result(T)
    assert bad.state == "failed"
    assert work.batches == [["x"], ["g1", "bad", "g2"], ["g1"], ["bad"], ["g2"]]
    alone = q.submit("bad", "a")  # a job that fails alone is not retried
    with pytest.raises(DiffspeedRuntimeError, match="boom"):
        alone.future.result(T)
    assert work.batches[-1] == ["bad"] and len(work.batches) == 6
    assert q.stats()["failed"] == 2


def test_wrong_number_of_results_fails_the_job(make):
    q = make(work=lambda jobs, control: [])[0]
    with pytest.raises(DiffspeedRuntimeError, match="0 results for 1 jobs"):
        q.submit("a", "k").future.result(T)


def test_a_failing_event_callback_does_not_break_the_queue(make):
    def on_event(name, data):
        raise RuntimeError("metrics down")

    q = make(work=Work(open=True), on_event=on_event)[0]
    assert q.submit("a", "k").future.result(T) == "a:ok"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dying_worker_resolves_every_future(make):
    entered, go = threading.Event(), threading.Event()

    def run(jobs, control):
        entered.set()
        assert go.wait(T)
        raise SystemExit  # not an Exception: it ends the worker thread

    q = make(work=run)[0]
    running = q.submit("r", "k")
    assert entered.wait(T)
    queued = q.submit("q", "k")
    go.set()
    for job in (running, queued):
        with pytest.raises(ShuttingDown, match="worker stopped"):
            job.future.result(T)
    assert q.closing
    with pytest.raises(ShuttingDown):
        q.submit("x", "k")


# ---------------------------------------------------------------- shutdown


def test_shutdown_fails_queued_jobs_and_lets_the_running_batch_finish(make):
    q, work = make()
    running = q.submit("r", "k")
    work.started()
    queued = [q.submit("q1", "k"), q.submit("q2", "k")]
    closer = threading.Thread(target=q.shutdown, args=(T,))
    closer.start()
    for job in queued:
        with pytest.raises(ShuttingDown):
            job.future.result(T)
    with pytest.raises(ShuttingDown):
        q.submit("late", "k")
    assert q.progress()["state"]["stopping_generation"] is True
    work.release()
    assert running.future.result(T) == "r:ok"  # finished within the grace: not interrupted
    closer.join(T)
    assert not closer.is_alive()
    assert q.join(T) is True
    q.shutdown(0)  # idempotent
    assert work.batches == [["r"]]


def test_shutdown_interrupts_the_running_batch_after_the_grace(make):
    q, work = make()
    running = q.submit("r", "k")
    work.started()
    q.shutdown(0.05)
    assert running.future.result(T) == "r:interrupt"
    assert q.join(T) is True


def test_join_gives_up_on_work_that_does_not_stop(make):
    q, work = make(work=Work(poll=False))
    running = q.submit("r", "k")
    work.started()
    q.shutdown(0)
    assert q.join(0.05) is False
    with pytest.raises(ShuttingDown, match="before the job finished"):
        running.future.result(0)
    work.open.set()  # the late result is dropped, not set twice
    assert q.join(T) is True
    assert running.state == "failed"


# ---------------------------------------------------------------- many threads


def _count_resolutions(job: Job, counts: Counter, lock: threading.Lock) -> None:
    def done(_future):
        with lock:
            counts[job.id] += 1

    job.future.add_done_callback(done)


def test_200_jobs_from_16_threads_each_resolve_once(make):
    q, work = make(work=Work(open=True), max_queue=1000, max_batch=4)
    counts, lock = Counter(), threading.Lock()
    jobs: list[Job] = []

    def submitter(t: int) -> None:
        for k in range(t, 200, 16):
            job = q.submit((k, k % 3, 1 + k % 2), k % 3, 1 + k % 2)
            _count_resolutions(job, counts, lock)
            with lock:
                jobs.append(job)

    threads = [threading.Thread(target=submitter, args=(t,)) for t in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(T)
    assert len(jobs) == 200
    assert all(job.future.result(T) == f"{job.payload}:ok" for job in jobs)
    wait_until(lambda: sum(counts.values()) == 200, "every done-callback")
    assert set(counts.values()) == {1} and len(counts) == 200
    ran = [payload for batch in work.batches for payload in batch]
    assert sorted(ran) == sorted(job.payload for job in jobs)  # none lost, none run twice
    for batch in work.batches:
        assert len({key for _, key, _ in batch}) == 1
        assert len(batch) == 1 or sum(n for _, _, n in batch) <= 4
    stats = q.stats()
    assert (stats["done"], stats["failed"], stats["depth"], stats["running"]) == (200, 0, 0, 0)
    assert stats["images"] == sum(job.n_images for job in jobs)


def test_cancels_rejections_and_shutdown_under_load_leave_no_future_open(make):
    work = Work(open=True, hook=lambda jobs, control: time.sleep(0.001))
    q, _ = make(work=work, max_queue=24, max_batch=3)
    counts, lock = Counter(), threading.Lock()
    accepted: list[Job] = []
    refused = Counter()

    def submitter(t: int) -> None:
        for k in range(t, 200, 16):
            try:
                job = q.submit(k, k % 2, task_id=f"task-{k}")
            except (QueueFull, ShuttingDown) as exc:
                refused[type(exc).__name__] += 1
                continue
            _count_resolutions(job, counts, lock)
            with lock:
                accepted.append(job)
            if k % 5 == 0:
                q.cancel(job.id)

    threads = [threading.Thread(target=submitter, args=(t,)) for t in range(16)]
    for thread in threads:
        thread.start()
    wait_until(lambda: q.stats()["done"] >= 20, "some finished jobs")
    q.shutdown(T)
    for thread in threads:
        thread.join(T)
    assert q.join(T)
    for job in accepted:
        assert job.future.done()
        assert job.state in ("done", "failed", "cancelled")
    wait_until(lambda: sum(counts.values()) == len(accepted), "every done-callback")
    assert set(counts.values()) == {1}
    ran = [payload for batch in work.batches for payload in batch]
    assert len(ran) == len(set(ran))
    assert set(ran) == {job.payload for job in accepted if job.state == "done"}
    stats = q.stats()
    assert stats["done"] + stats["failed"] + stats["cancelled"] == len(accepted)
    assert stats["rejected_full"] == refused["QueueFull"]
    assert len(accepted) + sum(refused.values()) == 200


# ---------------------------------------------------------------- progress, stats, events


def test_progress_fields_and_positions(make):
    clock = FakeClock()
    q, work = make(clock=clock, work=Work(steps=(3, 10)))
    idle = q.progress()
    assert idle["progress"] == 0 and idle["state"]["job"] == "" and idle["state"]["job_count"] == 0
    assert idle["queue"] == {"depth": 0, "running": 0, "position": None} and idle["textinfo"] is None
    running = q.submit("r", "k")
    work.started()
    first, second = q.submit("q1", "k"), q.submit("q2", "k")
    clock.advance(6)
    now = q.progress()
    assert now["progress"] == pytest.approx(0.3)
    assert now["eta_relative"] == pytest.approx(14)  # 6 s for 3 of 10 steps: 14 s to go
    state = now["state"]
    assert state["job"] == running.id and state["job_no"] == 1 and state["job_count"] == 3
    assert (state["sampling_step"], state["sampling_steps"]) == (3, 10)
    assert re.fullmatch(r"\d{14}", state["job_timestamp"])
    assert not (state["skipped"] or state["interrupted"] or state["stopping_generation"])
    assert now["queue"] == {"depth": 2, "running": 1, "position": None}
    assert now["textinfo"] == "working" and now["job_state"] == "running"
    assert q.progress(running.id)["queue"]["position"] == 0
    assert q.progress(first.id)["queue"]["position"] == 1
    later = q.progress(second.id)
    assert later["queue"]["position"] == 2 and later["progress"] == 0 and later["job_state"] == "queued"
    assert later["state"]["job"] == second.id and later["textinfo"] is None
    assert later["eta_relative"] > now["eta_relative"]
    unknown = q.progress("no-such-job")
    assert unknown["queue"]["position"] is None and unknown["job_state"] is None and unknown["progress"] == 0
    work.open.set()
    results([running, first, second])
    done = q.progress(running.id)
    assert done["progress"] == 1 and done["queue"]["position"] is None and done["job_state"] == "done"
    assert done["eta_relative"] == 0 and done["state"]["job"] == running.id


def test_progress_remembers_a_bounded_history(make):
    q, _ = make(work=Work(open=True), history=2)
    jobs = [q.submit(i, "k") for i in range(3)]
    results(jobs)
    assert q.progress(jobs[0].id)["job_state"] is None  # forgotten
    assert q.progress(jobs[2].id)["job_state"] == "done"
    assert q.progress(jobs[1].id)["state"]["job_no"] == 2


def test_stats_and_events(make):
    events = []
    q, work = make(max_batch=4, on_event=lambda name, data: events.append((name, data)))
    blocker = q.submit("x", "z")
    work.started()
    jobs = [q.submit("a1", "a"), q.submit("b1", "b"), q.submit("a2", "a", 2)]
    work.open.set()
    results([blocker, *jobs])
    wait_until(lambda: sum(name == "done" for name, _ in events) == 4, "the done events")
    stats = q.stats()
    assert {k: stats[k] for k in ("depth", "running", "done", "failed", "images", "rejected_full", "batches")} == {
        "depth": 0, "running": 0, "done": 4, "failed": 0, "images": 5, "rejected_full": 0, "batches": 3}
    assert stats["recent_batch_sizes"] == [1, 2, 1]
    batches = [data for name, data in events if name == "batch"]
    assert [(b["size"], b["images"]) for b in batches] == [(1, 1), (2, 3), (1, 1)]
    assert all(b["seconds"] >= 0 and b["stopped"] is None and b["error"] is None for b in batches)
    assert all(data["latency"] >= data["wait"] >= 0 for name, data in events if name == "done")


def test_importing_the_queue_does_not_import_torch():
    code = "import sys, diffspeed.server.jobs; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
