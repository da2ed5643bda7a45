"""Checkpoints: load the Stable Diffusion weights people have into kedavra's models; save kedavra's own.

    from kedavra.checkpoint import load_model, save_model
    model = load_model("v1-5-pruned-emaonly.safetensors")   # a kedavra.networks.model.StableDiffusion
    print(model.describe())                                  # what was read and what was detected
    save_model(model, "mine.safetensors")                    # kedavra's format: weights + ModelConfig JSON

Formats, told apart by content, never by file name:
  original single file  the CompVis / Stability state dict (`model.diffusion_model.*`, `first_stage_model.*`,
                        `cond_stage_model.*`; SDXL's SGM `conditioner.embedders.*`) in a .safetensors, or in a
                        torch .ckpt/.pt (zip or legacy pickle)
  diffusers folder      model_index.json, unet/, vae/, text_encoder/ (SDXL: and text_encoder_2/; the refiner:
                        text_encoder_2/ alone) (.safetensors or .bin, sharded or not), scheduler/scheduler_config.json;
                        tokenizer/ (tokenizer_2/) give the pad token and are checked (kedavra vendors CLIP's BPE)
  kedavra               one .safetensors, kedavra's parameter names, the ModelConfig JSON in the header metadata

Family detection (docs/checkpoints.md has the table): the text encoder's layout (OpenAI CLIP
`cond_stage_model.transformer.*` for SD 1.x, OpenCLIP `cond_stage_model.model.*` for SD 2.x), the U-Net's
cross-attention width (attn2.to_k weight: (C, 768) or (C, 1024)), its first conv's input channels (9: inpainting)
and whether its transformer projections are Linear (SD 2.x) pick the preset; SDXL adds a second text encoder
(`conditioner.embedders.1.model.*`) and the U-Net's added embedding (`label_emb.0.0.weight`: 6 micro-conditioning
values for the base, 5 for the refiner, whose bigG sits alone at `conditioner.embedders.0.model.*`). ε or v cannot
be read off the weights; in order of trust: the `prediction_type` argument, the diffusers scheduler config, the
file's metadata (`modelspec.prediction_type`, kohya's `ss_v_parameterization`), and, only where the candidate
families disagree (SD 2.x 768-v and 512-base share one architecture), a probe of the U-Net (`probe_prediction_type`).

Memory: the model is built on the meta device and receives the file's tensors with load_state_dict(assign=True).
A .safetensors file is memory-mapped copy-on-write: where the file's dtype is the model's, parameters alias the
file's pages (no copy at all); where it is not, tensors are converted one at a time and the consumed pages are
dropped with madvise(MADV_DONTNEED), so fp16 file -> fp32 model peaks near the fp32 size. torch files are read
with torch.load(mmap=True); their mapped pages cannot be dropped early (up to 1.5x for a dtype conversion).

Security: a .ckpt is a pickle, which can name any Python callable for the loader to run. kedavra reads it only
with torch's restricted unpickler (weights_only=True), which refuses every global outside tensors and plain
containers; a few Lightning / numpy training-bookkeeping classes that real SD 1.x .ckpt files carry are mapped to
an inert stand-in that keeps nothing. A file naming anything else is refused with UnsafeCheckpointError, before
anything from it runs. The same unpickler reads the tensors of TorchScript archives (the FID Inception's weights):
their `__torch__.*` classes become an inert ScriptObject that holds attributes, and no TorchScript code runs.

Modules, in the order the data flows through them:
  errors          CheckpointError, UnsafeCheckpointError and the helper that words their messages
  safetensors_io  SafetensorsFile (the copy-on-write map, release of consumed pages) and write_safetensors
  torch_pickle    torch .ckpt/.pt/.bin files through the restricted unpickler; DISCARDED_GLOBALS; the tensors of
                  TorchScript archives through the same unpickler (read_script_archive: the FID Inception's)
  weights         one weights file of any container, told apart by its leading bytes (LFS pointers, images, ...)
  foreign         files that are no SD model (SD3, Flux, Stable Cascade, DiT-style, LoRAs, embeddings), by their keys
  sources         the three source kinds (original single file, kedavra file, diffusers folder) and their hints
  detect          the family and settings a source decides; probe_prediction_type for ε or v
  load            load_model and save_model: meta-device build, conversion, materialisation
"""

from kedavra.checkpoint.detect import PROBE_SIZE, PROBE_THRESHOLD, probe_prediction_type
from kedavra.checkpoint.errors import CheckpointError, UnsafeCheckpointError
from kedavra.checkpoint.foreign import FOREIGN_KEYS
from kedavra.checkpoint.load import load_model, save_model
from kedavra.checkpoint.safetensors_io import (
    SAFETENSORS_DTYPES,
    SAFETENSORS_MAX_HEADER,
    SafetensorsFile,
    write_safetensors,
)
from kedavra.checkpoint.sources import (
    COMPONENTS,
    CONFIG_KEY,
    EMA_PREFIX,
    FORMAT_KEY,
    FORMAT_VERSION,
    ORIGINAL_PREFIXES,
    ORIGINAL_SCHEDULE_BUFFERS,
)
from kedavra.checkpoint.torch_pickle import DISCARDED_GLOBALS

__all__ = [
    "COMPONENTS",
    "CONFIG_KEY",
    "DISCARDED_GLOBALS",
    "EMA_PREFIX",
    "FOREIGN_KEYS",
    "FORMAT_KEY",
    "FORMAT_VERSION",
    "ORIGINAL_PREFIXES",
    "ORIGINAL_SCHEDULE_BUFFERS",
    "PROBE_SIZE",
    "PROBE_THRESHOLD",
    "SAFETENSORS_DTYPES",
    "SAFETENSORS_MAX_HEADER",
    "CheckpointError",
    "SafetensorsFile",
    "UnsafeCheckpointError",
    "load_model",
    "probe_prediction_type",
    "save_model",
    "write_safetensors",
]
