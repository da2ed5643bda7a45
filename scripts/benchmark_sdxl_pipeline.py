"""SDXL text to image end to end on this CPU: kedavra against diffusers, 20 steps with guidance, time and memory.

    .venv/bin/python scripts/benchmark_sdxl_pipeline.py --sizes 768 --threads 1
    .venv/bin/python scripts/benchmark_sdxl_pipeline.py --sizes 1024 --threads 1
(docs/benchmark.md, section "SDXL", quotes its output.)

The model is the SDXL base architecture (diffusers' StableDiffusionXLPipeline with the released configs:
tests/test_unet_configs.py's SDXL_BASE, both text encoders, the VAE) with seeded random weights, written once as a
bf16 diffusers folder under --workdir, one component at a time (a full SDXL is 14 GB in fp32); its scheduler is
SDXL's EulerDiscreteScheduler (leading spacing). Both sides read that folder and run Euler, classifier-free guidance
5.0 (the U-Net batch of 2), --steps steps, one image, the same prompt, negative prompt and seed. Configurations,
each in its own process, one at a time:

    diffusers-bf16   StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=bf16): channels_last U-Net and
                     VAE, SDPA (AttnProcessor2_0), and the VAE left in bf16 (force_upcast off: diffusers' default
                     upcasts the SDXL VAE to fp32 for fp16's overflow, which bf16 does not have)
    kedavra          kedavra.load(folder): automatic precision (bf16 on a CPU with AMX), channels_last, SDPA, packed
                     oneDNN weights in the U-Net and the VAE (what `kedavra generate` runs)
    kedavra-int8     kedavra.load(folder, dtype="int8"): `kedavra generate --precision int8`, the U-Net's large conv
                     and linear layers as int8 products (kedavra.networks.int8), everything else as kedavra
    diffusers-fp32   (--configs) StableDiffusionXLPipeline in fp32 at its defaults, the check run only (with
                     --fp32-full also the full-length run, 3-4x a bf16 run): the reference whose images the others'
                     images of the same length are held against, with scripts/benchmark_pipeline.py's
                     tolerances (mean abs <= 0.02, PSNR >= 30 dB). 14 GB of weights: the prompts are encoded once
                     (encode_prompt, the pipeline's own call) and the text encoders dropped before sampling, else
                     the 1024 decode runs this machine's 24 GiB out of memory (seen: 19.9 GB resident when killed)

Each process loads the folder, makes a 2-step run at the size (warm-up: oneDNN's kernels, the packed weights), then the
timed run. Reported: load seconds, the U-Net's seconds per call (median over the timed run's calls, forward hooks; wall
and thread CPU), the VAE decode and the two text encoders' seconds, end to end (prompt in, PIL image out), peak resident
memory (VmHWM, loading included), the memory held after the run (VmRSS) and after glibc's malloc_trim(0), and the matmul
peak (bf16 where native, else fp32) measured just before the timed run (benchmark_pipeline.matmul_peak). The timed
images of kedavra's configurations are compared with diffusers-bf16's (max and mean abs difference of the 8-bit images,
PSNR): with random weights and bf16 on both sides they are not expected to match exactly (the per-call U-Net outputs
differ by about 1.5 % of their range, scripts/benchmark_sdxl.py), only to stay close. With diffusers-fp32 in --configs,
every configuration's check image is also held against its check image.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmark_pipeline import (  # noqa: E402
    PEAK_DTYPE,
    PEAK_NAME,
    child_json,
    cpu_model,
    image_difference,
    load_average,
    matmul_peak,
    tests_on_path,
    time_calls,
    vm_kib,
    within_tolerance,
)
from benchmark_sdxl import gib_text, trimmed_rss_gib  # noqa: E402

CONFIGS = ("diffusers-bf16", "kedavra", "kedavra-int8")
REFERENCE = "diffusers-fp32"  # --configs: the images' reference, the check run only unless --fp32-full
PROMPT, NEGATIVE = "a photograph of an astronaut riding a horse", "blurry, low quality"
GUIDANCE = 5.0  # SDXL's usual classifier-free guidance scale
SEED = 42
WEIGHT_SEED = 0
CHECK_STEPS = 2
SUBFOLDERS = {"text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2", "unet": "unet", "vae": "vae"}


# ---- the model folder ------------------------------------------------------------------------------------


class _DrawnOnSave:
    """A meta-device module that write_sdxl_diffusers saves: materialised in bf16, drawn (reference_models.randomize)
    and written when saved, then dropped, so one component at a time is in memory."""

    def __init__(self, module: torch.nn.Module, generator: torch.Generator):
        self.module, self.generator = module, generator

    def save_pretrained(self, path: Path) -> None:
        from reference_models import randomize

        module = self.module.to(torch.bfloat16).to_empty(device="cpu")
        randomize(module, self.generator)
        module.save_pretrained(path)
        self.module = module.to("meta")


def build_folder(folder: Path) -> None:
    """The random-weight SDXL base as a bf16 diffusers folder (StableDiffusionXLPipeline's layout)."""
    tests_on_path()
    from reference_models import sdxl_reference_models, write_sdxl_diffusers

    from kedavra.networks.model import PRESETS

    config = PRESETS["sdxl"]
    generator = torch.Generator().manual_seed(WEIGHT_SEED)
    models = sdxl_reference_models(config, device="meta")
    folder.mkdir(parents=True, exist_ok=True)
    write_sdxl_diffusers(folder, {name: _DrawnOnSave(model, generator) for name, model in models.items()}, config)
    (folder / "complete").write_text("ok")


# ---- one configuration (child process) -------------------------------------------------------------------


def diffusers_pipeline(folder: Path, fp32: bool = False):
    """(modules to time, generate(size, steps) -> PIL image) for diffusers at its best CPU settings (fp32: at its
    defaults in fp32)."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.models.attention_processor import AttnProcessor2_0

    pipe = StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=torch.float32 if fp32 else torch.bfloat16)
    if not fp32:
        for model in (pipe.unet, pipe.vae):
            model.to(memory_format=torch.channels_last)
            model.set_attn_processor(AttnProcessor2_0())
        pipe.vae.register_to_config(force_upcast=False)
    pipe.set_progress_bar_config(disable=True)
    prompts = {"prompt": PROMPT, "negative_prompt": NEGATIVE}
    if fp32:  # 14 GB of weights: encode once and drop the encoders, or the 1024 decode meets this machine's 24 GiB
        from kedavra.pipeline.device import trim_heap

        with torch.no_grad():
            embeds = pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=True,
                                        negative_prompt=NEGATIVE)
        prompts = dict(zip(("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                            "negative_pooled_prompt_embeds"), embeds, strict=True))
        pipe.text_encoder = pipe.text_encoder_2 = None
        trim_heap()

    def generate(size: int, steps: int):
        return pipe(**prompts, num_inference_steps=steps, guidance_scale=GUIDANCE, height=size, width=size,
                    generator=torch.Generator().manual_seed(SEED), output_type="pil").images[0]

    modules = {"unet": pipe.unet, "vae": pipe.vae.decoder, "text": pipe.text_encoder, "text_2": pipe.text_encoder_2}
    return {name: module for name, module in modules.items() if module is not None}, generate


def kedavra_pipeline(folder: Path, int8: bool = False):
    """(modules to time, generate(size, steps) -> PIL image) for kedavra as it loads (int8: `--precision int8`)."""
    import kedavra

    pipe = kedavra.load(folder, dtype="int8" if int8 else None)
    model = pipe.model

    def generate(size: int, steps: int):
        return pipe(PROMPT, NEGATIVE, steps=steps, sampler="euler", guidance_scale=GUIDANCE, seed=SEED, width=size,
                    height=size).images[0]

    return {"unet": model.unet, "vae": model.vae.decoder, "text": model.text_encoder,
            "text_2": model.text_encoder_2}, generate


def run_child(config: str, folder: Path, size: int, steps: int, out: Path, fp32_full: bool = False) -> dict:
    tests_on_path()
    started = time.perf_counter()
    if config.startswith("diffusers"):
        modules, generate = diffusers_pipeline(folder, fp32=config == REFERENCE)
    else:
        modules, generate = kedavra_pipeline(folder, int8=config == "kedavra-int8")
    result = {"config": config, "size": size, "load_s": time.perf_counter() - started,
              "loaded_rss_gib": vm_kib("VmRSS") / 2**20}
    calls = {name: time_calls(module) for name, module in modules.items()}
    images = {}
    full = config != REFERENCE or fp32_full
    for name, n in (("check", CHECK_STEPS),) + ((("timed", steps),) if full else ()):
        if name == "timed":
            result["peak"] = matmul_peak(PEAK_DTYPE)
        for timings in calls.values():
            timings.clear()
        start = time.perf_counter()
        images[name] = np.asarray(generate(size, n).convert("RGB"))
        result[f"{name}_e2e_s"] = time.perf_counter() - start
    np.savez(out, **images)
    if config == REFERENCE:
        result.update(peak_rss_gib=vm_kib("VmHWM") / 2**20)
        return result
    result.update(unet_wall_s=[c[0] for c in calls["unet"]], unet_cpu_s=[c[1] for c in calls["unet"]],
                  vae_s=sum(c[0] for c in calls["vae"]),
                  text_s=sum(c[0] for c in calls["text"] + calls["text_2"]), steps=steps)
    result.update(peak_rss_gib=vm_kib("VmHWM") / 2**20, end_rss_gib=vm_kib("VmRSS") / 2**20,
                  trimmed_rss_gib=trimmed_rss_gib())
    return result


# ---- parent ------------------------------------------------------------------------------------------------


def run_config(config: str, size: int, args) -> tuple[dict, dict[str, np.ndarray]]:
    """One configuration in its own process: its measurements, and its images by run ("check", "timed")."""
    out = args.workdir / f"{config}-{size}.npz"
    command = [sys.executable, __file__, "--child", config, str(size), str(out), "--steps", str(args.steps),
               "--workdir", str(args.workdir), "--threads", str(args.threads)]
    command += ["--fp32-full"] if args.fp32_full else []
    result = child_json(command, f"{config} at {size}")
    with np.load(out) as images:
        return result, dict(images)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[768, 1024], help="image sides in pixels")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps of the timed run (default 20)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads in every configuration (default: torch's default)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS + (REFERENCE,),
                        help="configurations to run, in this order (default: %(default)s)")
    parser.add_argument("--fp32-full", action="store_true",
                        help=f"{REFERENCE} also makes the full-length image, and every configuration's is held against "
                             "it (an SDXL fp32 step takes 3-4x a bf16 one)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "kedavra-benchmark",
                        help="where the random-weight SDXL folder (7 GB) and the images go")
    parser.add_argument("--json", type=Path, help="also write every measurement here")
    parser.add_argument("--child", nargs=3, metavar=("CONFIG", "SIZE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    for name, value, low in (("--steps", args.steps, 1), ("--threads", args.threads, 1)):
        if value < low:
            parser.error(f"{name} must be at least {low}, got {value}")
    torch.set_num_threads(args.threads)
    folder = args.workdir / f"sdxl-random-seed{WEIGHT_SEED}-bf16"
    if args.child:
        config, size, out = args.child
        print(json.dumps(run_child(config, folder, int(size), args.steps, Path(out), args.fp32_full)))
        return 0
    for size in args.sizes:
        if size % 8 or size <= 0:
            parser.error(f"--sizes must be positive multiples of 8 (the VAE's factor), got {size}")
    if not (folder / "complete").exists():
        started = time.perf_counter()
        build_folder(folder)
        print(f"built the random-weight SDXL folder in {time.perf_counter() - started:.0f} s: {folder}", flush=True)
    print(f"CPU: {cpu_model()}; torch {torch.__version__}, {args.threads} thread(s); load average {load_average()}")
    header = ("| size | configuration | U-Net s/step (median; min) | CPU s/step | text encoders s | VAE decode s "
              f"| e2e s ({args.steps} steps) | load s | {PEAK_NAME} peak TFLOP/s | peak RSS GiB | RSS after GiB "
              "| after malloc_trim GiB |")
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    rows, lines, checks = [], [], []
    for size in args.sizes:
        images, measured = {}, {}
        for config in args.configs:
            row, images[config] = run_config(config, size, args)
            measured[config] = row
            rows.append(row)
            if config == REFERENCE:
                runs = f"{CHECK_STEPS}-step check run {row['check_e2e_s']:.1f} s" + (
                    f", {args.steps}-step run {row['timed_e2e_s']:.1f} s" if "timed_e2e_s" in row else ", no timed run")
                print(f"| {size} | {config} | (reference: {runs}) "
                      f"| | | | | {row['load_s']:.1f} | | {row['peak_rss_gib']:.2f} | | |", flush=True)
                continue
            print(f"| {size} | {config} | {np.median(row['unet_wall_s']):.2f} ({min(row['unet_wall_s']):.2f}) "
                  f"| {np.median(row['unet_cpu_s']):.2f} | {row['text_s']:.2f} | {row['vae_s']:.1f} "
                  f"| {row['timed_e2e_s']:.1f} | {row['load_s']:.1f} | {row['peak'] / 1e12:.2f} "
                  f"| {row['peak_rss_gib']:.2f} | {row['end_rss_gib']:.2f} | {gib_text(row['trimmed_rss_gib'])} |",
                  flush=True)
        if "diffusers-bf16" in measured:
            theirs = measured["diffusers-bf16"]
            for name in (c for c in args.configs if c.startswith("kedavra")):
                ours = measured[name]
                diff = image_difference(images[name]["timed"], images["diffusers-bf16"]["timed"])
                lines.append(
                    f"| {size} | {name} | {np.median(theirs['unet_wall_s']) / np.median(ours['unet_wall_s']):.2f}x "
                    f"| {np.median(theirs['unet_cpu_s']) / np.median(ours['unet_cpu_s']):.2f}x "
                    f"| {theirs['timed_e2e_s'] / ours['timed_e2e_s']:.2f}x "
                    f"| {ours['peak_rss_gib'] / theirs['peak_rss_gib']:.2f} "
                    f"| {diff['max_abs']:.4f} | {diff['mean_abs']:.4f} | {diff['psnr_db']:.1f} |")
                ours["image_difference"] = diff
        if REFERENCE in measured:
            for run in (r for r in ("check", "timed") if r in images[REFERENCE]):
                for name in (c for c in args.configs if c != REFERENCE):
                    diff = image_difference(images[name][run], images[REFERENCE][run])
                    measured[name][f"{run}_difference_fp32"] = diff
                    checks.append(f"| {size} | {name} | {CHECK_STEPS if run == 'check' else args.steps} "
                                  f"| {diff['max_abs']:.4f} | {diff['mean_abs']:.4f} | {diff['psnr_db']:.1f} "
                                  f"| {'yes' if within_tolerance(name, diff) else 'NO'} |")
    if lines:
        print("\n| size | kedavra | U-Net per step, diffusers-bf16 / kedavra (wall) | (CPU) | end to end "
              "| peak RSS, kedavra / diffusers | image max abs | mean abs | PSNR dB |\n" + "|---" * 9 + "|")
        print("\n".join(lines))
    if checks:
        print(f"\nImages against {REFERENCE}'s of the same number of steps (8-bit images in [0, 1] units), with "
              "scripts/benchmark_pipeline.py's tolerances:\n"
              "| size | configuration | steps | max abs | mean abs | PSNR dB | within tolerance |\n" + "|---" * 7 + "|")
        print("\n".join(checks))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
