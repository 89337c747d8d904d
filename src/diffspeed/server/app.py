"""``diffspeed serve``: the AUTOMATIC1111 web UI's HTTP API (``/sdapi/v1/*``) and a web page, on diffspeed.

``create_app(config)`` builds the FastAPI app; everything it holds (the catalog, the resolver and its RAM
cache, the engine, the job queue, the metrics registry) lives on ``app.state.diffspeed``, made per app: two
apps in one process share nothing. Requests flow: the web UI's JSON (:mod:`diffspeed.server.webui`) -> a
:class:`~diffspeed.request.GenerateRequest` and a recipe -> the bounded job queue (:mod:`diffspeed.server.jobs`),
which batches compatible requests -> :class:`~diffspeed.server.engine.Engine` -> ``generate_batch``.

Status codes: 401 without valid credentials (``--api-auth``), 413 for a body over the limit, 422 for every
invalid request (``detail`` lists each field, as FastAPI does), 429 with ``Retry-After`` when the queue is full,
503 while shutting down, 504 when a request outlives its timeout, 409 for a cancelled request, 500 for a
failure while generating (out of memory, NaN output).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import secrets
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from diffspeed import __version__
from diffspeed.core.recipe import tomllib
from diffspeed.errors import DiffspeedError, DiffspeedRuntimeError
from diffspeed.request import GenerateRequest, RequestError
from diffspeed.server import webui
from diffspeed.server.config import ServerConfig
from diffspeed.server.engine import Work
from diffspeed.server.jobs import JobCancelled, JobTimeout, QueueFull, ShuttingDown, TaskIdInUse

STATIC = Path(__file__).parent / "static"
API = "/sdapi/v1"


@dataclass
class ServerState:
    """Everything one app holds."""

    config: ServerConfig
    catalog: Any
    resolver: Any
    backend: Any  # a LocalBackend, or the Ray deployment's (diffspeed.server.ray_serve)
    metrics: Any
    model: str  # the model a request without override_settings gets (POST /options switches it)

    @property
    def model_entry(self):
        return self.catalog.entry(self.model)


def make_resolver(config: ServerConfig):
    """The resolver a server (or one of its replicas) loads with: paths refused, models in a RAM cache."""
    from diffspeed.pipelines.cache import ModelCache
    from diffspeed.resolve import Resolver

    return Resolver(ModelCache(max_models=config.cache_models), allow_paths=False, models_dir=config.models_dir,
                    max_image_pixels=config.limits.max_image_pixels)


def create_app(config: ServerConfig | None = None, backend=None) -> FastAPI:
    """The server's FastAPI app for ``config``; the default model loads when the app starts. ``backend``: where
    generation runs (default: a :class:`~diffspeed.server.backend.LocalBackend` in this process)."""
    from diffspeed.server.backend import LocalBackend
    from diffspeed.server.catalog import Catalog
    from diffspeed.server.metrics import Metrics

    config = config or ServerConfig()
    if config.preset is not None:
        _preset_recipe(config.preset, "cpu")  # an unknown name fails now, not on the first request
    catalog = Catalog(config.model, config.models_dir)
    resolver = make_resolver(config)
    metrics = Metrics()
    if backend is None:
        backend = LocalBackend(config, catalog, resolver, metrics)
    state = ServerState(config, catalog, resolver, backend, metrics, catalog.default.name)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await backend.start(state.model)
        yield
        await backend.stop(config.shutdown_grace)

    app = FastAPI(title="diffspeed", version=__version__, lifespan=lifespan, responses=_COMMON_ERRORS,
                  description="The AUTOMATIC1111 web UI's API (/sdapi/v1) served by diffspeed, plus diffspeed's own "
                  "routes (/diffspeed/v1). See the README's 'Server' section for the differences.")
    app.state.diffspeed = state
    app.add_middleware(_Guard, config=config)
    app.add_exception_handler(RequestValidationError, _invalid_body)
    _routes(app, state)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _errors(**codes: str) -> dict:
    return {int(code[1:]): {"model": webui.ErrorDetail, "description": why} for code, why in codes.items()}


# what any route may answer besides its own: a body that is not UTF-8, one over the limit (the _Guard)
_COMMON_ERRORS = _errors(_400="the body is not UTF-8 JSON", _413="the body is over the server's limit")
_GENERATE_ERRORS = _errors(_409="cancelled while queued", _429="the queue is full (see Retry-After)",
                           _500="generating failed (out of memory, NaN output)", _503="the server is shutting down",
                           _504="the request outlived the server's request timeout")


# ------------------------------------------------------------------------------------------------ middleware
class _Guard:
    """HTTP Basic auth on every route (when configured) and the request-body limit (413), as plain ASGI so the
    body is counted as it streams in, never buffered past the limit."""

    def __init__(self, app, config: ServerConfig):
        self.app = app
        self.users = [(u.encode(), p.encode()) for u, p in config.api_auth]
        self.limit = config.limits.max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.users and not self._authorized(headers.get(b"authorization", b"")):
            return await _send(send, 401, {"detail": "Not authenticated: this server needs HTTP Basic credentials "
                                           "(--api-auth)"}, [(b"www-authenticate", b'Basic realm="diffspeed"')])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _send(send, 413, {"detail": f"request body: {int(declared):,} bytes, more than the limit "
                                           f"of {self.limit:,}"})
        # read the body here, stopping at the limit (FastAPI would buffer it whole anyway), then replay it
        chunks, seen, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                return
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.limit:
                return await _send(send, 413, {"detail": f"request body: more than the limit of {self.limit:,} "
                                               f"bytes"})
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        await self.app(scope, replay, send)

    def _authorized(self, header: bytes) -> bool:
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"basic":
            return False
        try:
            user, sep, password = base64.b64decode(token, validate=True).partition(b":")
        except (binascii.Error, ValueError):
            return False
        ok = False
        for u, p in self.users:  # every pair compared, in constant time each
            ok |= secrets.compare_digest(user, u) & secrets.compare_digest(password, p) & bool(sep)
        return ok


async def _send(send, status: int, body: dict, headers: list | None = None) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": data})


# ------------------------------------------------------------------------------------------------ errors
def _unprocessable(problems: list[tuple[str, str]], prefix: tuple = ("body",)) -> JSONResponse:
    """422 in FastAPI's shape: one entry per field."""
    return JSONResponse(status_code=422, content={"detail": [
        {"loc": [*prefix, *field.split(".")], "msg": message, "type": "value_error"} for field, message in problems]})


