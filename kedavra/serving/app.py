"""The ASGI app: AUTOMATIC1111's /sdapi/v1 API over a `Worker`, and the web page at /.

    create_app(worker, ServerConfig(api_key=None, max_body_bytes=20 * 2**20, loopback_only=True)) -> FastAPI

Every request passes, in order: the Host check (while the server is local-only, a Host header that is not a
loopback name is refused 403, so a web page that rebinds its DNS name to 127.0.0.1 cannot drive the API), the
API key (when one is set, every path but the page and the API description needs "Authorization: Bearer KEY" or
HTTP basic auth with KEY as the password, else 401 before the body is read), the body limit (413 as soon as the
declared or received size passes it), then the fields (422 naming the bad one). A generation request is queued
(503 with Retry-After when the queue is full) and its handler waits for the worker, checking every
DISCONNECT_POLL_S whether its client is still there: a client that leaves cancels its job.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import json
import secrets
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from PIL import Image, ImageOps
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers

from kedavra import __version__
from kedavra.commands.settings import AUTOMATIC_KARRAS, Settings, schedule_karras
from kedavra.diffusion.samplers import SAMPLERS, SamplerSpec, resolve_sampler
from kedavra.diffusion.timesteps import start_index_for_strength
from kedavra.formats.png_info import KEDAVRA_VERSION
from kedavra.pipeline.pipeline import MAX_SEED, MAX_SIDE, Pipeline
from kedavra.serving.schemas import (
    SCHEDULERS,
    GenerationRequest,
    GenerationResponse,
    Img2ImgRequest,
    ProgressResponse,
    SamplerItem,
    SchedulerItem,
    SDModelItem,
    Txt2ImgRequest,
    decode_image,
    ignored_settings,
)
from kedavra.serving.worker import GenerationTask, Job, ModelEntry, QueueFull, Worker

API_PREFIX = "/sdapi/v1"
DISCONNECT_POLL_S = 0.25  # how often a waiting handler checks that its client is still connected
MAX_ECHOED_INPUT = 200  # characters of a bad field's value repeated in a 422 (a base64 image can be megabytes)
MODEL_LOADING_RETRY_S = 5  # Retry-After while the worker switches models (an SD checkpoint loads in seconds)
KARRAS_RHO = 7.0  # Karras et al. 2022, eq. 5: ρ = 7
STATIC_DIR = Path(__file__).parent / "static"
# The page's files, read once at start: a request's path only ever selects one of these, never a file.
PAGE_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
}
# Paths served without the API key: the page (it asks for the key itself) and the API's description.
PUBLIC_PATHS = frozenset([*PAGE_FILES, "/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc"])
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
LOOPBACK_NAMES = ("localhost",)


@dataclass(frozen=True)
class ServerConfig:
    """How the app guards itself. loopback_only: refuse Host headers that are not a loopback name (set it when
    the server listens on the loopback only, as by default)."""

    api_key: str | None
    max_body_bytes: int
    loopback_only: bool = True

    def __post_init__(self):
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key.strip()
                                         or self.api_key != self.api_key.strip()):
            raise ValueError("api_key must be a non-empty string without spaces at its ends, or None")
        if isinstance(self.max_body_bytes, bool) or not isinstance(self.max_body_bytes, int) \
                or self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be a positive integer, got {self.max_body_bytes!r}")


def is_loopback(host: str) -> bool:
    """True for "localhost" and loopback addresses (127.0.0.0/8, ::1), with or without a port."""
    if host.startswith("["):  # "[::1]:7860"
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:  # "127.0.0.1:7860", "localhost:7860"
        host = host.partition(":")[0]
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_authorized(authorization: str | None, api_key: str) -> bool:
    """"Bearer KEY", or basic auth (A1111's --api-auth, webuiapi's username/password) with KEY as the password."""
    scheme, _, credentials = (authorization or "").partition(" ")
    if scheme.lower() == "bearer":
        offered = credentials.strip()
    elif scheme.lower() == "basic":
        try:
            offered = base64.b64decode(credentials.strip(), validate=True).decode("utf-8").partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            return False
    else:
        return False
    return secrets.compare_digest(offered.encode("utf-8"), api_key.encode("utf-8"))


class RequestGuard:
    """ASGI middleware: the Host check and the API key, before anything reads the request's body."""

    def __init__(self, app, config: ServerConfig):
        self.app = app
        self.config = config

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = Headers(scope=scope)
            refusal = None
            if self.config.loopback_only and not is_loopback(headers.get("host", "")):
                refusal = JSONResponse({"detail": f"Host {headers.get('host', '')!r} is not a loopback name; this "
                                                  "server is local-only"}, status_code=403)
            elif (self.config.api_key is not None and scope["path"] not in PUBLIC_PATHS
                  and not is_authorized(headers.get("authorization"), self.config.api_key)):
                refusal = JSONResponse({"detail": "missing or wrong API key: send 'Authorization: Bearer KEY' or "
                                                  "basic auth with KEY as the password"}, status_code=401,
                                       headers={"WWW-Authenticate": 'Bearer realm="kedavra"'})
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)


