"""Peak resident memory of kedavra.checkpoint.load_model on a full-size random-weight checkpoint.

    .venv/bin/python scripts/measure_load_memory.py                    # SD 1.5, the table in docs/checkpoints.md
    .venv/bin/python scripts/measure_load_memory.py --dtypes float16 --json
    .venv/bin/python scripts/measure_load_memory.py --family sdxl      # SDXL base: fp16 file, bf16 model

Writes an original single-file checkpoint (the CompVis layout of v1-5-pruned-emaonly.safetensors, random
weights; for SDXL Stability's SGM layout of sd_xl_base_1.0.safetensors, 6.9 GB in fp16) per file dtype into a
temporary folder, one tensor at a time, and deletes it at the end. Then, for each case, a fresh Python
process imports torch and kedavra, reads its resident set (VmRSS), calls load_model, reads every weight once
(so weights that alias the mapped file are resident too), and reports its peak resident set (VmHWM) minus the
baseline, divided by the bytes of the loaded weights. "no release" repeats a case with madvise(MADV_DONTNEED)
turned off, to show what dropping the consumed file pages buys. SD 1.x / 2.x files are loaded into fp32 (and
an fp16 file into fp16 too); SDXL ones into bf16 only, the issue's case (target: peak at most 1.1x the weights).
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # tests/sd_keys.py: the original layout, checked against diffusers

import sd_keys  # noqa: E402

from kedavra.checkpoint import write_safetensors  # noqa: E402
from kedavra.networks.model import PRESETS, StableDiffusion  # noqa: E402

DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}
FILE_DTYPES = ("float16", "float32")
SDXL_TARGET_RATIO = 1.1  # peak - baseline over the bf16 weights' bytes
INIT_STD = 0.02  # scale of the random weights; their values do not matter here
SGM_CLIP_PREFIX = "conditioner.embedders.0.transformer."  # sd_xl_base.yaml: FrozenCLIPEmbedder (ViT-L)
SGM_OPENCLIP_PREFIXES = ("conditioner.embedders.1.model.",  # base: FrozenOpenCLIPEmbedder2 (bigG)
                         "conditioner.embedders.0.model.")  # refiner: bigG alone


def is_sdxl(config) -> bool:
    return config.unet.has_added_embedding


def sgm_state_dict(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """kedavra's SDXL state dict -> Stability's SGM single file (sd_xl_base.yaml / sd_xl_refiner.yaml): U-Net and VAE
    as the original layout has them, ViT-L in transformers' names, bigG in OpenCLIP's with its text_projection (D, P).
    tests/test_sdxl_checkpoint.py checks the same layout (reference_models.sgm_state_dict) against transformers."""
    out: dict[str, torch.Tensor] = {}
    modules = sd_keys.unet_modules(config.unet)
    texts: dict[str, dict[str, torch.Tensor]] = {"text_encoder": {}, "text_encoder_2": {}}
    for key, tensor in state.items():
        component, _, rest = key.partition(".")
        if component == "unet":
            out[sd_keys.UNET_PREFIX + sd_keys.unet_key(rest, modules)] = tensor
        elif component == "vae":
            name, is_conv = sd_keys.vae_key(rest, config.vae)
            out[sd_keys.VAE_PREFIX + name] = tensor[:, :, None, None] if is_conv else tensor  # (C, C) -> (C, C, 1, 1)
        else:
            texts[component][rest] = tensor
    bigg = texts["text_encoder_2"] if config.text_encoder_2 is not None else texts.pop("text_encoder")
    if config.text_encoder_2 is not None:
        out.update({SGM_CLIP_PREFIX + sd_keys.clip_key(k): v for k, v in texts["text_encoder"].items()})
    text = config.text_encoder_2 or config.text_encoder
    openclip = sd_keys.openclip_state(bigg, text.num_layers, text.width)
    # bigG: SDXL uses all of its resblocks (openclip_state adds SD 2.x's unused one) and has a real projection
    openclip = {k: v for k, v in openclip.items() if not k.startswith(f"transformer.resblocks.{text.num_layers}.")}
    openclip["text_projection"] = bigg["text_projection.weight"].t()  # (P, D) Linear -> OpenCLIP's (D, P)
    prefix = SGM_OPENCLIP_PREFIXES[0 if config.text_encoder_2 is not None else 1]
    out.update({prefix + k: v for k, v in openclip.items()})
    return out


def write_checkpoint(path: Path, family: str, dtype: torch.dtype) -> None:
    """A random-weight original single file for `family`, generated and written tensor by tensor."""
    config = PRESETS[family]
    with torch.device("meta"):
        model = StableDiffusion(config)
    if is_sdxl(config):
        layout = sgm_state_dict(model.state_dict(), config)
    else:
        layout = sd_keys.original_state_dict(model.state_dict(), config)
    layout = {
        name: torch.empty(t.shape, dtype=dtype if t.is_floating_point() else t.dtype, device="meta")
        for name, t in layout.items()
    }
    buffers = sd_keys.schedule_buffers(config)
    generator = torch.Generator().manual_seed(0)

    def fill(name: str, like: torch.Tensor) -> torch.Tensor:
        if name in buffers:
            return buffers[name].to(like.dtype)
        if not like.dtype.is_floating_point:
            return torch.arange(like.numel(), dtype=like.dtype).reshape(like.shape)
        return (torch.randn(like.shape, generator=generator) * INIT_STD).to(like.dtype)

    write_safetensors(path, layout, fill=fill)


def status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS: resident now, VmHWM: peak resident)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(path: str, dtype: str, release: bool) -> None:
    """Runs in a fresh process: load, touch every weight, print one JSON line."""
    import kedavra.checkpoint as checkpoint
    import kedavra.checkpoint.safetensors_io as safetensors_io

    if not release:
        safetensors_io._CAN_RELEASE = False  # ablation: keep the consumed file pages mapped
    baseline = status_kib("VmRSS")
    start = time.perf_counter()
    model = checkpoint.load_model(path, dtype=DTYPES[dtype])
    seconds = time.perf_counter() - start
    after_load = status_kib("VmHWM")
    with torch.no_grad():
        for p in model.parameters():
            p.sum()  # reads every byte: weights that alias the mapped file become resident
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    peak = status_kib("VmHWM")
    print(
        json.dumps(
            {
                "baseline_kib": baseline,
                "peak_load_kib": after_load,
                "peak_kib": peak,
                "weights_bytes": weights,
                "seconds": seconds,
                "family": model.config.family,
            }
        )
    )


def measure(path: Path, dtype: str, release: bool) -> dict:
    command = [sys.executable, __file__, "--child", str(path), "--model-dtype", dtype]
    if not release:
        command.append("--no-release")
    result = subprocess.run(command, capture_output=True, text=True, check=True, cwd=REPO)
    row = json.loads(result.stdout.splitlines()[-1])
    row["extra_bytes"] = (row["peak_kib"] - row["baseline_kib"]) * 1024
    row["ratio"] = row["extra_bytes"] / row["weights_bytes"]
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="sd15", choices=sorted(PRESETS), help="model family (default sd15)")
    parser.add_argument("--dtypes", nargs="+", choices=FILE_DTYPES,
                        help="file dtypes (default: float16 and float32; SDXL: float16)")
    parser.add_argument("--dir", type=Path, help="where to write the checkpoints (default: a temporary folder)")
    parser.add_argument("--json", action="store_true", help="print the rows as one JSON line at the end")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model-dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--no-release", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.model_dtype, not args.no_release)
        return 0
    sdxl = is_sdxl(PRESETS[args.family])
    file_dtypes = args.dtypes or (["float16"] if sdxl else ["float16", "float32"])
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        cases = []
        for file_dtype in file_dtypes:
            path = Path(folder) / f"{args.family}-{file_dtype}.safetensors"
            write_checkpoint(path, args.family, DTYPES[file_dtype])
            if sdxl:  # the case: SDXL's fp16 release file into a bf16 model
                cases.append((path, file_dtype, "bfloat16", True))
                continue
            cases.append((path, file_dtype, "float32", True))
            if file_dtype == "float16":
                cases += [(path, file_dtype, "float32", False), (path, file_dtype, "float16", True)]
        rows = []
        print(f"{args.family}: peak RSS of load_model in a fresh process, minus its RSS after import", file=sys.stderr)
        if sdxl:
            print(f"target (the SDXL issue): ratio at most {SDXL_TARGET_RATIO}", file=sys.stderr)
        print("| file | model | release | file GB | weights GB | peak - baseline GB | ratio | load s |")
        print("|---|---|---|---|---|---|---|---|")
        for path, file_dtype, model_dtype, release in cases:
            row = measure(path, model_dtype, release)
            if row["family"] != args.family:
                raise RuntimeError(f"{path} loaded as family {row['family']}, not {args.family}")
            row.update(file=file_dtype, model=model_dtype, release=release, file_bytes=path.stat().st_size)
            rows.append(row)
            print(
                f"| {file_dtype} | {model_dtype} | {'madvise' if release else 'no release'} "
                f"| {row['file_bytes'] / 1e9:.2f} | {row['weights_bytes'] / 1e9:.2f} | {row['extra_bytes'] / 1e9:.2f} "
                f"| {row['ratio']:.2f} | {row['seconds']:.1f} |",
                flush=True,
            )
    if args.json:
        print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