async def _invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 without each error's ``input``: echoing it back fails on NaN/Infinity (JSON has neither,
    Python's parser reads them) and would return a 32 MiB image to its sender."""
    errors = [{k: v for k, v in e.items() if k != "input"} for e in exc.errors()]
    return JSONResponse(status_code=422, content={"detail": jsonable_encoder(errors)})


def _failure(err: BaseException) -> JSONResponse:
    if isinstance(err, QueueFull):
        return JSONResponse(status_code=429, content={"detail": str(err)},
                            headers={"Retry-After": str(err.retry_after)})
    if isinstance(err, ShuttingDown):
        return JSONResponse(status_code=503, content={"detail": str(err)}, headers={"Retry-After": "30"})
    if isinstance(err, JobTimeout):
        return JSONResponse(status_code=504, content={"detail": str(err)})
    if isinstance(err, (JobCancelled, TaskIdInUse)):
        return JSONResponse(status_code=409, content={"detail": str(err)})
    if isinstance(err, DiffspeedRuntimeError):
        return JSONResponse(status_code=500, content={"detail": str(err)})
    if isinstance(err, DiffspeedError):
        problems = getattr(err, "problems", None) or [(err.field or "request", str(err))]
        return _unprocessable([(webui.api_field(f), m) for f, m in problems])
    return JSONResponse(status_code=500, content={"detail": f"internal error: {type(err).__name__}: {err}"})


# ------------------------------------------------------------------------------------------------ recipes
def _preset_recipe(name: str, device: str):
    from diffspeed.presets import PRESETS, preset_recipe

    if name not in PRESETS:
        raise DiffspeedError(f"preset: {name!r} is not a preset ({', '.join(PRESETS)})", field="preset")
    return preset_recipe(name, device)


