"""Load-test ``diffspeed serve``: many concurrent txt2img requests, then check that every answer is right.

N requests (tiny-sd, 64x64, sampler Euler, distinct prompts from the tiny models' colour/shape vocabulary,
distinct seeds, each with a unique ``force_task_id``) go out from C concurrent clients. A client that gets 429
waits the response's Retry-After (capped) and sends the same request again. Then the run is VERIFIED:

- no 5xx, and every request ends in exactly one 200 carrying one image;
- N distinct images, each infotext naming the request's prompt and seed (nothing lost, swapped or duplicated);
- the server's own counters agree (``diffspeed_jobs_total{outcome="done"}`` grew by N, nothing failed, the
  ``diffspeed_rejected_total`` count equals the 429s the clients saw) -- this assumes nobody else uses the server;
- every image equals the same request run ALONE (sent again one at a time after the load, so each runs as a
  batch of one): batched matmuls may round the last float bit differently, so a difference of one level is
  allowed, and more than one level fails.

It reports p50/p90/p99 latency (first send to final answer, 429 waits included), images/s over the load phase,
the batch sizes the server ran (the ``diffspeed_batch_size`` histogram of ``GET /metrics``, load phase only)
and the 429s, as a JSON file and a markdown table. The exit status is 0 when every check passed, 1 when one
failed, 2 when the run could not be made (bad options, a server that would not start).

    # against a running server
    python tools/load_test.py --url http://127.0.0.1:7860 --requests 200 --clients 16
    # start `diffspeed serve` itself (free port), measure, SIGTERM it and check it exits 0
    python tools/load_test.py --spawn --max-batch 8 --max-queue 32
    # batching on (--max-batch 8) vs off (--max-batch 1), same requests, one command
    OMP_NUM_THREADS=4 python tools/load_test.py --compare-batching --out results.json

With ``--compare-batching`` the alone re-run is done for the batched server only: the unbatched server runs
every request as a batch of one already, and its images are compared with the batched server's as well.
The HTTP client is httpx's ``AsyncClient`` (``httpx``, else ``httpx2``), else urllib in a thread per client.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import io
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

API = "/sdapi/v1"
# the tiny models' vocabulary (diffspeed.tiny.data): 6 colours x 4 shapes x 9 positions x 3 backgrounds
COLOURS = ("red", "green", "blue", "yellow", "orange", "purple")
SHAPES = ("circle", "square", "triangle", "star")
POSITIONS = ("center", "top left", "top", "top right", "left", "right", "bottom left", "bottom", "bottom right")
BACKGROUNDS = ("white", "black", "gray")
SEED0 = 1000
LEVEL_TOLERANCE = 1  # uint8 levels an image may differ from its run alone (batched float rounding)
ENV_KEYS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "DIFFSPEED_TEST_THREADS", "CUDA_VISIBLE_DEVICES")


# ------------------------------------------------------------------------------------------------ requests
@dataclass(frozen=True)
class Spec:
    """One request of the load: its prompt, seed and task id are unique in the run."""

    index: int
    task_id: str
    prompt: str
    seed: int
    steps: int
    size: int
    sampler: str = "Euler"

    def payload(self, task_id: str | None = None) -> dict:
        return {"prompt": self.prompt, "negative_prompt": "", "seed": self.seed, "steps": self.steps,
                "width": self.size, "height": self.size, "sampler_name": self.sampler, "batch_size": 1,
                "n_iter": 1, "force_task_id": task_id or self.task_id, "send_images": True, "save_images": False}


def prompts() -> list[str]:
    """Every distinct prompt of the vocabulary, the colour and shape varying fastest."""
    return [f"a {c} {s} at {p} on a {b} background"
            for b in BACKGROUNDS for p in POSITIONS for s in SHAPES for c in COLOURS]


def make_requests(n: int, *, steps: int = 12, size: int = 64, seed0: int = SEED0, tag: str | None = None,
                  sampler: str = "Euler") -> list[Spec]:
    """``n`` requests with distinct prompts and seeds; task ids ``load-<tag>-<i>`` (``tag`` random by default,
    so a second run against the same server reuses no id: the server refuses ids of recent jobs)."""
    vocabulary = prompts()
    if not 1 <= n <= len(vocabulary):
        raise ValueError(f"requests: 1..{len(vocabulary)} (distinct prompts), got {n}")
    tag = tag or uuid.uuid4().hex[:8]
    return [Spec(i, f"load-{tag}-{i:04d}", vocabulary[i], seed0 + i, steps, size, sampler) for i in range(n)]


@dataclass
class Outcome:
    """What one request met: every status in order, its latency, the 429s, and the image it got."""

    spec: Spec
    statuses: list[int] = field(default_factory=list)
    status: int | None = None  # the final status (None: no answer)
    latency: float | None = None  # seconds from the first send to the final answer, 429 waits included
    attempt_latency: float | None = None  # seconds of the final attempt alone
    n429: int = 0
    retry_after: list[str | None] = field(default_factory=list)  # the header of each 429 (None: missing)
    n_images: int = 0
    sha256: str | None = None  # of the PNG bytes
    pixel_sha256: str | None = None  # of the decoded RGB pixels
    pixels: np.ndarray | None = None
    seed_seen: int | None = None  # the infotext's Seed
    all_seeds: list | None = None
    prompt_seen: str | None = None  # the infotext's first line
    batched_with: int | None = None  # info.diffspeed.batched_with: other requests in the same pipeline call
    error: str | None = None

    def record(self) -> dict:
        d = {k: getattr(self, k) for k in ("status", "statuses", "latency", "attempt_latency", "n429",
                                           "retry_after", "n_images", "sha256", "pixel_sha256", "seed_seen",
                                           "batched_with", "error")}
        return {"index": self.spec.index, "task_id": self.spec.task_id, "prompt": self.spec.prompt,
                "seed": self.spec.seed, **d}


# ------------------------------------------------------------------------------------------------ HTTP
def _httpx():
    for name in ("httpx", "httpx2"):
        with contextlib.suppress(ImportError):
            return __import__(name)
    return None


class Http:
    """An async JSON client: httpx's AsyncClient when installed, else urllib in a pool of ``clients`` threads.
    ``post``/``get`` return (status, lower-cased headers, body bytes) for every status; transport errors raise."""

    def __init__(self, clients: int, timeout: float, *, force_urllib: bool = False):
        self.timeout = timeout
        mod = None if force_urllib else _httpx()
        self.kind = "urllib" if mod is None else mod.__name__
        self._client = None
        self._pool = None
        if mod is not None:
            self._client = mod.AsyncClient(timeout=mod.Timeout(timeout), trust_env=False,
                                           limits=mod.Limits(max_connections=clients + 4))
        else:
            self._pool = ThreadPoolExecutor(max_workers=clients + 2, thread_name_prefix="load-test")

    async def request(self, method: str, url: str, body: dict | None = None) -> tuple[int, dict, bytes]:
        if self._client is not None:
            r = await self._client.request(method, url, json=body)
            return r.status_code, {k.lower(): v for k, v in r.headers.items()}, r.content
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, _urllib, method, url, body, self.timeout)

    async def post(self, url: str, body: dict) -> tuple[int, dict, bytes]:
        return await self.request("POST", url, body)

    async def get(self, url: str) -> tuple[int, dict, bytes]:
        return await self.request("GET", url)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
        if self._pool is not None:
            self._pool.shutdown(wait=False)


def _urllib(method: str, url: str, body: dict | None, timeout: float) -> tuple[int, dict, bytes]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"} if data is not None else {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=timeout) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as err:
        return err.code, {k.lower(): v for k, v in err.headers.items()}, err.read()


# ------------------------------------------------------------------------------------------------ load
async def _send(http: Http, url: str, spec: Spec, task_id: str, *, retry_cap: float, max_attempts: int) -> Outcome:
    """One request until it gets an answer other than 429 (waiting min(Retry-After, retry_cap) after each)."""
    out = Outcome(spec)
    start = time.perf_counter()
    for _ in range(max_attempts):
        sent = time.perf_counter()
        try:
            status, headers, body = await http.post(f"{url}{API}/txt2img", spec.payload(task_id))
        except Exception as err:  # noqa: BLE001 -- a dropped connection or a timeout is a result to report
            out.error = f"{type(err).__name__}: {err}"
            break
        out.statuses.append(status)
        if status == 429:
            out.n429 += 1
            header = headers.get("retry-after")
            out.retry_after.append(header)
            await asyncio.sleep(min(_retry_seconds(header, retry_cap), retry_cap))
            continue
        out.status, out.attempt_latency = status, time.perf_counter() - sent
        if status == 200:
            _read_answer(out, body)
        else:
            out.error = body[:300].decode("utf-8", "replace")
        break
    else:
        out.error = f"still 429 after {max_attempts} attempts"
    out.latency = time.perf_counter() - start
    return out


def _retry_seconds(header: str | None, default: float) -> float:
    try:
        return max(0.0, float(header)) if header is not None else default
    except ValueError:
        return default


def _read_answer(out: Outcome, body: bytes) -> None:
    try:
        data = json.loads(body)
        images = data.get("images") or []
        out.n_images = len(images)
        info = json.loads(data["info"])
        out.all_seeds = info.get("all_seeds")
        text = (info.get("infotexts") or [""])[0]
        out.prompt_seen = text.split("\n", 1)[0]
        seed = re.search(r"(?:^|[\s,])Seed: (-?\d+)", text)
        out.seed_seen = int(seed.group(1)) if seed else None
        out.batched_with = (info.get("diffspeed") or {}).get("batched_with")
        if images:
            png = base64.b64decode(images[0])
            out.sha256 = hashlib.sha256(png).hexdigest()
            out.pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
            out.pixel_sha256 = hashlib.sha256(out.pixels.tobytes()).hexdigest()
    except (ValueError, KeyError, TypeError, OSError) as err:
        out.error = f"unreadable answer: {type(err).__name__}: {err}"


async def run_load(url: str, specs: list[Spec], *, clients: int = 16, timeout: float = 600.0,
                   retry_cap: float = 2.0, max_attempts: int = 1000, suffix: str = "",
                   force_urllib: bool = False) -> dict:
    """Send every spec from ``clients`` concurrent clients; returns {"outcomes", "seconds", "client"}.
    ``suffix`` is appended to each task id (the alone re-run uses "-alone")."""
    url = url.rstrip("/")
    todo: asyncio.Queue[Spec] = asyncio.Queue()
    for spec in specs:
        todo.put_nowait(spec)
    outcomes: list[Outcome | None] = [None] * len(specs)
    position = {spec.task_id: i for i, spec in enumerate(specs)}
    http = Http(clients, timeout, force_urllib=force_urllib)

    async def client() -> None:
        while not todo.empty():
            spec = todo.get_nowait()
            outcomes[position[spec.task_id]] = await _send(http, url, spec, spec.task_id + suffix,
                                                      retry_cap=retry_cap, max_attempts=max_attempts)

    start = time.perf_counter()
    try:
        await asyncio.gather(*(client() for _ in range(max(1, min(clients, len(specs))))))
    finally:
        await http.aclose()
    return {"outcomes": outcomes, "seconds": time.perf_counter() - start, "client": http.kind}


def warm_up(url: str, n: int, *, steps: int, size: int, timeout: float) -> None:
    """``n`` requests one at a time before measuring (first-call costs), with task ids of their own."""
    if n > 0:
        specs = make_requests(n, steps=steps, size=size, seed0=1, tag="warmup-" + uuid.uuid4().hex[:8])
        asyncio.run(run_load(url, specs, clients=1, timeout=timeout))


# ------------------------------------------------------------------------------------------------ metrics
_SAMPLE = re.compile(r"^([A-Za-z_:][\w:]*)(\{[^}]*\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> dict[tuple, float]:
    """Prometheus text -> {(name, ((label, value), ...)): value}."""
    samples = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m is None or line.startswith("#"):
            continue
        labels = tuple(sorted(_LABEL.findall(m.group(2) or "")))
        with contextlib.suppress(ValueError):
            samples[(m.group(1), labels)] = float(m.group(3))
    return samples


def fetch_metrics(url: str, timeout: float = 30.0) -> dict[tuple, float] | None:
    """The server's /metrics, parsed; None when it has none."""
    try:
        status, _, body = _urllib("GET", url.rstrip("/") + "/metrics", None, timeout)
    except OSError:
        return None
    return parse_metrics(body.decode("utf-8", "replace")) if status == 200 else None


