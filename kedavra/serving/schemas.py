"""The HTTP API's request and response bodies, in AUTOMATIC1111's shapes (its modules/api/models.py).

Requests carry A1111's field names and defaults so that its clients (the `webuiapi` package, scripts written
for A1111) work unchanged. Ranges are checked here, where the request enters, and a bad field is answered 422
naming it (FastAPI turns a pydantic error into {"detail": [{"loc": ["body", "steps"], "msg": ...}]}); what
depends on the loaded model (width a multiple of its VAE factor) is checked against it by kedavra.serving.tasks.

Fields A1111 has and kedavra does not act on are accepted so that its clients' requests parse, and named in
the response's notes when they are set to something that would change the image (`ignored_settings()`).
Unknown fields are kept and echoed back in "parameters", as A1111 echoes its whole request.
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Annotated, Any

from PIL import Image, ImageOps
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from kedavra.diffusion.sigmas import AUTOMATIC, SCHEDULE_TYPES
from kedavra.pipeline.hires import DEFAULT_HIRES_SCALE
from kedavra.pipeline.inpainting import MASKED_CONTENT, MAX_MASK_BLUR, MAX_PADDING, InpaintOptions
from kedavra.pipeline.request import DEFAULT_REFINER_SWITCH_AT, MAX_SIDE
from kedavra.validation import MAX_SEED

MAX_STEPS = 150  # A1111's "Sampling steps" slider maximum (modules/ui.py)
MAX_BATCH_SIZE = 8  # A1111's "Batch size" slider maximum
MAX_N_ITER = 100  # A1111's "Batch count" slider maximum
MAX_CFG_SCALE = 30.0  # A1111's "CFG Scale" slider maximum
RANDOM_SEED = -1  # A1111: seed -1 asks for a random one
A1111_DEFAULT_SAMPLER = "Euler"  # A1111's API default (`sampler_index: str = "Euler"` in modules/api/models.py)
A1111_DEFAULT_STEPS = 50  # A1111's StableDiffusionProcessing default
A1111_DEFAULT_CFG_SCALE = 7.0  # A1111's StableDiffusionProcessing default
A1111_DEFAULT_IMG2IMG_STRENGTH = 0.75  # A1111's StableDiffusionProcessingImg2Img default denoising_strength
A1111_DEFAULT_HIRES_STRENGTH = 0.75  # A1111's StableDiffusionProcessingTxt2Img default denoising_strength
# What A1111's UI sends for "no other" in the hires fields (its API maps None and these to the first pass's)
USE_SAME_SAMPLER, USE_SAME_SCHEDULER, USE_SAME_CHECKPOINT = "Use same sampler", "Use same scheduler", \
    "Use same checkpoint"
# An uploaded image is refused above this many pixels before Pillow decodes it (a small PNG can claim a huge
# canvas): four times the largest generation size on a side.
MAX_INPUT_PIXELS = (4 * MAX_SIDE) ** 2
# Schedule types as A1111 1.10's /sdapi/v1/schedulers lists them, name -> label: "automatic" (the sampler's own:
# Karras for DPM++ 2M, Exponential for DPM++ 2M SDE, ...), then its 11 σ spacings (kedavra.diffusion.sigmas).
SCHEDULERS = {AUTOMATIC: "Automatic"} | {name: s.a1111 for name, s in SCHEDULE_TYPES.items() if s.a1111}
# A1111 settings a request's override_settings (or POST /options) may set, and what each becomes here.
A1111_RNG_SETTING = "randn_source"  # "Random number generator source": CPU, GPU (A1111's default) or NV
A1111_ENSD_SETTING = "eta_noise_seed_delta"  # "Eta noise seed delta"
A1111_CLIP_SKIP_SETTING = "CLIP_stop_at_last_layers"  # "Clip skip"
CHURN_SETTINGS = ("s_churn", "s_tmin", "s_tmax", "s_noise")  # A1111's "Sigma churn", ... (0 for s_tmax: no bound)
ETA_SETTINGS = ("eta_ddim", "eta_ancestral")  # A1111's defaults for a request without eta: DDIM's, the others'
SAMPLING_SETTINGS = (A1111_RNG_SETTING, A1111_ENSD_SETTING, A1111_CLIP_SKIP_SETTING, *CHURN_SETTINGS, *ETA_SETTINGS)
DATA_URL_PREFIX = "data:"  # "data:image/png;base64,...." as browsers and webuiapi send images
BASE64_MARKER = ";base64"


def decode_image(text: str) -> Image.Image:
    """A base64 image (bare, or a data: URL) -> a decoded, upright PIL image; ValueError saying what is wrong."""
    if text.startswith(DATA_URL_PREFIX):
        header, comma, text = text.partition(",")
        if not comma or not header.endswith(BASE64_MARKER):
            raise ValueError("a data: URL must be 'data:<type>;base64,<data>'")
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except binascii.Error as error:
        raise ValueError(f"not base64: {error}") from None
    try:
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > MAX_INPUT_PIXELS:
            raise ValueError(f"the image is {image.width}x{image.height}; at most {MAX_INPUT_PIXELS} pixels are "
                             "accepted")
        image.load()
    except (OSError, SyntaxError, Image.DecompressionBombError) as error:  # Pillow: SyntaxError on bad headers
        reason = type(error).__name__ if isinstance(error, OSError) else error  # OSError's text names a buffer
        raise ValueError(f"not an image Pillow can read ({len(data)} bytes starting {data[:8]!r}): {reason}") from None
    return ImageOps.exif_transpose(image)


def _check_image(text: str) -> str:
    decode_image(text)
    return text


Base64Image = Annotated[str, AfterValidator(_check_image)]


def _not_a_bool(value: Any) -> Any:
    """JSON true / false where a number belongs is refused (pydantic's lax mode would read them as 1 / 0)."""
    if isinstance(value, bool):
        raise ValueError(f"must be a number, not {str(value).lower()}")
    return value


NotBool = BeforeValidator(_not_a_bool)
Seed = Annotated[int, NotBool, Field(ge=RANDOM_SEED, le=MAX_SEED, description="-1 for a random seed")]
Side = Annotated[int | None, NotBool, Field(ge=1, le=MAX_SIDE, description="pixels; default the model's image size")]
Count = Annotated[int, NotBool]
Number = Annotated[float, NotBool]
OptionalNumber = Annotated[float | None, NotBool]


class GenerationBody(BaseModel):
    """What txt2img and img2img share (A1111's StableDiffusionProcessing fields)."""

    model_config = ConfigDict(extra="allow")

    prompt: str = ""
    negative_prompt: str = ""
    seed: Seed = RANDOM_SEED
    sampler_name: str | None = Field(None, description="A1111, kedavra, ComfyUI or diffusers name")
    sampler_index: str = Field(A1111_DEFAULT_SAMPLER, description="A1111's older name for sampler_name")
    scheduler: str | None = Field(None, description=f"schedule type: {', '.join(SCHEDULERS.values())} (or "
                                                     "ComfyUI's names)")
    batch_size: Count = Field(1, ge=1, le=MAX_BATCH_SIZE)
    n_iter: Count = Field(1, ge=1, le=MAX_N_ITER, description="batches run one after another")
    steps: Count = Field(A1111_DEFAULT_STEPS, ge=1, le=MAX_STEPS)
    cfg_scale: Number = Field(A1111_DEFAULT_CFG_SCALE, ge=0, le=MAX_CFG_SCALE, allow_inf_nan=False)
    width: Side = None
    height: Side = None
    eta: OptionalNumber = Field(None, ge=0, le=1, allow_inf_nan=False, description="DDIM's η (DDIM only)")
    refiner_checkpoint: str | None = Field(None, description="a listed model that takes over the sampling run "
                                                             "(the SDXL refiner), by its /sd-models name")
    refiner_switch_at: Number = Field(DEFAULT_REFINER_SWITCH_AT, ge=0, le=1, allow_inf_nan=False,
                                     description="share of the training timesteps before the refiner takes over")
    send_images: bool = True
    subseed: Seed = Field(RANDOM_SEED, description="the variation seed (-1 for a random one)")
    subseed_strength: Number = Field(0.0, ge=0, le=1, allow_inf_nan=False,
                                    description="how far towards the variation seed's noise")
    s_churn: OptionalNumber = Field(None, ge=0, allow_inf_nan=False, description="Karras et al. 2022's churn "
                                   "(Euler, Heun, DPM2); default the server's setting, 0")
    s_tmin: OptionalNumber = Field(None, ge=0, allow_inf_nan=False)
    s_tmax: OptionalNumber = Field(None, ge=0, description="0: no bound")
    s_noise: OptionalNumber = Field(None, ge=0, allow_inf_nan=False)
    override_settings: dict[str, Any] | None = Field(
        None, description=f"A1111 settings for this request: {', '.join(SAMPLING_SETTINGS)} act, others are ignored")
    # Accepted for A1111's clients; kedavra does not act on them (named in the notes when set).
    styles: list[str] = []
    restore_faces: bool | None = None
    tiling: bool | None = None
    seed_resize_from_w: int = -1
    seed_resize_from_h: int = -1
    save_images: bool = False
    script_name: str | None = None
    alwayson_scripts: dict[str, Any] = {}

    @property
    def sampler(self) -> str:
        """A1111's rule: sampler_name, else sampler_index."""
        return self.sampler_name or self.sampler_index

    def echoed(self) -> dict[str, Any]:
        """The request as the response's "parameters" echo it (A1111 echoes its whole request)."""
        return self.model_dump()

    def ignored_settings(self) -> list[str]:
        """Notes for the A1111 settings in this request that kedavra accepts but does not carry out."""
        notes = [f"{name} is not supported and was ignored" for name, value in self._unsupported().items() if value]
        ignored = sorted(set(self.override_settings or {}) - set(SAMPLING_SETTINGS))
        # A1111 1.10 has no such setting either; some are its request fields (mask_round, resize_mode, ...)
        fields = {key: f" ({key} is a request field: send it beside override_settings)"
                  for key in ignored if key in type(self).model_fields}
        return notes + [f"override_settings.{key} is not supported and was ignored{fields.get(key, '')}"
                        for key in ignored]

    def _unsupported(self) -> dict[str, Any]:
        """The settings kedavra does not act on, by the name a note gives them: their values (falsy: unset)."""
        return {
            "restore_faces": self.restore_faces,
            "tiling": self.tiling,
            "styles": self.styles,
            "seed_resize_from_w/h": self.seed_resize_from_w > 0 or self.seed_resize_from_h > 0,
            "save_images (images are never written on the server)": self.save_images,
            "script_name": self.script_name,
            "alwayson_scripts": self.alwayson_scripts,
        }


class Txt2ImgRequest(GenerationBody):
    """POST /sdapi/v1/txt2img (A1111's StableDiffusionTxt2ImgProcessingAPI), with its hires fix fields
    (kedavra.pipeline.hires; its defaults are A1111's API's: denoising_strength 0.75, upscaler "Latent")."""

    enable_hr: bool = False
    denoising_strength: Number = Field(A1111_DEFAULT_HIRES_STRENGTH, ge=0, le=1, allow_inf_nan=False,
                                       description="hires fix: how much of the upscaled image is repainted")
    firstphase_width: Count = Field(0, ge=0, le=MAX_SIDE, description="A1111's older hires fields: the first pass's "
                                                                       "size, width/height then the final size")
    firstphase_height: Count = Field(0, ge=0, le=MAX_SIDE)
    hr_scale: Number = Field(DEFAULT_HIRES_SCALE, gt=0, allow_inf_nan=False)
    hr_upscaler: str | None = Field(None, description="a latent mode (Latent, Latent (nearest), ...) or an upscaler "
                                                      "of /sdapi/v1/upscalers; default Latent")
    hr_second_pass_steps: Count = Field(0, ge=0, le=MAX_STEPS, description="0: the first pass's steps")
    hr_resize_x: Count = Field(0, ge=0, le=MAX_SIDE)
    hr_resize_y: Count = Field(0, ge=0, le=MAX_SIDE)
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = Field(None, description="the second pass's sampler (default: the first's)")
    hr_scheduler: str | None = Field(None, description="the second pass's schedule type (default: the first's)")
    hr_prompt: str = ""
    hr_negative_prompt: str = ""

    def _unsupported(self) -> dict[str, Any]:
        same = (None, "", USE_SAME_CHECKPOINT)
        return {**super()._unsupported(),
                "hr_checkpoint_name (the hires pass runs on the loaded model)": self.hr_checkpoint_name not in same}


class Img2ImgRequest(GenerationBody):
    """POST /sdapi/v1/img2img (A1111's StableDiffusionImg2ImgProcessingAPI)."""

    init_images: list[Base64Image] = Field(min_length=1, max_length=MAX_BATCH_SIZE,
                                           description="base64 images (or data: URLs): one, or one per batch image")
    denoising_strength: Number = Field(A1111_DEFAULT_IMG2IMG_STRENGTH, ge=0, le=1, allow_inf_nan=False)
    mask: Base64Image | None = Field(None, description="inpainting: white where to paint (or an RGBA image's "
                                                       "transparent part)")
    inpainting_mask_invert: Count = Field(0, ge=0, le=1, description="1: paint where the mask is black")
    resize_mode: Count = Field(0, ge=0, le=3, description="0 just resize, 1 crop and resize, 2 resize and fill, "
                                                          "3 just resize (latent upscale)")
    include_init_images: bool = False
    mask_blur: Count | None = Field(None, ge=0, le=MAX_MASK_BLUR, description="sets mask_blur_x and mask_blur_y")
    mask_blur_x: Count = Field(4, ge=0, le=MAX_MASK_BLUR)
    mask_blur_y: Count = Field(4, ge=0, le=MAX_MASK_BLUR)
    mask_round: bool = Field(True, description="false: blend on the soft (blurred) latent mask, not rounded")
    inpainting_fill: Count = Field(0, ge=0, le=3, description="0 fill, 1 original, 2 latent noise, 3 latent nothing")
    inpaint_full_res: bool = Field(True, description="inpaint area 'only masked'")
    inpaint_full_res_padding: Count = Field(0, ge=0, le=MAX_PADDING)

    def inpaint_options(self) -> InpaintOptions:
        """A1111's inpainting settings of this request (its mask_blur, when set, over mask_blur_x / _y)."""
        blur_x, blur_y = (self.mask_blur, self.mask_blur) if self.mask_blur is not None else (self.mask_blur_x,
                                                                                              self.mask_blur_y)
        return InpaintOptions(mask_blur_x=blur_x, mask_blur_y=blur_y, only_masked=self.inpaint_full_res,
                              padding=self.inpaint_full_res_padding,
                              masked_content=MASKED_CONTENT[self.inpainting_fill],
                              invert=bool(self.inpainting_mask_invert), resize_mode=self.resize_mode,
                              mask_round=self.mask_round)

    def echoed(self) -> dict[str, Any]:
        """As A1111: init_images and mask are not sent back unless include_init_images asks for them."""
        parameters = self.model_dump()
        if not self.include_init_images:
            parameters["init_images"] = parameters["mask"] = None
        return parameters


# ---- responses ----------------------------------------------------------------------------------------------------


class GenerationResponse(BaseModel):
    """A1111's TextToImageResponse / ImageToImageResponse: base64 PNGs, the request echoed, info as a JSON string."""

    images: list[str]
    parameters: dict[str, Any]
    info: str


class ProgressState(BaseModel):
    """A1111's shared.state.dict(), plus `queued`: requests waiting behind the running one."""

    skipped: bool = False
    interrupted: bool = False
    job: str = ""
    job_count: int = 0
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0
    queued: int = 0


class ProgressResponse(BaseModel):
    """GET /sdapi/v1/progress."""

    progress: float
    eta_relative: float
    state: ProgressState
    current_image: str | None = None
    textinfo: str | None = None


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, str]


class SchedulerItem(BaseModel):
    name: str
    label: str
    aliases: list[str] | None = None
    default_rho: float = -1
    need_inner_model: bool = False


class SDModelItem(BaseModel):
    title: str
    model_name: str
    hash: str | None
    sha256: str | None
    filename: str
    config: str | None = None
