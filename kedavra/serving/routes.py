"""AUTOMATIC1111's /sdapi/v1 endpoints, as one APIRouter over the app's `Worker` (app.state.worker).

A generation request is checked and resolved into a task (kedavra.serving.tasks), queued (the worker's
QueueFull is answered 503 with Retry-After) and waited for; its handler checks every DISCONNECT_POLL_S whether
its client is still there, and a client that leaves cancels its job. Helpers return their one result or raise
(kedavra.serving.errors says how each exception is answered).
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from starlette.concurrency import run_in_threadpool

from kedavra.adapters.lora_file import file_metadata
from kedavra.diffusion.samplers import SAMPLERS
from kedavra.diffusion.samplers.k_diffusion import K_SAMPLERS
from kedavra.diffusion.sigmas import SCHEDULE_TYPES
from kedavra.pipeline.infotext import A1111_DEFAULT_RNG, AUTOMATIC_KARRAS
from kedavra.pipeline.pipeline import Pipeline
from kedavra.serving.errors import ClientGone, field_error, unavailable
from kedavra.serving.schemas import (
    A1111_ENSD_SETTING,
    A1111_RNG_SETTING,
    SAMPLING_SETTINGS,
    SCHEDULERS,
    GenerationBody,
    GenerationResponse,
    Img2ImgRequest,
    ProgressResponse,
    SamplerItem,
    SchedulerItem,
    SDModelItem,
    Txt2ImgRequest,
)
from kedavra.serving.tasks import generation_info, img2img_task, noise_settings, request_notes, txt2img_task
from kedavra.serving.worker import GenerationTask, Job, ModelEntry, Worker

API_PREFIX = "/sdapi/v1"
DISCONNECT_POLL_S = 0.25  # how often a waiting handler checks that its client is still connected
MODEL_LOADING_RETRY_S = 5  # Retry-After while the worker switches models (an SD checkpoint loads in seconds)
KARRAS_RHO = 7.0  # Karras et al. 2022, eq. 5: ρ = 7
T = TypeVar("T")  # what a job returns
Body = TypeVar("Body", bound=GenerationBody)  # a txt2img or img2img request

router = APIRouter(prefix=API_PREFIX)


def get_worker(request: Request) -> Worker:
    """The app's worker (create_app puts it in app.state)."""
    return request.app.state.worker


WorkerDep = Annotated[Worker, Depends(get_worker)]


def loaded_pipeline(worker: Worker) -> Pipeline:
    """The worker's pipeline; 503 with Retry-After while a model switch is loading the next one."""
    pipe = worker.pipeline  # read once: the worker thread sets it to None while it loads another model
    if pipe is None:
        raise unavailable("a model is loading", MODEL_LOADING_RETRY_S)
    return pipe


async def wait_for(job: Job[T], worker: Worker, request: Request) -> T:
    """The job's result. ClientGone (the job cancelled) when the client leaves first; 503 when the server stops
    before running it; 422 for the pipeline's own ValueError (e.g. a model switched meanwhile)."""
    waiter = asyncio.wrap_future(job.future)
    try:
        while not (await asyncio.wait({waiter}, timeout=DISCONNECT_POLL_S))[0]:
            if await request.is_disconnected():
                worker.cancel(job)
                raise ClientGone
    except asyncio.CancelledError:
        worker.cancel(job)
        raise
    if waiter.cancelled():
        raise unavailable("the server is shutting down")
    error = waiter.exception()
    if isinstance(error, ValueError):
        raise HTTPException(status_code=422, detail=str(error))
    return waiter.result()


def server_settings(request: Request) -> dict[str, Any]:
    """The A1111 settings POST /options set on this server (SAMPLING_SETTINGS), which requests' override_settings
    override."""
    return request.app.state.settings


async def generate(body: Body, request: Request, worker: Worker,
                   build_task: Callable[..., GenerationTask]) -> GenerationResponse:
    """Run the task `build_task` makes of `body` and answer it in A1111's shape."""
    pipe = loaded_pipeline(worker)
    task = build_task(body, pipe, worker.catalog, server_settings(request), request.app.state.admission)
    outcome = await wait_for(worker.submit_generation(task), worker, request)
    images = [base64.b64encode(png).decode("ascii") for png in outcome.images] if body.send_images else []
    info = generation_info(task, outcome, request_notes(body, task.request), pipe.config.inpainting)
    return GenerationResponse(images=images, parameters=body.echoed(), info=json.dumps(info))


@router.post("/txt2img", response_model=GenerationResponse)
async def txt2img(body: Txt2ImgRequest, request: Request, worker: WorkerDep):
    """Text to image (A1111's txt2img)."""
    return await generate(body, request, worker, txt2img_task)


@router.post("/img2img", response_model=GenerationResponse)
async def img2img(body: Img2ImgRequest, request: Request, worker: WorkerDep):
    """Image to image and inpainting (A1111's img2img): init_images, denoising_strength, mask."""
    return await generate(body, request, worker, img2img_task)


@router.get("/progress", response_model=ProgressResponse)
async def progress(worker: WorkerDep, skip_current_image: bool = Query(False)):
    """The running job's progress, and its latest x0 prediction decoded (unless skip_current_image)."""
    return worker.progress(want_image=not skip_current_image)


@router.post("/interrupt")
async def interrupt(worker: WorkerDep):
    """Stop the running job after its current step; its request is answered with the batches finished."""
    return {"interrupted": worker.interrupt()}