def _recipe(state: ServerState, preset: str | None, recipe: dict | str | None):
    """The request's recipe: its preset's (else the server's default preset's, unless it carries a recipe),
    then its own recipe's optimizations. Invalid ones raise DiffspeedError naming the script's field."""
    from diffspeed.core import Recipe

    field = "alwayson_scripts.diffspeed"
    if preset is None and recipe is None:
        preset = state.config.preset
    try:
        data = _preset_recipe(preset, state.backend.device).to_dict() if preset else {"optimization": []}
    except DiffspeedError as err:
        raise DiffspeedError(str(err), field=f"{field}.preset") from err
    if recipe is not None:
        if isinstance(recipe, str):
            try:
                recipe = tomllib.loads(recipe)
            except tomllib.TOMLDecodeError as err:
                raise DiffspeedError(f"recipe: not valid TOML ({err})", field=f"{field}.recipe") from err
        extra = recipe.get("optimization", []) if isinstance(recipe, dict) else None
        if not isinstance(extra, list):
            raise DiffspeedError("recipe: must hold an 'optimization' list of tables", field=f"{field}.recipe")
        data = {**data, "optimization": data["optimization"] + extra}
    try:
        return Recipe.from_dict(data, source="request")
    except DiffspeedError as err:
        raise DiffspeedError(f"recipe: {err}", field=f"{field}.recipe") from err


# ------------------------------------------------------------------------------------------------ generation
def _check_limits(state: ServerState, request: GenerateRequest, plan) -> list[tuple[str, str]]:
    limits = state.config.limits
    problems = []
    for name, value, most in (("width", request.width, limits.max_width), ("height", request.height,
                              limits.max_height), ("steps", request.steps, limits.max_steps)):
        if value is not None and value > most:
            problems.append((name, f"{name}: {value} is over this server's limit of {most}"))
    if request.hires_scale > 1 and request.width and request.height:
        big = (request.width * request.hires_scale, request.height * request.hires_scale)
        if big[0] > limits.max_width or big[1] > limits.max_height:
            problems.append(("hr_scale", f"hr_scale: the hires size {big[0]:.0f}x{big[1]:.0f} is over this "
                             f"server's limit of {limits.max_width}x{limits.max_height}"))
    if request.hires_steps > limits.max_steps:
        problems.append(("hr_second_pass_steps", f"hr_second_pass_steps: over this server's limit of "
                         f"{limits.max_steps}"))
    if plan.n_images > limits.max_images:
        problems.append(("batch_size", f"batch_size: batch_size * n_iter = {plan.n_images} images, over this "
                         f"server's limit of {limits.max_images} per request"))
    for name in ("prompt", "negative_prompt"):
        n = len(getattr(request, name))
        if n > limits.max_prompt_chars:
            problems.append((name, f"{name}: {n} characters, over this server's limit of "
                             f"{limits.max_prompt_chars}"))
    return problems


def _prepare(state: ServerState, api) -> tuple[Any, Work] | JSONResponse:
    """The web-UI request -> (plan, Work), or the 422 listing every problem."""
    try:
        plan = webui.plan_request(api)
    except DiffspeedError as err:
        return _failure(err)
    problems = []
    try:
        request = GenerateRequest(**plan.request_fields)
    except RequestError as err:
        return _unprocessable([(webui.api_field(f), m) for f, m in err.problems])
    problems += _check_limits(state, request, plan)
    model = state.model
    try:
        if plan.model is not None:
            model = state.catalog.model(plan.model).name
    except DiffspeedError as err:
        problems.append(("override_settings.sd_model_checkpoint", str(err)))
    for name, _ in plan.loras:
        try:
            state.catalog.lora(name)
        except DiffspeedError as err:
            problems.append(("prompt", str(err)))
    try:
        state.resolver.check(request)
    except DiffspeedError as err:
        problems.append((webui.api_field(err.field or "request"), str(err)))
    recipe = None
    try:
        recipe = _recipe(state, plan.preset, plan.recipe)
    except DiffspeedError as err:
        problems.append((err.field or "alwayson_scripts.diffspeed", str(err)))
    if not problems and plan.control_resize_mode not in (None, "Just Resize"):
        problems += _control_resize(state, request, plan)
    if problems:
        return _unprocessable(problems)
    request = _filled(state, request, model, recipe)
    preset = plan.preset or (state.config.preset if plan.recipe is None else None)
    return plan, Work(request, model, recipe, preset, plan.loras)


