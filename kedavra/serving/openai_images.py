"""OpenAI's image API, `POST /v1/images/generations`, over the same worker as A1111's txt2img.

The other API image clients speak (the `openai` package's `client.images.generate(...)`, tools built on it):

    request   prompt (required), n (1-8 here; OpenAI allows up to 10), size ("WxH", or "auto": the model's own),
              response_format ("b64_json"; "url" is refused: this server keeps no files to link to), and, accepted
              and not acted on, model (the server runs its loaded model: POST /sdapi/v1/options switches),
              quality, style, user; kedavra's extras: negative_prompt, seed, steps, guidance_scale
    response  {"created": unix seconds, "data": [{"b64_json": PNG, "revised_prompt": the prompt}, ...]}

Sampling is the A1111 API's default (Euler, its Automatic schedule, A1111's GPU noise source); a request is
checked as a txt2img request is (kedavra.serving.tasks), so its errors name the same limits.
"""

from __future__ import annotations

import base64
import time
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from kedavra.serving.errors import field_error
from kedavra.serving.schemas import (
    A1111_DEFAULT_CFG_SCALE,
    MAX_BATCH_SIZE,
    MAX_CFG_SCALE,
    MAX_STEPS,
    RANDOM_SEED,
    Count,
    Number,
    Seed,
    Txt2ImgRequest,
)
from kedavra.serving.tasks import txt2img_task

OPENAI_DEFAULT_STEPS = 20  # kedavra's own default; OpenAI's API has no step count
RESPONSE_FORMATS = ("b64_json",)
AUTO_SIZE = "auto"

router = APIRouter(prefix="/v1")


class ImageGenerationRequest(BaseModel):
    """OpenAI's images.generate body (and kedavra's extras)."""

    model_config = ConfigDict(extra="allow")

    prompt: str = Field(min_length=1, max_length=32000)
    n: Count = Field(1, ge=1, le=MAX_BATCH_SIZE)
    size: str = AUTO_SIZE
    response_format: str = "b64_json"
    model: str | None = None
    quality: str | None = None
    style: str | None = None
    user: str | None = None
    negative_prompt: str = ""
    seed: Seed = RANDOM_SEED
    steps: Count = Field(OPENAI_DEFAULT_STEPS, ge=1, le=MAX_STEPS)
    guidance_scale: Number = Field(A1111_DEFAULT_CFG_SCALE, ge=0, le=MAX_CFG_SCALE, allow_inf_nan=False)


class ImageData(BaseModel):
    b64_json: str
    revised_prompt: str


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]


def parse_size(size: str) -> tuple[int | None, int | None]:
    """OpenAI's "WxH" (or "auto": the model's own size) as (width, height); 422 naming size otherwise."""
    if size.strip().lower() == AUTO_SIZE:
        return None, None
    width, sep, height = size.strip().lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        raise field_error("size", f"size must be 'WIDTHxHEIGHT' (e.g. '512x512') or '{AUTO_SIZE}', got {size!r}",
                          size)
    return int(width), int(height)


def as_txt2img(body: ImageGenerationRequest) -> Txt2ImgRequest:
    """The A1111 txt2img request this OpenAI request stands for (its ranges checked there)."""
    if body.response_format not in RESPONSE_FORMATS:
        raise field_error("response_format", f"response_format must be {' or '.join(RESPONSE_FORMATS)} here ('url' "
                                             "needs stored files, which this server does not keep), got "
                                             f"{body.response_format!r}", body.response_format)
    width, height = parse_size(body.size)
    fields: dict[str, Any] = {"prompt": body.prompt, "negative_prompt": body.negative_prompt, "seed": body.seed,
                              "batch_size": body.n, "steps": body.steps, "cfg_scale": body.guidance_scale,
                              "width": width, "height": height}
    try:
        return Txt2ImgRequest(**fields)
    except ValueError as error:  # pydantic's ValidationError: say which OpenAI field it was
        first = error.errors()[0] if hasattr(error, "errors") else {"loc": ("size",), "msg": str(error)}
        name = {"batch_size": "n", "cfg_scale": "guidance_scale", "width": "size", "height": "size"}.get(
            str(first["loc"][0]), str(first["loc"][0]))
        raise field_error(name, first["msg"], getattr(body, name, None)) from None


@router.post("/images/generations", response_model=ImagesResponse)
async def images_generations(body: ImageGenerationRequest, request: Request):
    """Text to image in OpenAI's shape (module docstring)."""
    from kedavra.serving.routes import loaded_pipeline, server_settings, wait_for  # one worker, one set of helpers

    worker = request.app.state.worker
    txt2img = as_txt2img(body)
    pipe = loaded_pipeline(worker)
    task = txt2img_task(txt2img, pipe, worker.catalog, server_settings(request), request.app.state.admission)
    outcome = await wait_for(worker.submit_generation(task), worker, request)
    return ImagesResponse(created=int(time.time()), data=[
        ImageData(b64_json=base64.b64encode(png).decode("ascii"), revised_prompt=body.prompt)
        for png in outcome.images])