def field_error(field: str | tuple, message: str, value: Any = None) -> RequestValidationError:
    """A 422 naming `field` (a name or a loc tuple under "body"), in FastAPI's error format."""
    loc = ("body", *(field if isinstance(field, tuple) else (field,)))
    return RequestValidationError([{"type": "value_error", "loc": loc, "msg": message, "input": value}])


async def validation_error_handler(request: Request, error: RequestValidationError) -> JSONResponse:
    """FastAPI's 422, without repeating huge inputs (base64 images) back to the client."""
    details = []
    for detail in error.errors():
        detail = {key: value for key, value in detail.items() if key != "url"}
        if "ctx" in detail:  # pydantic puts the validator's exception there; its text is already in "msg"
            detail["ctx"] = {k: str(v) if isinstance(v, Exception) else v for k, v in detail["ctx"].items()}
        if "input" in detail:
            detail["input"] = _echoable(detail["input"])
        details.append(detail)
    return JSONResponse({"detail": jsonable_encoder(details)}, status_code=422)


def _echoable(value: Any) -> Any:
    """A bad value as a 422 repeats it: as it came if short and valid JSON (NaN is not), else described."""
    text = repr(value)
    if len(text) > MAX_ECHOED_INPUT:
        return f"<{type(value).__name__} of {len(text)} characters>"
    try:
        json.dumps(jsonable_encoder(value), allow_nan=False)
    except (TypeError, ValueError):
        return text
    return value


# ---- requests into tasks ------------------------------------------------------------------------------------------


def request_karras(scheduler: str | None, spec: SamplerSpec, karras_from_name: bool) -> bool:
    """Whether a request's schedule type means Karras σ spacing (A1111's "automatic": the sampler's own)."""
    name = (scheduler or "automatic").strip().lower()
    if name not in SCHEDULERS:
        raise field_error("scheduler", f"unknown schedule type {scheduler!r}; allowed: "
                                       f"{', '.join(SCHEDULERS.values())} (or their lower-case names)", scheduler)
    return schedule_karras(SCHEDULERS[name], spec, karras_from_name)


def build_task(body: GenerationRequest, pipe: Pipeline) -> GenerationTask:
    """Check `body` against the loaded model and resolve it (random seed, sizes, images); 422 naming the field."""
    try:
        spec, karras_from_name = resolve_sampler(body.sampler)
    except ValueError as error:
        raise field_error("sampler_name", str(error), body.sampler) from None
    karras = request_karras(body.scheduler, spec, karras_from_name)
    init_images = [decode_image(text).convert("RGB") for text in getattr(body, "init_images", [])]
    width, height = request_size(body, pipe, init_images[0].size if init_images else None)
    init_images, mask, strength = img2img_inputs(body, width, height, init_images)
    if pipe.config.inpainting and mask is None:
        raise field_error("mask", f"the loaded model ({pipe.config.family}) is an inpainting model: use img2img "
                                  "with init_images and a mask")
    seed = secrets.randbelow(MAX_SEED + 1) if body.seed < 0 else body.seed
    eta = (body.eta if body.eta is not None else 0.0) if spec.name == "ddim" else 0.0
    try:
        settings = Settings(prompt=body.prompt, negative_prompt=body.negative_prompt, steps=body.steps, sampler=spec,
                            karras=karras, cfg_scale=body.cfg_scale, guidance_rescale=0.0, eta=eta, seed=seed,
                            width=width, height=height, num_images=body.batch_size, strength=strength)
        pipe.check_request(width, height, body.steps, body.cfg_scale, body.batch_size, seed, spec.name)
    except ValueError as error:
        raise RequestValidationError([{"type": "value_error", "loc": ("body",), "msg": str(error)}]) from None
    return GenerationTask(settings, body.n_iter, init_images, mask)


def request_size(body: GenerationRequest, pipe: Pipeline, init_size: tuple[int, int] | None) -> tuple[int, int]:
    """(width, height): the request's, else the init image's, else the model's; multiples of its VAE factor."""
    default = init_size or (pipe.config.image_size, pipe.config.image_size)
    width, height = body.width or default[0], body.height or default[1]
    multiple = pipe.size_multiple
    for name, side, given in (("width", width, body.width), ("height", height, body.height)):
        if side % multiple or not multiple <= side <= MAX_SIDE:
            origin = "" if given else " (the size of init_images[0]; set width and height to resize it)"
            raise field_error(name, f"{name} must be a multiple of {multiple} (this model's VAE factor) from "
                                    f"{multiple} to {MAX_SIDE}, got {side}{origin}", side)
    return width, height