def _value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def metrics_delta(before: dict | None, after: dict | None) -> dict | None:
    """What the load phase added: batches (count, mean size, how many of each size range), jobs by outcome,
    images, 429s."""
    if before is None or after is None:
        return None

    def d(name, **labels):
        return _value(after, name, **labels) - _value(before, name, **labels)

    edges = sorted(float(dict(lab)["le"]) for (name, lab) in after
                   if name == "diffspeed_batch_size_bucket" and dict(lab)["le"] != "+Inf")
    sizes, low, below = {}, 1, 0.0
    for le in edges:
        cum = d("diffspeed_batch_size_bucket", le=_le(le))
        if cum - below:
            sizes[str(int(le)) if low == int(le) else f"{low}-{int(le)}"] = int(cum - below)
        below, low = cum, int(le) + 1
    count, total = d("diffspeed_batch_size_count"), d("diffspeed_batch_size_sum")
    outcomes = {dict(lab)["outcome"]: d(name, **dict(lab)) for (name, lab) in after if name == "diffspeed_jobs_total"}
    return {"batches": int(count), "mean_batch": total / count if count else None,
            "max_batch_seen": max((int(k.split("-")[-1]) for k in sizes), default=None), "batch_sizes": sizes,
            "jobs": {k: int(v) for k, v in outcomes.items() if v}, "images": int(d("diffspeed_images_total")),
            "rejected": int(d("diffspeed_rejected_total"))}


