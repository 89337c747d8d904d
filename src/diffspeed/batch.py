"""Bulk generation: a file of requests -> numbered PNGs and ``results.jsonl``, in-process or on Ray Data.

``run_batch`` reads every request first (JSONL, CSV or TXT; all problems at once, with line numbers), gives
each request without a seed one from ``seed`` and its position, and groups consecutive compatible requests
(:meth:`GenerateRequest.batch_key`) into chunks of at most ``batch_size`` images. The chunks depend only on the
file and ``batch_size``, never on what is already done or on who runs them, and each runs as one
:func:`~diffspeed.generate.generate_batch` call, so every pixel is the same with or without Ray and for any
number of workers -- on CPU, for the same torch thread count per worker (``threads``), which also blocks the
matrix products. A batched request differs from its run alone, and a 1-thread run from a 2-thread one, by at
most one 8-bit level in some pixels.

Outputs are named by position (``00012-<seed>.png``; ``00012-<seed>-<k>.png`` for a request of several images),
written atomically by whoever runs the chunk, with the web UI's parameters chunk. A rerun skips a request
whose files exist *and* are complete -- the PNG decodes, its parameters parse and name the request's prompt,
negative prompt and seed -- and reruns the chunk of any other (writing only what is missing), so a killed run
loses at most the chunks in flight. The driver appends one ``results.jsonl`` line per finished request and
rewrites the file at the start and the end of a run so that it holds exactly one line per complete request.

With ``ray=True``: ``ray.data.from_items(chunks)`` -> ``map_batches(_RayChunks, concurrency=workers,
batch_size=1)``: an actor pool, one model per actor (loaded and accelerated once in ``__init__``), each actor
writing its own PNGs; the driver streams the result rows in with ``iter_rows``. Without Ray the same
:class:`ChunkRunner` runs the chunks in this process; more than one worker needs Ray (refused otherwise).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

from diffspeed._io import write_beside, write_text_beside
from diffspeed.errors import DiffspeedError, DiffspeedRuntimeError
from diffspeed.request import MAX_SEED, GenerateRequest, RequestError, is_inline_image

FORMATS = (".jsonl", ".csv", ".txt")
IMAGE_FIELDS = ("init_image", "mask_image", "control_image")
RESULTS = "results.jsonl"
MAX_PROBLEMS_SHOWN = 20  # a file with thousands of bad lines still gives a readable error; .problems has all


class PromptsError(DiffspeedError):
    """Every problem of a prompts file at once: ``problems`` lists ``(line, message)``."""

    def __init__(self, source: str, problems: list[tuple[int, str]]):
        self.problems = problems
        shown = "; ".join(f"line {n}: {m}" if n else m for n, m in problems[:MAX_PROBLEMS_SHOWN])
        more = f"; and {len(problems) - MAX_PROBLEMS_SHOWN} more" if len(problems) > MAX_PROBLEMS_SHOWN else ""
        count = f"{len(problems)} problems: " if len(problems) > 1 else ""
        super().__init__(f"prompts: {source}: {count}{shown}{more}", field="prompts")


@dataclass(frozen=True)
class Item:
    """One request of a batch, at position ``index``; its seed is fixed (never -1)."""

    index: int
    request: GenerateRequest
    id: str | None = None
    line: int = 0

    @property
    def seeds(self) -> list[int]:
        return [(self.request.seed + k) % (MAX_SEED + 1) for k in range(self.request.batch_size)]

    @property
    def files(self) -> list[str]:
        """The output names, fixed by position and seed so that a rerun knows them."""
        if self.request.batch_size == 1:
            return [f"{self.index:05d}-{self.request.seed}.png"]
        return [f"{self.index:05d}-{self.request.seed}-{k}.png" for k in range(self.request.batch_size)]

    def to_wire(self, write: bool = True) -> dict:
        return {"index": self.index, "id": self.id, "request": self.request.model_dump(exclude_unset=True),
                "files": self.files, "write": write}


# ------------------------------------------------------------------------------------------------ reading
def read_prompts(path: str | Path, *, seed: int = 0, check_files: bool = True) -> list[Item]:
    """The requests of a ``.jsonl``, ``.csv`` or ``.txt`` file, validated, seeds filled in (see
    :func:`assign_seeds`); every problem is reported at once with its line (:class:`PromptsError`). Image paths
    are relative to the file's folder. ``check_files``: also check that image files and ControlNet/refiner
    folders exist (the resolver's check), before any model loads."""
    path = Path(path).expanduser()
    if path.suffix.lower() not in FORMATS:
        raise DiffspeedError(f"prompts: {path} must be a {', '.join(FORMATS)} file", field="prompts")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise DiffspeedError(f"prompts: cannot read {path}: {getattr(err, 'strerror', None) or err}",
                             field="prompts") from err
    reader = {".jsonl": _jsonl_rows, ".csv": _csv_rows, ".txt": _txt_rows}[path.suffix.lower()]
    problems: list[tuple[int, str]] = []
    rows = [(line, data) for line, data in reader(text, problems)]
    return _validate(rows, problems, str(path), path.parent, seed, check_files)


def items_from(requests, *, seed: int = 0, base: str | Path = ".", check_files: bool = True) -> list[Item]:
    """Items from a list of :class:`GenerateRequest`, dicts (request fields, optional ``id``) or prompts."""
    rows = []
    for n, r in enumerate(requests, 1):
        if isinstance(r, GenerateRequest):
            r = r.model_dump(exclude_unset=True)
        rows.append((n, {"prompt": r} if isinstance(r, str) else r))
    return _validate(rows, [], "requests", Path(base), seed, check_files, unit="request")


def _jsonl_rows(text: str, problems: list):
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except ValueError as err:
            problems.append((n, f"not a JSON object ({err})"))


def _txt_rows(text: str, problems: list):
    for n, line in enumerate(text.splitlines(), 1):
        prompt = line.strip()
        if prompt and not prompt.startswith("#"):
            yield n, {"prompt": prompt}


def _field_kinds() -> dict[str, type]:
    """Each request field's plain type (bool, int, float or str), which a CSV cell is converted to."""
    kinds = {}
    for name, info in GenerateRequest.model_fields.items():
        options = [t for t in typing.get_args(info.annotation) or (info.annotation,) if t is not type(None)]
        kinds[name] = next((t for t in options if t in (bool, int, float)), str)
    return kinds


def _csv_rows(text: str, problems: list):
    kinds = {**_field_kinds(), "id": str}
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        return
    except csv.Error as err:
        problems.append((1, f"cannot read the header row ({err})"))
        return
    for h in header:
        if h not in kinds:
            problems.append((1, f"column {h!r} is not a request field (see GenerateRequest's fields) or id"))
    if "prompt" not in header:
        problems.append((1, "no 'prompt' column"))
    start = reader.line_num + 1
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            problems.append((start, f"cannot read the row ({err})"))
            return
        line, start = start, reader.line_num + 1
        if not any(c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            problems.append((line, f"{len(cells)} cells, the header has {len(header)}"))
            continue
        data, bad = {}, False
        for name, cell in zip(header, cells):
            if name not in kinds or (cell == "" and name not in ("prompt", "negative_prompt")):
                continue  # an empty cell is the field's default
            try:
                data[name] = _convert(cell, kinds[name])
            except ValueError:
                problems.append((line, f"{name}: {cell!r} is not {'a' if kinds[name] is not int else 'an'} "
                                       f"{kinds[name].__name__}"))
                bad = True
        if not bad:
            yield line, data


def _convert(cell: str, kind: type):
    if kind is bool:
        low = cell.strip().lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ValueError(cell)
    return kind(cell.strip()) if kind is not str else cell


def _validate(rows: list, problems: list, source: str, base: Path, seed: int, check_files: bool,
              unit: str = "line") -> list[Item]:
    """Validate every row (``(line, data)``), collecting all problems; then fill in the seeds."""
    resolver = None
    if check_files:
        from diffspeed.resolve import Resolver

        resolver = Resolver()
    items = []
    for line, data in rows:
        if not isinstance(data, dict):
            problems.append((line, f"must be an object of request fields, got {type(data).__name__}"))
            continue
        data = dict(data)
        ident = data.pop("id", None)
        if ident is not None and not isinstance(ident, (str, int)):
            problems.append((line, f"id: must be text or an integer, got {type(ident).__name__}"))
            continue
        for name in IMAGE_FIELDS:
            ref = data.get(name)
            if isinstance(ref, str) and ref and not is_inline_image(ref):
                data[name] = str(base / Path(ref).expanduser())  # an absolute path stays as it is
        try:
            request = GenerateRequest.from_data(data)
            if resolver is not None:
                resolver.check(request)
        except RequestError as err:
            problems += [(line, m) for _, m in err.problems]
            continue
        except DiffspeedError as err:
            problems.append((line, str(err)))
            continue
        items.append(Item(len(items), request, None if ident is None else str(ident), line))
    if problems:
        problems.sort(key=lambda p: p[0])
        if unit != "line":
            problems = [(0, f"{unit} {n}: {m}") for n, m in problems]
        raise PromptsError(source, problems)
    if not items:
        raise DiffspeedError(f"prompts: {source} holds no requests", field="prompts")
    return assign_seeds(items, seed)


def assign_seeds(items: list[Item], seed: int = 0) -> list[Item]:
    """A request without a seed (-1) gets ``seed`` plus the number of images before it (its index when every
    request makes one image), so a rerun draws the same images and requests never share seeds."""
    out, offset = [], 0
    for item in items:
        r = item.request
        if r.seed < 0:
            r = r.replace(seed=(seed + offset) % (MAX_SEED + 1))
        out.append(Item(item.index, r, item.id, item.line))
        offset += r.batch_size
    return out


def make_chunks(items: list[Item], batch_size: int) -> list[list[Item]]:
    """Consecutive requests with equal batch keys, up to ``batch_size`` images a chunk (a larger request is a
    chunk of its own). Depends only on the items, so every run, worker and rerun makes the same chunks."""
    chunks: list[list[Item]] = []
    key, images = None, 0
    for item in items:
        k, n = item.request.batch_key(), item.request.batch_size
        if chunks and k == key and images + n <= batch_size:
            chunks[-1].append(item)
            images += n
        else:
            chunks.append([item])
            key, images = k, n
    return chunks


# ------------------------------------------------------------------------------------------------ checking
def is_complete(item: Item, out: str | Path) -> bool:
    """Whether every output of ``item`` is there and whole: the PNG's checksums hold, its pixels decode, and its
    parameters chunk parses and names the request's prompt, negative prompt and seed."""
    return all(_image_ok(Path(out) / name, item.request, s) for name, s in zip(item.files, item.seeds))


def _image_ok(path: Path, request: GenerateRequest, seed: int) -> bool:
    from PIL import Image

    from diffspeed.pngmeta import KEY, parse_parameters

    try:
        with Image.open(path) as im:
            im.verify()  # chunk checksums and structure
        with Image.open(path) as im:
            im.load()  # every pixel decodes (a truncated file raises)
            text = im.info.get(KEY)
        params = parse_parameters(text) if isinstance(text, str) else None
    except Exception:  # noqa: BLE001 -- whatever a broken file raises, it is not complete
        return False
    return (params is not None and params["prompt"] == request.prompt
            and params["negative_prompt"] == request.negative_prompt and params.get("Seed") == str(seed))


def _remove_partials(out: Path) -> None:
    """Temporary files of writes that a killed run left behind (``write_beside``'s ``.NAME.PID.partial.png``)."""
    for path in out.glob(".[0-9][0-9][0-9][0-9][0-9]-*.partial.png"):
        with contextlib.suppress(OSError):
            path.unlink()


# ------------------------------------------------------------------------------------------------ running a chunk
class ChunkRunner:
    """Runs chunks on one model: loaded, and the recipe applied, once; writes each chunk's PNGs itself.

    ``recipe``: a recipe dict (``Recipe.to_dict()``) or None; ``out``: the output folder; ``threads``: torch's
    CPU threads (None: leave as is)."""

    def __init__(self, model: str, recipe: dict | None, out: str, *, preset: str | None = None,
                 device: str | None = None, dtype: str | None = None, threads: int | None = None):
        import torch

        import diffspeed
        from diffspeed.core import Recipe
        from diffspeed.pipelines.load import quiet_loading
        from diffspeed.resolve import Resolver

        if threads:
            torch.set_num_threads(threads)
        self.threads = torch.get_num_threads()  # on CPU, part of what fixes the pixels (see run_batch)
        self.out, self.preset = Path(out), preset
        self.resolver = Resolver()
        recipe = Recipe.from_dict(recipe or {"optimization": []})
        with quiet_loading():
            self.pipe = diffspeed.load(model, dtype=dtype, device=device)
        self.pipe.set_progress_bar_config(disable=True)
        self.fast = diffspeed.accelerate(self.pipe, recipe, strict=False) if recipe.optimizations else None

    def run(self, chunk: dict) -> list[dict]:
        """One chunk (``{"chunk": n, "items": [Item.to_wire(), ...]}``) as one ``generate_batch`` call; writes
        the images of the items marked ``write`` and returns their result rows."""
        from diffspeed.generate import generate_batch
        from diffspeed.pngmeta import save_png

        wires = chunk["items"]
        requests = [GenerateRequest.from_data(w["request"]) for w in wires]
        results = generate_batch(self.pipe, requests, progress=False, runner=self.fast, preset=self.preset,
                                 resolver=self.resolver)
        rows = []
        for wire, result in zip(wires, results):
            if not wire["write"]:
                continue
            for name, image, params in zip(wire["files"], result.images, result.parameters, strict=True):
                write_beside(self.out / name, lambda p, im=image, t=params: save_png(im, p, t), field="out")
            rows.append({"index": wire["index"], "id": wire["id"], "request": result.request.model_dump(),
                         "seeds": result.seeds, "files": wire["files"], "seconds": round(result.seconds, 4),
                         "chunk": chunk["chunk"], "chunk_requests": len(wires), "threads": self.threads,
                         "device": str(self.pipe._execution_device), "stats": result.stats,
                         "events": result.events})
        return rows

    def close(self) -> None:
        if self.fast is not None:
            self.fast.remove()
            self.fast = None


class _RayChunks:
    """The Ray Data callable class: one :class:`ChunkRunner` (one model) per actor."""

    def __init__(self, spec: str):
        self.runner = ChunkRunner(**json.loads(spec))

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        rows = [json.dumps(row) for text in batch["chunk"] for row in self.runner.run(json.loads(text))]
        return {"row": np.array(rows, dtype=object)}


# ------------------------------------------------------------------------------------------------ the driver
@dataclass
class Summary:
    images: int  # written by this run
    skipped: int  # complete before this run
    requests: int
    seconds: float  # the whole run: validation, model or cluster start, generation
    first_result_s: float | None  # seconds to the first result (model load, cluster start, a first chunk)
    out: Path
    results: Path
    steady_images: int = 0  # images of the chunks after the first one to finish
    rows: list = field(default_factory=list, repr=False)

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0

    @property
    def steady_images_per_second(self) -> float | None:
        """Images/s after the first finished chunk (model load and cluster start left out)."""
        if self.first_result_s is None or not self.steady_images:
            return None
        span = self.seconds - self.first_result_s
        return self.steady_images / span if span > 0 else None

    def line(self) -> str:
        steady = self.steady_images_per_second
        extra = f", {steady:.2f} images/s after the first chunk" if steady else ""
        return (f"{self.images} images, {self.skipped} skipped, {self.images_per_second:.2f} images/s "
                f"({self.seconds:.1f} s{extra})")


def run_batch(prompts, out, *, model: str = "tiny-sd", recipe=None, preset: str | None = None, ray: bool = False,
              ray_address: str | None = None, workers: int = 1, batch_size: int = 1, seed: int = 0,
              device: str | None = None, dtype: str | None = None, threads: int | None = None,
              progress: bool = True) -> Summary:
    """Generate every request of ``prompts`` (a ``.jsonl``/``.csv``/``.txt`` path, or a list of requests, dicts
    or prompts) into ``out``; resumable (see the module docstring). ``recipe``: a
    :class:`~diffspeed.core.Recipe`, a recipe file path, or None. ``threads``: torch CPU threads of each
    worker, and the CPUs each Ray actor reserves (None: a local cluster's CPUs -- this machine's -- shared
    among the workers; on an existing cluster one each; in-process, torch's default).

    Pixels: equal chunks give equal images, bit for bit, in any process, worker or Ray actor -- on CPU given
    the same torch thread count too (matrix products are blocked by it: 1 vs 2 threads differ by at most one
    8-bit level in some pixels). Pass the same ``threads`` to compare runs with different worker counts."""
    t0 = time.perf_counter()
    if workers < 1 or batch_size < 1:
        raise DiffspeedError("workers and batch_size must be at least 1", field="workers" if workers < 1 else
                             "batch_size")
    if workers > 1 and not ray:
        raise DiffspeedError(f"workers: {workers} workers need Ray (--ray); without it the chunks run in this "
                             f"process, one at a time", field="workers")
    if not 0 <= seed <= MAX_SEED:
        raise DiffspeedError(f"seed: must be 0..{MAX_SEED}, got {seed}", field="seed")
    if isinstance(prompts, (str, os.PathLike)):
        items = read_prompts(prompts, seed=seed)
    else:
        items = items_from(prompts, seed=seed)
    recipe_dict = _recipe_dict(recipe)
    out = Path(out).expanduser().resolve()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DiffspeedRuntimeError(f"out: cannot create {out}: {err.strerror or err}", field="out") from err
    _remove_partials(out)
    chunks = make_chunks(items, batch_size)
    done = {item.index for item in items if is_complete(item, out)}
    log = _Results(out / RESULTS, items)
    log.rebuild(done)
    todo = [{"chunk": n, "items": [it.to_wire(it.index not in done) for it in chunk]}
            for n, chunk in enumerate(chunks) if any(it.index not in done for it in chunk)]
    skipped = sum(items[i].request.batch_size for i in done)
    total = sum(it.request.batch_size for it in items) - skipped
    spec = dict(model=model, recipe=recipe_dict, out=str(out), preset=preset, device=device, dtype=dtype,
                threads=threads)
    summary = Summary(0, skipped, len(items), 0.0, None, out, log.path)
    bar, first_chunk = _bar(total, progress), None
    try:
        rows = _ray_rows(todo, spec, workers, ray_address) if ray else _local_rows(todo, spec)
        for row in rows:
            log.append(row)
            n = len(row["files"])
            if summary.first_result_s is None:
                summary.first_result_s, first_chunk = time.perf_counter() - t0, row["chunk"]
            elif row["chunk"] != first_chunk:
                summary.steady_images += n
            summary.images += n
            summary.rows.append(row)
            bar.update(n)
    finally:
        bar.close()
        log.close()
    log.rebuild(done | {row["index"] for row in summary.rows})  # a row comes after its files are in place
    summary.seconds = time.perf_counter() - t0
    return summary


def _recipe_dict(recipe) -> dict | None:
    if recipe is None:
        return None
    from diffspeed.core import Recipe

    if isinstance(recipe, (str, os.PathLike)):
        recipe = Recipe.load(recipe)
    return recipe.to_dict()


def _bar(total: int, progress: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="diffspeed batch", disable=not progress or total == 0,
                file=sys.stderr, dynamic_ncols=True, smoothing=0.1)


def _local_rows(todo: list[dict], spec: dict):
    if not todo:
        return
    runner = ChunkRunner(**spec)
    try:
        for chunk in todo:
            yield from runner.run(chunk)
    finally:
        runner.close()


def _ray_rows(todo: list[dict], spec: dict, workers: int, address: str | None):
    import logging

    if not todo:
        return
    try:
        import ray
    except ImportError as err:
        raise DiffspeedError("--ray needs Ray: pip install 'ray[data]'", field="ray") from err
    import signal
    import threading

    started = not ray.is_initialized()
    main = threading.current_thread() is threading.main_thread()
    own = signal.getsignal(signal.SIGTERM) if main else None
    if started:
        if address:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        else:  # a local cluster, loopback only, with this machine's CPUs (at least one per worker)
            ray.init(address="local", num_cpus=_local_cpus(workers), include_dashboard=False, log_to_driver=False,
                     logging_level=logging.WARNING, _node_ip_address="127.0.0.1")
        if callable(own):  # ray.init replaces SIGTERM's handler (with sys.exit); keep the caller's own
            signal.signal(signal.SIGTERM, own)
    try:
        yield from _stream(ray, todo, spec, workers, local=started and not address)
    finally:
        if started:
            ray.shutdown()


def _local_cpus(workers: int) -> int:
    return max(workers, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def _stream(ray, todo: list[dict], spec: dict, workers: int, local: bool):
    import logging

    for name in ("ray.data", "ray.data._internal.execution.streaming_executor"):
        logging.getLogger(name).setLevel(logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    device = spec.get("device")
    cuda = device.startswith("cuda") if device else ray.cluster_resources().get("GPU", 0) > 0  # a GPU per actor
    # CPUs per actor: --threads, else a local cluster's CPUs shared out (one node: they all fit), else one
    cpus = 0 if cuda else spec["threads"] or (max(1, _local_cpus(workers) // workers) if local else 1)
    spec = {**spec, "threads": spec["threads"] or cpus or None}  # torch's threads: the actor's CPUs
    data = ray.data.from_items([{"chunk": json.dumps(c)} for c in todo], override_num_blocks=len(todo))
    mapped = data.map_batches(_RayChunks, fn_constructor_args=(json.dumps(spec),), batch_size=1,
                              compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=cpus,
                              num_gpus=1 if cuda else 0, batch_format="numpy")
    for row in mapped.iter_rows():
        yield json.loads(row["row"])


class _Results:
    """``results.jsonl``: one line per finished request, appended and flushed as results come in; rebuilt (kept
    lines of complete requests, one each, in order; a line recovered from the PNG where a killed run wrote the
    image but not its line) at the start and the end of a run."""

    def __init__(self, path: Path, items: list[Item]):
        self.path, self.items = path, items
        self._file = None

    def _read(self) -> dict[int, dict]:
        rows: dict[int, dict] = {}
        with contextlib.suppress(OSError):
            for line in self.path.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(ValueError, TypeError, AttributeError):
                    row = json.loads(line)
                    rows[int(row["index"])] = row  # a later line replaces an earlier one
        return rows

    def rebuild(self, complete: set[int]) -> None:
        self.close()
        old = self._read()
        lines = []
        for i in sorted(complete):
            item = self.items[i]
            row = old.get(i)
            if row is None or row.get("files") != item.files or row.get("seeds") != item.seeds:
                row = _recovered_row(item)
            lines.append(json.dumps(row) + "\n")
        write_text_beside(self.path, "".join(lines), field="out")

    def append(self, row: dict) -> None:
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 -- open for the run
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _recovered_row(item: Item) -> dict:
    """A results line rebuilt from a complete output whose line was lost (the request as the file names it)."""
    return {"index": item.index, "id": item.id, "request": item.request.model_dump(), "seeds": item.seeds,
            "files": item.files, "seconds": None, "stats": {}, "recovered": True}