def img2img_inputs(body: GenerationRequest, width: int, height: int, init_images: list[Image.Image]):
    """(init images resized to width x height, the mask (white = paint) or None, the strength or None)."""
    if not isinstance(body, Img2ImgRequest):
        return (), None, None
    if len(init_images) not in (1, body.batch_size):
        raise field_error("init_images", f"give 1 init image or one per batch image ({body.batch_size}), "
                                         f"got {len(init_images)}", len(init_images))
    try:
        start_index_for_strength(body.steps, body.denoising_strength)
    except ValueError as error:
        raise field_error("denoising_strength", str(error), body.denoising_strength) from None
    resized = tuple(image if image.size == (width, height) else image.resize((width, height), Image.Resampling.LANCZOS)
                    for image in init_images)  # A1111's resize_mode 0, "just resize"
    mask = None
    if body.mask is not None:
        mask = decode_image(body.mask).convert("L").resize((width, height), Image.Resampling.NEAREST)
        if body.inpainting_mask_invert:
            mask = ImageOps.invert(mask)
    return resized, mask, body.denoising_strength


def request_notes(body: GenerationRequest, spec: SamplerSpec) -> list[str]:
    notes = ignored_settings(body)
    if body.eta not in (None, 1.0) and spec.stochastic and spec.name != "ddim":
        notes.append(f"eta applies to DDIM only; {spec.a1111 or spec.name} adds its full ancestral noise (eta 1)")
    return notes


def generation_info(task: GenerationTask, outcome, notes: list[str], inpainting_model: bool) -> dict[str, Any]:
    """A1111's `Processed.js()` for the images made (see modules/processing.py), plus `interrupted` and `notes`."""
    s = task.settings
    count = len(outcome.seeds)
    return {
        "prompt": s.prompt, "all_prompts": [s.prompt] * count,
        "negative_prompt": s.negative_prompt, "all_negative_prompts": [s.negative_prompt] * count,
        "seed": outcome.seeds[0] if count else s.seed, "all_seeds": outcome.seeds,
        "subseed": -1, "all_subseeds": [-1] * count, "subseed_strength": 0,
        "width": s.width, "height": s.height, "sampler_name": s.sampler.a1111 or s.sampler.name,
        "scheduler": SCHEDULERS["karras"] if s.karras else SCHEDULERS["uniform"],
        "cfg_scale": s.cfg_scale, "steps": s.steps, "batch_size": s.num_images, "n_iter": task.n_iter,
        "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": outcome.model.model_name, "sd_model_hash": outcome.model.short_hash,
        "sd_vae_name": None, "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": s.strength, "extra_generation_params": {}, "index_of_first_image": 0,
        "infotexts": outcome.infotexts, "styles": [], "job_timestamp": outcome.job_timestamp, "clip_skip": 1,
        "is_using_inpainting_conditioning": inpainting_model and task.mask is not None,
        "version": KEDAVRA_VERSION, "interrupted": outcome.interrupted, "notes": notes,
    }


# ---- the app ------------------------------------------------------------------------------------------------------