def _le(x: float) -> str:
    return repr(float(x))  # prometheus_client writes le="1.0"


# ------------------------------------------------------------------------------------------------ checks
def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100), interpolated linearly between ranks (numpy's default)."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def compare_pixels(a: list[Outcome], b: list[Outcome]) -> dict:
    """Request by request: how many images are equal, within one level, further apart; the largest difference."""
    diffs = []
    for x, y in zip(a, b):
        if x is None or y is None or x.pixels is None or y.pixels is None or x.pixels.shape != y.pixels.shape:
            diffs.append(None)
        else:
            diffs.append(int(np.abs(x.pixels.astype(np.int16) - y.pixels.astype(np.int16)).max()))
    known = [x for x in diffs if x is not None]
    return {"compared": len(known), "missing": len(diffs) - len(known), "exact": sum(x == 0 for x in known),
            "within_1": sum(0 < x <= LEVEL_TOLERANCE for x in known),
            "over_1": sum(x > LEVEL_TOLERANCE for x in known), "max_abs_diff": max(known, default=None),
            "per_request": diffs}


def check(name: str, ok: bool, detail: str) -> dict:
    return {"name": name, "ok": bool(ok), "detail": detail}


def verify(outcomes: list[Outcome], delta: dict | None = None, alone: dict | None = None) -> list[dict]:
    """The run's checks (see the module docstring); ``alone`` is compare_pixels(load, alone run)."""
    n = len(outcomes)
    missing = [i for i, o in enumerate(outcomes) if o is None]
    got = [o for o in outcomes if o is not None]
    five = [(o.spec.task_id, s) for o in got for s in o.statuses if s >= 500]
    bad = [(o.spec.task_id, o.status, o.error) for o in got if o.status != 200 or o.error or o.n_images != 1]
    n429 = sum(o.n429 for o in got)
    no_header = [(o.spec.task_id, h) for o in got for h in o.retry_after if not _valid_retry_after(h)]
    hashes = [o.pixel_sha256 for o in got if o.pixel_sha256 is not None]
    wrong_seed = [(o.spec.task_id, o.spec.seed, o.seed_seen, o.all_seeds) for o in got if o.status == 200
                  and (o.seed_seen != o.spec.seed or o.all_seeds != [o.spec.seed])]
    wrong_prompt = [(o.spec.task_id, o.prompt_seen) for o in got if o.status == 200 and o.prompt_seen != o.spec.prompt]
    checks = [
        check("no_5xx", not five, f"{len(five)} responses >= 500" + (f", e.g. {five[:3]}" if five else "")),
        check("all_200", not missing and not bad, f"{n - len(missing) - len(bad)}/{n} requests ended in one 200 "
              f"with one image" + (f"; failed: {bad[:3]}" if bad else "") + (f"; unsent: {missing[:5]}" if missing
                                                                              else "")),
        check("retry_after", not no_header, f"{n429} 429s, {len(no_header)} without a valid Retry-After"
              + (f": {no_header[:3]}" if no_header else "")),
        check("distinct_images", len(set(hashes)) == n == len(hashes),
              f"{len(set(hashes))} distinct images for {n} requests ({len(hashes)} images)"),
        check("seed_and_prompt", not wrong_seed and not wrong_prompt,
              f"{len(wrong_seed)} wrong seeds, {len(wrong_prompt)} wrong prompts in the infotexts"
              + (f": {(wrong_seed + wrong_prompt)[:3]}" if wrong_seed or wrong_prompt else "")),
    ]
    if delta is not None:
        jobs = delta["jobs"]
        others = {k: v for k, v in jobs.items() if k != "done"}
        ok = jobs.get("done", 0) == n and not others and delta["images"] == n and delta["rejected"] == n429
        checks.append(check("server_counts", ok, f"server: {jobs.get('done', 0)} jobs done (want {n}), other "
                            f"outcomes {others or 'none'}, {delta['images']} images, {delta['rejected']} rejected "
                            f"(clients saw {n429} 429s)"))
    if alone is not None:
        checks.append(check("equal_to_alone", alone["over_1"] == 0 and alone["missing"] == 0,
                            f"{alone['exact']}/{alone['compared']} exactly equal to the request run alone, "
                            f"{alone['within_1']} within 1 level, {alone['over_1']} further apart, max diff "
                            f"{alone['max_abs_diff']}, {alone['missing']} not compared"))
    return checks


def _valid_retry_after(header: str | None) -> bool:
    return header is not None and header.strip().isdigit()  # delay-seconds (RFC 9110); diffspeed never sends dates


# ------------------------------------------------------------------------------------------------ one run
def measure(url: str, specs: list[Spec], *, clients: int = 16, timeout: float = 600.0, retry_cap: float = 2.0,
            verify_alone: bool = True, warmup: int = 2, force_urllib: bool = False) -> dict:
    """Warm up, run the load, snapshot the metrics around it, re-run each request alone, verify.

    Returns a dict with ``summary`` (plain JSON), ``checks``, ``requests`` (per-request records) and
    ``outcomes`` / ``alone_outcomes`` (Outcome objects, pixels included; not JSON)."""
    steps, size = specs[0].steps, specs[0].size
    warm_up(url, warmup, steps=steps, size=size, timeout=timeout)
    before = fetch_metrics(url, timeout)
    load = asyncio.run(run_load(url, specs, clients=clients, timeout=timeout, retry_cap=retry_cap,
                                force_urllib=force_urllib))
    delta = metrics_delta(before, fetch_metrics(url, timeout))
    outcomes: list[Outcome] = load["outcomes"]
    alone_outcomes = None
    alone = None
    if verify_alone:
        alone_outcomes = asyncio.run(run_load(url, specs, clients=1, timeout=timeout, retry_cap=retry_cap,
                                              suffix="-alone", force_urllib=force_urllib))["outcomes"]
        alone = compare_pixels(outcomes, alone_outcomes)
    checks = verify(outcomes, delta, alone)
    latencies = [o.latency for o in outcomes if o is not None and o.status == 200]
    ok_images = sum(o is not None and o.status == 200 and o.n_images == 1 for o in outcomes)
    alone_lat = [o.latency for o in alone_outcomes or [] if o is not None and o.status == 200]
    summary = {
        "url": url, "client": load["client"], "requests": len(specs), "clients": clients, "steps": steps,
        "size": size, "sampler": specs[0].sampler, "retry_cap_s": retry_cap, "warmup": warmup,
        "load_seconds": load["seconds"], "images": ok_images, "images_per_s": ok_images / load["seconds"],
        "latency_s": {f"p{q}": percentile(latencies, q) for q in (50, 90, 99)} | {"max": max(latencies, default=None)},
        "attempt_latency_s": {f"p{q}": percentile([o.attempt_latency for o in outcomes if o is not None
                                                   and o.attempt_latency is not None], q) for q in (50, 90, 99)},
        "n429": sum(o.n429 for o in outcomes if o is not None),
        "requests_with_429": sum(bool(o.n429) for o in outcomes if o is not None),
        "statuses": _status_counts(outcomes),
        "server_metrics": delta,
        "batched_with_seen": _counts(o.batched_with for o in outcomes if o is not None and o.batched_with is not None),
        "alone": None if alone is None else {k: v for k, v in alone.items() if k != "per_request"}
        | {"latency_p50_s": percentile(alone_lat, 50)},
        "ok": all(c["ok"] for c in checks),
    }
    records = [o.record() for o in outcomes if o is not None]
    if alone is not None:
        for rec, diff in zip(records, alone["per_request"]):
            rec["alone_max_abs_diff"] = diff
    return {"summary": summary, "checks": checks, "requests": records, "outcomes": outcomes,
            "alone_outcomes": alone_outcomes}


def _status_counts(outcomes) -> dict:
    return _counts(s for o in outcomes if o is not None for s in o.statuses)


def _counts(values) -> dict:
    out: dict[str, int] = {}
    for v in values:
        out[str(v)] = out.get(str(v), 0) + 1
    return dict(sorted(out.items()))


# ------------------------------------------------------------------------------------------------ spawning
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def spawned(*, model: str = "tiny-sd", max_batch: int = 8, max_queue: int = 32, device: str | None = None,
            dtype: str | None = None, request_timeout: float = 600.0, start_timeout: float = 600.0,
            stop_timeout: float = 90.0):
    """``diffspeed serve`` in a subprocess on a free port; yields a dict (``url``, ``command``; after the block
    ``exit_code``, ``log_tail``). Leaving the block sends SIGTERM and waits for the exit."""
    folder = Path(tempfile.mkdtemp(prefix="diffspeed-load-"))
    port = free_port()
    cmd = [sys.executable, "-m", "diffspeed", "serve", "--model", model, "--port", str(port),
           "--max-batch", str(max_batch), "--max-queue", str(max_queue), "--outputs-dir", str(folder / "outputs"),
           "--timeout", str(request_timeout)]
    cmd += ["--device", device] if device else []
    cmd += ["--dtype", dtype] if dtype else []
    info: dict[str, Any] = {"url": f"http://127.0.0.1:{port}", "command": shlex.join(cmd), "log": str(folder)}
    log_path = folder / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_ready(info["url"], proc, start_timeout, log_path)
            yield info
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                info["exit_code"] = proc.wait(stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                info["exit_code"] = f"killed: still running {stop_timeout:g} s after SIGTERM ({proc.wait()})"
            info["log_tail"] = _tail(log_path)
            if info["exit_code"] == 0:  # keep the log of a server that failed to stop, only
                shutil.rmtree(folder, ignore_errors=True)
                info["log"] = None


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"diffspeed serve exited with {proc.returncode} before it was ready:\n"
                               f"{_tail(log_path)}")
        with contextlib.suppress(OSError):
            if _urllib("GET", f"{url}{API}/options", None, 5.0)[0] == 200:
                return
        time.sleep(0.25)
    raise RuntimeError(f"diffspeed serve did not answer {API}/options within {timeout:g} s:\n{_tail(log_path)}")


def _tail(path: Path, n: int = 20) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    return ""


# ------------------------------------------------------------------------------------------------ machine
def machine() -> dict:
    """This machine (the client's; the server's too when spawned): CPU, cores, torch, diffspeed's profile."""
    from importlib import metadata

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        names = re.findall(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = names[0].strip() if names else cpu
    out: dict[str, Any] = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
                           "platform": platform.platform(), "env": {k: os.environ.get(k) for k in ENV_KEYS}}
    for name in ("torch", "diffusers", "diffspeed"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    try:
        from diffspeed.hardware import detect

        out["hardware"] = detect("cpu").to_dict()
    except Exception as err:  # noqa: BLE001 -- a record, never a reason to fail the run
        out["hardware"] = f"unavailable: {type(err).__name__}: {err}"
    return out


# ------------------------------------------------------------------------------------------------ reporting
def markdown(runs: list[dict]) -> str:
    head = ("| run | max_batch | requests | clients | steps | size | images/s | p50 s | p90 s | p99 s | 429s | "
            "batches | mean batch | alone exact | alone max diff | ok |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for run in runs:
        s, m = run["summary"], run["summary"]["server_metrics"] or {}
        a = s["alone"] or {}
        lat = s["latency_s"]
        lines.append(f"| {run['label']} | {run.get('max_batch', '?')} | {s['requests']} | {s['clients']} | "
                     f"{s['steps']} | {s['size']} | {s['images_per_s']:.2f} | {_f(lat['p50'])} | {_f(lat['p90'])} | "
                     f"{_f(lat['p99'])} | {s['n429']} | {m.get('batches', '?')} | {_f(m.get('mean_batch'), 2)} | "
                     f"{a.get('exact', '-')}/{a.get('compared', '-')} | {a.get('max_abs_diff', '-')} | "
                     f"{'yes' if run['ok'] else 'NO'} |")
    for run in runs:
        for c in run["checks"]:
            if not c["ok"]:
                lines.append(f"\n- FAILED {run['label']}: {c['name']}: {c['detail']}")
    return "\n".join(lines)


def _f(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


# ------------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Exit status: 0 every check "
                                "passed, 1 a check failed, 2 the run could not be made.")
    p.add_argument("--url", default="http://127.0.0.1:7860", help="a running server (ignored with --spawn)")
    p.add_argument("--requests", type=int, default=200, help="requests in the load (default 200, at most 648)")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    p.add_argument("--steps", type=int, default=12, help="sampling steps per request (default 12)")
    p.add_argument("--size", type=int, default=64, help="width = height in pixels (default 64)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one HTTP request may take (default 600)")
    p.add_argument("--retry-cap", type=float, default=2.0, help="most seconds a client waits after a 429, whatever "
                   "Retry-After says (default 2)")
    p.add_argument("--warmup", type=int, default=2, help="requests sent one at a time before measuring (default 2)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--no-verify-alone", action="store_true", help="skip re-running each request alone")
    p.add_argument("--urllib", action="store_true", help="use urllib in threads even when httpx is installed")
    s = p.add_argument_group("spawning a server")
    s.add_argument("--spawn", action="store_true", help="start `diffspeed serve` on a free port, SIGTERM it after "
                   "and check it exits 0")
    s.add_argument("--compare-batching", action="store_true", help="spawn twice, --max-batch B then 1, same "
                   "requests; print the images/s ratio")
    s.add_argument("--model", default="tiny-sd", help="the spawned server's --model (default tiny-sd)")
    s.add_argument("--max-batch", type=int, default=8, help="the spawned server's --max-batch (default 8)")
    s.add_argument("--max-queue", type=int, default=32, help="the spawned server's --max-queue (default 32)")
    s.add_argument("--device", default=None, help="the spawned server's --device")
    s.add_argument("--dtype", default=None, help="the spawned server's --dtype")
    return p


def _run_spawned(args, specs: list[Spec], label: str, max_batch: int, verify_alone: bool) -> dict:
    with spawned(model=args.model, max_batch=max_batch, max_queue=args.max_queue, device=args.device,
                 dtype=args.dtype, request_timeout=args.timeout) as server:
        run = _measure(args, server["url"], specs, verify_alone)
    code = server["exit_code"]
    run["checks"].append(check("server_exit_0", code == 0, f"diffspeed serve exited with {code} after SIGTERM"
                               + ("" if code == 0 else f"; log tail:\n{server['log_tail']}")))
    run.update(label=label, max_batch=max_batch, max_queue=args.max_queue, server=server,
               ok=all(c["ok"] for c in run["checks"]))
    run["summary"]["ok"] = run["ok"]
    return run


def _measure(args, url: str, specs: list[Spec], verify_alone: bool) -> dict:
    return measure(url, specs, clients=args.clients, timeout=args.timeout, retry_cap=args.retry_cap,
                   verify_alone=verify_alone, warmup=args.warmup, force_urllib=args.urllib)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        specs = make_requests(args.requests, steps=args.steps, size=args.size)
        if args.clients < 1 or args.retry_cap < 0 or args.timeout <= 0:
            raise ValueError("clients must be >= 1, retry-cap >= 0, timeout > 0")
        if args.compare_batching:
            runs = [_run_spawned(args, specs, "batched", args.max_batch, not args.no_verify_alone),
                    _run_spawned(args, specs, "unbatched", 1, False)]
        elif args.spawn:
            runs = [_run_spawned(args, specs, "spawned", args.max_batch, not args.no_verify_alone)]
        else:
            run = _measure(args, args.url, specs, not args.no_verify_alone)
            run.update(label="url", ok=all(c["ok"] for c in run["checks"]))
            runs = [run]
    except (ValueError, RuntimeError, OSError) as err:
        print(f"load_test: {err}", file=sys.stderr)
        return 2
    result: dict[str, Any] = {"command": shlex.join([sys.executable, *sys.argv] if argv is None
                                                    else [sys.executable, sys.argv[0], *argv]),
                              "cwd": os.getcwd(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                              "machine": machine(), "settings": {k: v for k, v in vars(args).items()}}
    if args.compare_batching:
        cross = compare_pixels(runs[0]["outcomes"], runs[1]["outcomes"])
        ok = cross["over_1"] == 0 and cross["missing"] == 0
        runs[1]["checks"].append(check("equal_to_batched", ok, f"{cross['exact']}/{cross['compared']} images equal "
                                       f"to the batched server's, max diff {cross['max_abs_diff']}"))
        runs[1]["ok"] = runs[1]["summary"]["ok"] = runs[1]["ok"] and ok
        ratio = runs[0]["summary"]["images_per_s"] / runs[1]["summary"]["images_per_s"]
        result["batching_speedup"] = ratio
    result["runs"] = [{k: v for k, v in r.items() if k not in ("outcomes", "alone_outcomes")} for r in runs]
    result["ok"] = all(r["ok"] for r in runs)
    print(markdown(runs))
    if args.compare_batching:
        print(f"\nbatching on (--max-batch {args.max_batch}) / off (--max-batch 1): "
              f"{result['batching_speedup']:.2f}x images/s")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1, default=str))
        print(f"\nresults: {args.out}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