def _control_resize(state: ServerState, request: GenerateRequest, plan) -> list[tuple[str, str]]:
    """A ControlNet unit's resize mode other than "Just Resize" is honoured only where it changes nothing: when
    the control image already has the output's aspect ratio (diffspeed resizes it to the output)."""
    try:
        image = state.resolver.image(request.control_image, "control_image")
    except DiffspeedError as err:
        return [("alwayson_scripts.controlnet", str(err))]
    size = (request.width or 512, request.height or 512)
    problem = webui.control_resize_problem(plan.control_resize_mode, image.size, size)
    return [("alwayson_scripts.controlnet", problem)] if problem else []


def _filled(state: ServerState, request: GenerateRequest, model: str, recipe) -> GenerateRequest:
    """Steps, sampler, CFG and size resolved now, so equal requests have equal batch keys."""
    from diffspeed.generate import resolve_sampling

    entry = state.catalog.entry(model)
    sampling = resolve_sampling(request, recipe, None)
    cfg = request.cfg_scale if request.cfg_scale is not None else (entry.recommended_cfg or sampling.cfg_scale)
    changes = {"steps": sampling.steps, "sampler": sampling.sampler, "cfg_scale": cfg}
    if request.init_image is None and entry.native_size:
        changes.update(width=request.width or entry.native_size, height=request.height or entry.native_size)
    return request.replace(**changes)