def create_app(worker: Worker, config: ServerConfig) -> FastAPI:
    """The app serving `worker`; it starts the worker when it starts and stops it when it stops."""
    page = {path: ((STATIC_DIR / name).read_bytes(), media) for path, (name, media) in PAGE_FILES.items()}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        yield
        await run_in_threadpool(worker.stop)

    app = FastAPI(title="kedavra", version=__version__, lifespan=lifespan, max_body_size=config.max_body_bytes,
                  description="Stable Diffusion from scratch, behind AUTOMATIC1111's /sdapi/v1 API. With an API key "
                              "set, send 'Authorization: Bearer KEY' (or basic auth with KEY as the password).")
    app.add_middleware(RequestGuard, config=config)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    api = APIRouter(prefix=API_PREFIX)

    async def wait_for(job: Job, request: Request):
        """The job's result, or None when the client went away first (the job is then cancelled)."""
        waiter = asyncio.wrap_future(job.future)
        try:
            while not (await asyncio.wait({waiter}, timeout=DISCONNECT_POLL_S))[0]:
                if await request.is_disconnected():
                    worker.cancel(job)
                    return None
        except asyncio.CancelledError:
            worker.cancel(job)
            raise
        if waiter.cancelled():
            return JSONResponse({"detail": "the server is shutting down"}, status_code=503)
        error = waiter.exception()
        if isinstance(error, ValueError):  # the pipeline's own checks, e.g. a model switched meanwhile
            return JSONResponse({"detail": str(error)}, status_code=422)
        return waiter.result()

    def submit(task) -> Job | JSONResponse:
        try:
            return worker.submit(task)
        except QueueFull as full:
            return JSONResponse({"detail": str(full)}, status_code=503,
                                headers={"Retry-After": str(full.retry_after)})

    async def generate(body: GenerationRequest, request: Request):
        pipe = worker.pipeline
        if pipe is None:
            return JSONResponse({"detail": "a model is loading"}, status_code=503,
                                headers={"Retry-After": str(MODEL_LOADING_RETRY_S)})
        task = build_task(body, pipe)
        job = submit(task)
        if isinstance(job, JSONResponse):
            return job
        outcome = await wait_for(job, request)
        if outcome is None:
            return Response(status_code=499)  # nobody is there to read it (nginx's "client closed request")
        if isinstance(outcome, Response):
            return outcome
        parameters = body.model_dump()
        if isinstance(body, Img2ImgRequest) and not body.include_init_images:
            parameters["init_images"] = parameters["mask"] = None  # as A1111: not sent back unless asked
        images = [base64.b64encode(png).decode("ascii") for png in outcome.images] if body.send_images else []
        info = generation_info(task, outcome, request_notes(body, task.settings.sampler), pipe.config.inpainting)
        return GenerationResponse(images=images, parameters=parameters, info=json.dumps(info))

    @api.post("/txt2img", response_model=GenerationResponse)
    async def txt2img(body: Txt2ImgRequest, request: Request):
        """Text to image (A1111's txt2img)."""
        return await generate(body, request)

    @api.post("/img2img", response_model=GenerationResponse)
    async def img2img(body: Img2ImgRequest, request: Request):
        """Image to image and inpainting (A1111's img2img): init_images, denoising_strength, mask."""
        return await generate(body, request)

    @api.get("/progress", response_model=ProgressResponse)
    async def progress(skip_current_image: bool = Query(False)):
        """The running job's progress, and its latest x0 prediction decoded (unless skip_current_image)."""
        return worker.progress(want_image=not skip_current_image)

    @api.post("/interrupt")
    async def interrupt():
        """Stop the running job after its current step; its request is answered with the batches finished."""
        return {"interrupted": worker.interrupt()}

    @api.get("/samplers", response_model=list[SamplerItem])
    async def samplers():
        items = []
        for spec in SAMPLERS.values():
            name = spec.a1111 or spec.name
            aliases = list(dict.fromkeys(a for a in (spec.name, spec.comfyui) if a and a != name))
            items.append(SamplerItem(name=name, aliases=aliases,
                                     options={"scheduler": "karras"} if spec.name in AUTOMATIC_KARRAS else {}))
        return items

    @api.get("/schedulers", response_model=list[SchedulerItem])
    async def schedulers():
        return [SchedulerItem(name=name, label=label, default_rho=KARRAS_RHO if name == "karras" else -1)
                for name, label in SCHEDULERS.items()]

    @api.get("/sd-models", response_model=list[SDModelItem])
    async def sd_models():
        """The model the server runs and the models in --models-dir (hashes once loaded, as A1111)."""
        return [_model_item(entry) for entry in await run_in_threadpool(worker.catalog.entries)]

    @api.get("/options")
    async def get_options():
        return {"sd_model_checkpoint": worker.model.title, "sd_checkpoint_hash": worker.model.sha256,
                "samples_format": "png", "CLIP_stop_at_last_layers": 1}

    @api.post("/options")
    async def set_options(options: dict[str, Any], request: Request):
        """Only sd_model_checkpoint acts: it switches to a listed model, named as /sd-models lists it."""
        ignored = sorted(key for key in options if key != "sd_model_checkpoint")
        name = options.get("sd_model_checkpoint")
        if name is None:
            return {"applied": {}, "ignored": ignored}
        if not isinstance(name, str):
            raise field_error("sd_model_checkpoint", "must be a model's listed name (a string)", name)
        try:
            entry = await run_in_threadpool(worker.catalog.find, name)
        except ValueError as error:
            raise field_error("sd_model_checkpoint", str(error), name) from None
        job = submit(entry)
        if isinstance(job, JSONResponse):
            return job
        model = await wait_for(job, request)
        if model is None or isinstance(model, Response):
            return model or Response(status_code=499)
        return {"applied": {"sd_model_checkpoint": model.title}, "ignored": ignored}

    @api.get("/scripts")
    async def scripts():
        """A1111's script lists: kedavra has no scripts (webuiapi asks at start-up)."""
        return {"txt2img": [], "img2img": []}

    app.include_router(api)

    def page_route(path: str):
        content, media_type = page[path]

        async def serve_file():
            return Response(content, media_type=media_type, headers=PAGE_HEADERS)

        app.get(path, include_in_schema=False)(serve_file)

    for path in page:
        page_route(path)
    return app


def _model_item(entry: ModelEntry) -> SDModelItem:
    return SDModelItem(title=entry.title, model_name=entry.model_name, hash=entry.short_hash, sha256=entry.sha256,
                       filename=str(entry.path))