@router.get("/samplers", response_model=list[SamplerItem])
async def samplers():
    """A1111's samplers run its way (options: the schedule type "Automatic" picks), then kedavra's others."""
    items = [SamplerItem(name=spec.a1111, aliases=[spec.comfyui] if spec.comfyui else [],
                         options={"scheduler": spec.schedule} if spec.schedule != "uniform" else {})
             for spec in K_SAMPLERS if spec.a1111]
    listed = {item.name.lower() for item in items}
    for spec in SAMPLERS.values():
        name = spec.a1111 or spec.name
        if name.lower() in listed:  # kedavra's own plan for it stays reachable by kedavra's name (aliases)
            continue
        aliases = list(dict.fromkeys(a for a in (spec.name, spec.comfyui) if a and a != name))
        items.append(SamplerItem(name=name, aliases=aliases,
                                 options={"scheduler": "karras"} if spec.name in AUTOMATIC_KARRAS else {}))
    return items


@router.get("/schedulers", response_model=list[SchedulerItem])
async def schedulers():
    """A1111 1.10's schedule types, with ComfyUI's name where it differs as an alias."""
    items = []
    for name, label in SCHEDULERS.items():
        comfyui = SCHEDULE_TYPES[name].comfyui if name in SCHEDULE_TYPES else ""
        items.append(SchedulerItem(name=name, label=label, aliases=[comfyui] if comfyui and comfyui != name else None,
                                   default_rho=KARRAS_RHO if name == "karras" else -1))
    return items


@router.get("/sd-models", response_model=list[SDModelItem])
async def sd_models(worker: WorkerDep):
    """The model the server runs and the models in --models-dir (hashes once loaded, as A1111)."""
    return [model_item(entry) for entry in await run_in_threadpool(worker.catalog.entries)]


@router.get("/options")
async def get_options(request: Request, worker: WorkerDep):
    settings = server_settings(request)
    return {"sd_model_checkpoint": worker.model.title, "sd_checkpoint_hash": worker.model.sha256,
            "samples_format": "png", "CLIP_stop_at_last_layers": 1, A1111_RNG_SETTING: A1111_DEFAULT_RNG,
            A1111_ENSD_SETTING: 0, **settings}


@router.post("/options")
async def set_options(options: dict[str, Any], request: Request, worker: WorkerDep):
    """sd_model_checkpoint switches to a listed model, named as /sd-models lists it; the sampling settings
    (randn_source, eta_noise_seed_delta, CLIP_stop_at_last_layers) become the server's defaults; other keys are
    ignored and listed as such."""
    ignored = sorted(key for key in options if key != "sd_model_checkpoint" and key not in SAMPLING_SETTINGS)
    sampling = {key: options[key] for key in SAMPLING_SETTINGS if key in options}
    noise_settings(sampling)  # 422 naming the setting before anything changes
    server_settings(request).update(sampling)
    name = options.get("sd_model_checkpoint")
    if name is None:
        return {"applied": sampling, "ignored": ignored}
    if not isinstance(name, str):
        raise field_error("sd_model_checkpoint", "must be a model's listed name (a string)", name)
    try:
        entry = await run_in_threadpool(worker.catalog.find, name)
    except ValueError as error:
        raise field_error("sd_model_checkpoint", str(error), name) from None
    model = await wait_for(worker.submit_model_switch(entry), worker, request)
    return {"applied": {**sampling, "sd_model_checkpoint": model.title}, "ignored": ignored}


@router.get("/loras")
async def loras(worker: WorkerDep):
    """The LoRAs in the server's LoRA folder (--lora-dir), as A1111 lists them: name, alias, path, and the file's
    metadata (kohya's ss_* training settings); what `<lora:NAME:WEIGHT>` in a prompt can name."""
    pipe = loaded_pipeline(worker)

    def listing() -> list[dict[str, Any]]:
        return [{"name": name, "alias": name, "path": str(path), "metadata": file_metadata(path)}
                for name, path in pipe.available_loras().items()]

    try:
        return await run_in_threadpool(listing)
    except ValueError as error:  # two files of one name
        raise HTTPException(status_code=409, detail=str(error)) from None


@router.post("/refresh-loras")
async def refresh_loras(worker: WorkerDep):
    """A1111's rescan of the LoRA folder. kedavra lists the folder afresh on every request and re-reads a file
    whose modification time changed, so this only checks that the folder can be listed."""
    await loras(worker)
    return None


@router.get("/embeddings")
async def embeddings(worker: WorkerDep):
    """The textual-inversion embeddings of the loaded model, in A1111's shape: `loaded` (name -> step,
    sd_checkpoint, sd_checkpoint_name, shape (the vector width; SDXL: the clip_g width), vectors) and `skipped`
    (files in the folder that could not be used, with the reason)."""
    pipe = loaded_pipeline(worker)
    loaded = {name: {"step": e.step, "sd_checkpoint": e.sd_checkpoint, "sd_checkpoint_name": e.sd_checkpoint_name,
                     "shape": list(e.vectors.values())[-1].shape[1], "vectors": e.num_vectors}
              for name, e in pipe.embeddings.items()}
    skipped = {path.stem: {"reason": reason} for path, reason in pipe.embeddings_report.failed.items()}
    return {"loaded": loaded, "skipped": skipped}


@router.get("/scripts")
async def scripts():
    """A1111's script lists: kedavra has no scripts (webuiapi asks at start-up)."""
    return {"txt2img": [], "img2img": []}


def model_item(entry: ModelEntry) -> SDModelItem:
    return SDModelItem(title=entry.title, model_name=entry.model_name, hash=entry.short_hash, sha256=entry.sha256,
                       filename=str(entry.path))