async def _generate(state: ServerState, api, http: Request) -> Response:
    prepared = _prepare(state, api)
    if isinstance(prepared, Response):
        return prepared
    plan, work = prepared
    started = time.perf_counter()
    try:
        job = state.backend.submit(work, plan.task_id)
    except DiffspeedError as err:
        return _failure(err)
    # uvicorn does not cancel a route whose client went away, so wait for the result or the disconnect,
    # whichever comes first: a job whose client is gone leaves the queue instead of being generated for nobody
    waiter = asyncio.ensure_future(state.backend.wait(job))
    gone = asyncio.ensure_future(_disconnected(http))
    try:
        await asyncio.wait({waiter, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not waiter.done():  # cancelling the wrapper cancels job.future; the queue then drops the job
            waiter.cancel()
    if waiter.cancelled():
        return Response(status_code=499)  # nobody reads it (nginx's "client closed request")
    try:
        outcome = waiter.result()
    except Exception as err:  # noqa: BLE001 -- every failure becomes its status code
        return _failure(err)
    response = await run_in_threadpool(_respond, state, plan, work, outcome.result, outcome.job_timestamp)
    state.metrics.latency.observe(time.perf_counter() - started)
    return response


async def _disconnected(http: Request) -> None:
    """Returns when the client closes the connection (the body was read already, so only that is left)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


def _respond(state: ServerState, plan, work: Work, result, job_timestamp: str | None) -> Response:
    from diffspeed.generate import save_images
    from diffspeed.pngmeta import png_bytes

    images = []
    if plan.send_images:
        for image, params in zip(result.images, result.parameters):
            images.append(base64.b64encode(png_bytes(image, params)).decode("ascii"))
    if plan.save_images:
        folder = Path(state.config.outputs_dir) / f"{plan.kind}-images" / datetime.now().strftime("%Y-%m-%d")
        save_images(result, folder)
    entry = state.catalog.entry(work.model)
    info = json.loads(webui.info_json(plan, [result], model_name=entry.name, model_hash=entry.hash,
                                      version=f"diffspeed {__version__}", job_timestamp=job_timestamp,
                                      batched_with=result.stats.get("batched_requests", 1) - 1))
    info["diffspeed"]["recipe"] = work.recipe.to_dict().get("optimization", [])
    info["diffspeed"]["model"] = entry.title
    state.metrics.images.inc(len(result.images))
    body = webui.ImageResponse(images=images, parameters=plan.echo, info=json.dumps(info, default=str))
    return JSONResponse(jsonable_encoder(body))


# ------------------------------------------------------------------------------------------------ routes
def _routes(app: FastAPI, state: ServerState) -> None:  # noqa: C901 -- one place lists every route
    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.post(f"{API}/txt2img", response_model=webui.ImageResponse, tags=["generate"], responses=_GENERATE_ERRORS)
    async def txt2img(body: webui.Txt2ImgRequest, request: Request):
        return await _generate(state, body, request)

    @app.post(f"{API}/img2img", response_model=webui.ImageResponse, tags=["generate"], responses=_GENERATE_ERRORS)
    async def img2img(body: webui.Img2ImgRequest, request: Request):
        return await _generate(state, body, request)

    @app.get(f"{API}/progress", response_model=webui.ProgressResponse, tags=["queue"])
    def progress(skip_current_image: bool = False, id_task: str | None = Query(None)):
        snap = state.backend.progress(id_task)
        s = snap["state"]
        s = {**s, "job_timestamp": s.get("job_timestamp") or "0"}
        return webui.ProgressResponse(progress=snap["progress"], eta_relative=snap["eta_relative"],
                                      state=webui.ProgressState(**s), current_image=None,
                                      textinfo=snap.get("textinfo"), current_task=s.get("job") or None,
                                      queue=snap.get("queue"))

    @app.post(f"{API}/interrupt", tags=["queue"])
    def interrupt():
        state.backend.interrupt()
        return {}

    @app.post(f"{API}/skip", tags=["queue"])
    def skip():
        state.backend.skip()
        return {}

    @app.post("/diffspeed/v1/cancel/{task_id}", tags=["queue"],
              responses=_errors(_409="not queued: unknown, running or finished"))
    def cancel(task_id: str):
        """Cancel a queued request by its ``force_task_id``; 409 when it is running or finished."""
        if state.backend.cancel(task_id):
            return {"cancelled": task_id}
        return JSONResponse(status_code=409, content={"detail": f"{task_id}: not queued (unknown, running or "
                                                                f"finished); interrupt stops the running one"})

    @app.get(f"{API}/samplers", response_model=list[webui.SamplerItem], tags=["lists"])
    def samplers():
        return webui.sampler_items()

    @app.get(f"{API}/schedulers", response_model=list[webui.SchedulerItem], tags=["lists"])
    def schedulers():
        return webui.scheduler_items()

    @app.get(f"{API}/sd-models", tags=["lists"])
    def sd_models():
        return [{**webui.SDModelItem(title=e.title, model_name=e.name, hash=e.hash, sha256=None,
                                     filename=e.name, config=None).model_dump(),
                 "diffspeed": {"native_size": e.native_size, "recommended_cfg": e.recommended_cfg, "kind": e.kind}}
                for e in state.catalog.models()]

    @app.post(f"{API}/refresh-checkpoints", tags=["lists"])
    def refresh_checkpoints():
        state.catalog.refresh()
        return {}

    @app.post(f"{API}/refresh-loras", tags=["lists"])
    def refresh_loras():
        state.catalog.refresh()
        return {}

    @app.get(f"{API}/loras", response_model=list[webui.LoraItem], tags=["lists"])
    def loras():
        return [webui.LoraItem(name=e.name, alias=e.name, path=e.path.name, metadata={})
                for e in state.catalog.loras()]

    @app.get(f"{API}/upscalers", response_model=list[webui.UpscalerItem], tags=["lists"])
    def upscalers():
        return webui.upscaler_items()

    @app.get(f"{API}/latent-upscale-modes", response_model=list[webui.LatentUpscaleModeItem], tags=["lists"])
    def latent_upscale_modes():
        return webui.latent_upscale_modes()

    @app.get(f"{API}/scripts", response_model=webui.ScriptsList, tags=["lists"])
    def scripts():
        return webui.scripts_list()

    @app.get("/diffspeed/v1/presets", tags=["lists"])
    def presets():
        from diffspeed.presets import PRESETS, load_preset

        return [{"name": n, "description": load_preset(n).description, "default": n == state.config.preset}
                for n in PRESETS]

    @app.get(f"{API}/memory", response_model=webui.MemoryResponse, tags=["system"])
    def memory():
        return _memory()

    @app.get(f"{API}/options", tags=["options"])
    def get_options():
        return _options(state)

    @app.post(f"{API}/options", tags=["options"])
    async def set_options(body: dict[str, Any]):
        """Switch ``sd_model_checkpoint`` (through the RAM cache; answers once loaded) or ``diffspeed_preset``;
        other web-UI settings are refused by name (422), since diffspeed would ignore them."""
        known = set(_options(state))
        problems = [(k, f"{k}: diffspeed has no such setting ({', '.join(sorted(known))})")
                    for k in body if k not in known]
        changes = {k: v for k, v in body.items() if k in known and v != _options(state)[k]}
        for key in changes:
            if key not in ("sd_model_checkpoint", "diffspeed_preset"):
                problems.append((key, f"{key}: read-only here"))
        entry = None
        if "sd_model_checkpoint" in changes:
            try:
                entry = state.catalog.model(str(changes["sd_model_checkpoint"]))
            except DiffspeedError as err:
                problems.append(("sd_model_checkpoint", str(err)))
        if "diffspeed_preset" in changes and changes["diffspeed_preset"] is not None:
            try:
                _preset_recipe(str(changes["diffspeed_preset"]), state.backend.device)
            except DiffspeedError as err:
                problems.append(("diffspeed_preset", str(err)))
        if problems:
            return _unprocessable(problems)
        if entry is not None:
            try:
                await state.backend.load(entry.name)
            except DiffspeedError as err:
                return _failure(err)
            state.model = entry.name
        if "diffspeed_preset" in changes:
            from dataclasses import replace

            state.config = replace(state.config, preset=changes["diffspeed_preset"])
        return None

    @app.post(f"{API}/png-info", response_model=webui.PNGInfoResponse, tags=["system"])
    def png_info(body: webui.PNGInfoRequest):
        return _png_info(state, body.image)

    @app.get("/metrics", include_in_schema=False)
    def metrics():
        stats = state.backend.stats()
        state.metrics.update(stats)
        return Response(state.metrics.render(), media_type=state.metrics.content_type)


def _options(state: ServerState) -> dict:
    entry = state.model_entry
    return {"sd_model_checkpoint": entry.title, "sd_checkpoint_hash": entry.hash,
            "sd_checkpoints_limit": state.config.cache_models, "diffspeed_preset": state.config.preset,
            "samples_format": "png", "samples_save": True, "outdir_samples": "", "CLIP_stop_at_last_layers": 1,
            "sd_vae": "Automatic", "eta_noise_seed_delta": 0, "randn_source": "CPU"}


def _memory() -> dict:
    import psutil

    from diffspeed._lazy import lazy_import

    vm = psutil.virtual_memory()
    ram = {"free": vm.available, "used": vm.total - vm.available, "total": vm.total}
    torch = lazy_import("torch")
    if not torch.cuda.is_available():
        return {"ram": ram, "cuda": {"error": "no CUDA device"}}
    free, total = torch.cuda.mem_get_info()
    stats = torch.cuda.memory_stats()
    return {"ram": ram, "cuda": {"system": {"free": free, "used": total - free, "total": total},
                                 "active": {"current": stats.get("active_bytes.all.current", 0),
                                            "peak": stats.get("active_bytes.all.peak", 0)},
                                 "allocated": {"current": torch.cuda.memory_allocated(),
                                               "peak": torch.cuda.max_memory_allocated()}}}


def _png_info(state: ServerState, image: str) -> dict | JSONResponse:
    from diffspeed.pngmeta import KEY, parse_parameters

    if not image:
        return _unprocessable([("image", "image: empty; send a base64 PNG")])
    try:
        picture = state.resolver.open_inline(image, "image")
    except DiffspeedError as err:
        return _unprocessable([("image", str(err))])
    text = picture.info.get(KEY)
    items = {k: v for k, v in picture.info.items() if isinstance(v, str) and k != KEY}
    if text is None:
        return {"info": "", "items": items, "parameters": {}}
    try:
        params = parse_parameters(text)
    except ValueError:
        params = {}
    return {"info": text, "items": items, "parameters": params}
