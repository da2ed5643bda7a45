"""Text to image, kedavra against diffusers on this CPU: speed, memory and how far the images move.

    .venv/bin/python scripts/benchmark_pipeline.py                       # both sizes, every configuration
    .venv/bin/python scripts/benchmark_pipeline.py --sizes 512 --configs diffusers-bf16 kedavra --rounds 3
    .venv/bin/python scripts/benchmark_pipeline.py --fp32-steps 4        # quicker: extrapolate the fp32 baseline
(docs/benchmark.md gives the commands behind its tables.)

Both sides get the same SD 1.5-shaped model with the same random weights: tests/reference_models.py's
`reference_models` (every parameter drawn under a seed) saved as a diffusers folder (built once, then reused
from --workdir), which diffusers loads with from_pretrained and kedavra with kedavra.load. Both sample with
Euler on SD's "leading" timesteps (steps_offset 1), classifier-free guidance 7.5 with the two halves in one
U-Net batch, one image, the same prompt, negative prompt and seed. Configurations, each in its own process:

    diffusers-fp32   diffusers at its defaults (fp32, contiguous layout, SDPA attention)
    diffusers-bf16   diffusers at its best CPU settings: bf16 weights, channels_last U-Net and VAE, SDPA
                     (AttnProcessor2_0) attention
    kedavra          kedavra.load(folder) as it is: automatic precision (bf16 on a CPU with AMX), channels_last,
                     packed oneDNN weights in the U-Net and the VAE (kedavra.networks.acceleration)
    kedavra-eager    the same without packed weights: kedavra.load(folder, optimize=False)
    kedavra-int8     kedavra.load(folder, dtype="int8"): kedavra --precision int8, the U-Net's large conv and
                     linear layers as int8 products (kedavra.networks.int8), everything else as kedavra
    kedavra-fp32     kedavra.load(folder, dtype="fp32"): only the short check run, to show parity with
                     diffusers-fp32 at full size (the differences of the bf16 runs are then precision)

Each process runs a short generation first (--check-steps, 2 by default; it also warms oneDNN's kernels and the
packed weights), measures the matmul peak, then runs the timed generation (--steps). Reported per
configuration: U-Net seconds per call (a forward hook times every call: median and minimum of the wall time,
median of the thread's CPU time, which leaves out the time other processes held the core but not their slowing
of it: this machine's 2 vCPUs share one core's execution units), VAE decoder seconds, end-to-end seconds (prompt
in, decoded image out), peak resident memory (VmHWM of the process, loading included) and the resident memory
after the run (VmRSS: what the loaded pipeline holds, packed copies included), the U-Net's achieved FLOP/s
(FLOPs of one forward counted by torch.utils.flop_counter on the meta device, over the median call) and its
fraction of the machine's matmul peak (in PEAK_DTYPE: bf16 where the CPU has it natively, else fp32, the precision
kedavra runs in by default; the best torch.matmul FLOP/s over square sides PEAK_SIDES,
PEAK_REPEATS calls each) measured in the same process just before the timed run: the machine is shared with
other virtual machines and its speed drifts by 2-3x within minutes, so each run is held against the peak it had.
Also each image's difference from diffusers-fp32's (8-bit images, in [0, 1] units: max abs, mean abs, PSNR).
--fp32-steps caps the slow fp32 baseline's timed run: its end-to-end time is then extrapolated with its median
U-Net call (marked in the table) and the full-length image comparison is left out. --rounds repeats every timed
configuration, interleaved, and pools the calls (the median of the per-round fractions of peak). --threads
(default 1) applies to every configuration: see docs/benchmark.md.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from kedavra.pipeline.device import default_dtype

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ("diffusers-fp32", "diffusers-bf16", "kedavra", "kedavra-eager", "kedavra-int8", "kedavra-fp32")
CHECK_ONLY = ("kedavra-fp32",)
REFERENCE = "diffusers-fp32"
# (ours, theirs) pairs of the speed-up table: the two targets, then what packing alone contributes.
RATIOS = (("kedavra", "diffusers-bf16"), ("kedavra", "diffusers-fp32"), ("kedavra-eager", "diffusers-bf16"),
          ("kedavra-eager", "diffusers-fp32"), ("kedavra", "kedavra-eager"), ("kedavra-int8", "diffusers-bf16"),
          ("kedavra-int8", "kedavra"))
PROMPT, NEGATIVE = "a photograph of an astronaut riding a horse", "blurry, low quality"
GUIDANCE = 7.5  # SD's usual classifier-free guidance scale
SEED = 42
WEIGHT_SEED = 0  # reference_models' seed: the same random weights on both sides
# The peak's precision: bf16 where native, else fp32 (emulated bf16 would take hours over PEAK_SIDES and say nothing)
PEAK_DTYPE = default_dtype(torch.device("cpu"))
PEAK_NAME = {torch.bfloat16: "bf16", torch.float32: "fp32"}[PEAK_DTYPE]
# Square matmul sides for the peak. 4096 alone (an earlier choice) is slowed by memory traffic here: the
# U-Net's convolutions ran at 1.5-3x its FLOP/s, so a fraction of it said little. The best side varies by run.
PEAK_SIDES = (1024, 2048, 4096)
PEAK_REPEATS = 8
# Tolerances against diffusers-fp32, 8-bit images in [0, 1] units. bf16 (kedavra or diffusers) moves every
# pixel a little: the same bounds hold for diffusers' own bf16 run, printed beside. fp32 against fp32 is parity:
# at most two 8-bit levels (tests/test_pipeline_parity.py asserts 1e-4 before quantisation on a tiny model).
BF16_MEAN_ABS_TOL = 0.02
BF16_PSNR_MIN_DB = 30.0
FP32_MAX_ABS_TOL = 2 / 255


# ---- the model folder ------------------------------------------------------------------------------------


def tests_on_path() -> None:
    """tests/ on sys.path: the reference models and the offline CLIP tokenizer live in the test helpers."""
    if str(REPO / "tests") not in sys.path:
        sys.path.insert(0, str(REPO / "tests"))


def build_folder(folder: Path) -> None:
    """Random SD 1.5 weights (seeded) as a diffusers folder, with an Euler scheduler on SD's leading spacing."""
    tests_on_path()
    from diffusers import EulerDiscreteScheduler
    from reference_models import reference_models, write_diffusers

    from kedavra.networks.model import ModelConfig

    config = ModelConfig.from_preset("sd15")
    folder.mkdir(parents=True, exist_ok=True)
    write_diffusers(folder, reference_models(config, seed=WEIGHT_SEED), config)
    # SD 1.x's scheduler settings (as tests/test_pipeline_parity.py): leading spacing, steps_offset 1
    EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                           timestep_spacing="leading", steps_offset=1).save_pretrained(folder / "scheduler")
    (folder / "complete").write_text("ok")


# ---- one configuration (child process) -------------------------------------------------------------------


def diffusers_pipeline(folder: Path, best: bool):
    """(the modules to time, generate(size, steps) -> PIL image) for diffusers at its defaults or best settings."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0
    from test_pipeline_parity import clip_tokenizer
    from transformers import CLIPTextModel

    dtype = torch.bfloat16 if best else torch.float32
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=dtype)
    vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=dtype)
    text = CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=dtype)
    if best:
        for model in (unet, vae):
            model.to(memory_format=torch.channels_last)
            model.set_attn_processor(AttnProcessor2_0())
    tokenizer = clip_tokenizer(Path(tempfile.mkdtemp(prefix="clip_tokenizer_")))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                   scheduler=EulerDiscreteScheduler.from_pretrained(folder / "scheduler"),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)

    def generate(size: int, steps: int):
        out = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=GUIDANCE,
                   height=size, width=size, generator=torch.Generator().manual_seed(SEED), output_type="pil")
        return out.images[0]

    return {"unet": unet, "vae": vae.decoder, "text": text}, generate


def kedavra_pipeline(folder: Path, config: str):
    """(the modules to time, generate(size, steps) -> PIL image) for kedavra as it loads, or without packing."""
    import kedavra

    dtype = {"kedavra-fp32": "fp32", "kedavra-int8": "int8"}.get(config)
    pipe = kedavra.load(folder, dtype=dtype, optimize=config != "kedavra-eager")

    def generate(size: int, steps: int):
        return pipe(PROMPT, NEGATIVE, steps=steps, sampler="euler", guidance_scale=GUIDANCE, seed=SEED,
                    width=size, height=size).images[0]

    model = pipe.model
    return {"unet": model.unet, "vae": model.vae.decoder, "text": model.text_encoder}, generate


def time_calls(module: torch.nn.Module) -> list[tuple[float, float]]:
    """A list that receives (wall, thread CPU) seconds of every forward call of `module` (forward hooks)."""
    calls: list[tuple[float, float]] = []
    clock: dict[str, float] = {}

    def before(module, args):
        clock["wall"], clock["cpu"] = time.perf_counter(), time.thread_time()

    def after(module, args, output):
        calls.append((time.perf_counter() - clock["wall"], time.thread_time() - clock["cpu"]))

    module.register_forward_pre_hook(before)
    module.register_forward_hook(after)
    return calls


def vm_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmHWM: peak resident set, VmRSS: resident set now)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def run_child(config: str, folder: Path, size: int, steps: int, check_steps: int, out: Path) -> dict:
    """Load, run the short check generation, then the timed one; images go to `out`, numbers are returned."""
    tests_on_path()
    started = time.perf_counter()
    if config.startswith("diffusers"):
        modules, generate = diffusers_pipeline(folder, best=config == "diffusers-bf16")
    else:
        modules, generate = kedavra_pipeline(folder, config)
    load_s = time.perf_counter() - started
    calls = {name: time_calls(module) for name, module in modules.items()}

    images, result = {}, {"config": config, "size": size, "load_s": load_s}
    runs = [("check", check_steps)] + ([] if config in CHECK_ONLY else [("timed", steps)])
    for name, n in runs:
        if name == "timed":  # how fast the machine is right now: other tenants share the core
            result["peak"] = matmul_peak(PEAK_DTYPE)
        for timings in calls.values():
            timings.clear()
        start = time.perf_counter()
        images[name] = np.asarray(generate(size, n).convert("RGB"))
        result[f"{name}_e2e_s"] = time.perf_counter() - start
        result[f"{name}_steps"] = n
        result[f"{name}_unet_wall_s"] = [c[0] for c in calls["unet"]]
        result[f"{name}_unet_cpu_s"] = [c[1] for c in calls["unet"]]
        result[f"{name}_vae_s"] = sum(c[0] for c in calls["vae"])
        result[f"{name}_text_s"] = sum(c[0] for c in calls["text"])
    np.savez(out, **images)
    result["peak_rss_gib"] = vm_kib("VmHWM") / 2**20
    result["end_rss_gib"] = vm_kib("VmRSS") / 2**20
    return result


# ---- measurements in the parent ---------------------------------------------------------------------------


def matmul_peak(dtype: torch.dtype) -> float:
    """Best FLOP/s of square matmuls in `dtype` over PEAK_SIDES (this machine's dense-matmul peak right now)."""
    best = 0.0
    for side in PEAK_SIDES:
        a, b = torch.randn(side, side).to(dtype), torch.randn(side, side).to(dtype)
        a @ b  # warm-up: oneDNN / MKL kernel selection
        for _ in range(PEAK_REPEATS):
            start = time.perf_counter()
            a @ b
            best = max(best, 2 * side**3 / (time.perf_counter() - start))
    return best


def unet_flops(size: int) -> tuple[int, int]:
    """FLOPs of one U-Net forward on the guidance batch of 2 at `size` pixels: (kedavra's, diffusers')."""
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from kedavra.networks.model import ModelConfig
    from kedavra.networks.unet import UNet

    config = ModelConfig.from_preset("sd15")
    side = size // config.vae.downsample_factor
    with torch.device("meta"):
        ours = UNet(config.unet)
        theirs = UNet2DConditionModel(cross_attention_dim=config.unet.context_dim)  # diffusers' defaults are SD 1.x
        x = torch.empty(2, config.unet.in_channels, side, side)
        t = torch.full((2,), 500.0)
        context = torch.empty(2, 77, config.unet.context_dim)
    with FlopCounterMode(display=False) as ours_counter, torch.no_grad():
        ours(x, t, context)
    with FlopCounterMode(display=False) as theirs_counter, torch.no_grad():
        theirs(x, t, encoder_hidden_states=context)
    return ours_counter.get_total_flops(), theirs_counter.get_total_flops()


def image_difference(ours: np.ndarray, reference: np.ndarray) -> dict:
    """Max abs, mean abs and PSNR (dB, peak 1) of two 8-bit images, in [0, 1] units."""
    diff = np.abs(ours.astype(np.float64) - reference.astype(np.float64)) / 255
    mse = float((diff**2).mean())
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
            "psnr_db": math.inf if mse == 0 else 10 * math.log10(1 / mse)}


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


# ---- report ------------------------------------------------------------------------------------------------


def summarize(rounds: list[dict], steps: int, flops: int) -> dict:
    """Numbers for the table from every round of one configuration; a capped timed run is extrapolated.

    U-Net times pool the calls of all rounds (median, min). "peak" is the PEAK_DTYPE matmul peak measured inside each
    round's process just before its timed run, so `efficiency` (achieved U-Net FLOP/s over that peak) compares
    configurations that ran while other tenants slowed the machine by different amounts."""
    wall = [s for r in rounds for s in r["timed_unet_wall_s"]]
    per_step = float(np.median(wall))
    measured = rounds[0]["timed_steps"]
    e2e = float(np.median([r["timed_e2e_s"] for r in rounds])) + (steps - measured) * per_step
    efficiency = [flops / float(np.median(r["timed_unet_wall_s"])) / r["peak"] for r in rounds]
    return {"unet_s": per_step, "unet_min_s": min(wall), "e2e_s": e2e,
            "unet_cpu_s": float(np.median([s for r in rounds for s in r["timed_unet_cpu_s"]])),
            "vae_s": float(np.median([r["timed_vae_s"] for r in rounds])), "extrapolated": measured != steps,
            "measured_steps": measured, "flops_per_s": flops / per_step,
            "peak": float(np.median([r["peak"] for r in rounds])), "efficiency": float(np.median(efficiency)),
            "rss_gib": max(r["peak_rss_gib"] for r in rounds), "end_rss_gib": max(r["end_rss_gib"] for r in rounds),
            "rounds": len(rounds)}


def markdown(rows: dict, diffs: dict, steps: int, check_steps: int) -> str:
    lines = [f"| size | configuration | U-Net s/step (median) | min | CPU s/step | VAE decode s "
             f"| e2e s ({steps} steps) | peak RSS GiB | RSS after GiB | U-Net TFLOP/s "
             f"| {PEAK_NAME} peak in run, TFLOP/s | % of that peak |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (size, config), r in sorted(rows.items(), key=lambda item: (item[0][0], CONFIGS.index(item[0][1]))):
        e2e = f"{r['e2e_s']:.1f}" + (f" (extrapolated from {r['measured_steps']})" if r["extrapolated"] else "")
        lines.append(f"| {size} | {config} | {r['unet_s']:.2f} | {r['unet_min_s']:.2f} | {r['unet_cpu_s']:.2f} "
                     f"| {r['vae_s']:.1f} | {e2e} | {r['rss_gib']:.2f} | {r['end_rss_gib']:.2f} "
                     f"| {r['flops_per_s'] / 1e12:.3f} | {r['peak'] / 1e12:.2f} | {100 * r['efficiency']:.0f} |")
    lines += ["", "| size | speed-up | U-Net per step (wall) | U-Net per step (CPU) | U-Net, % of peak in run "
              "| end to end |", "|---|---|---|---|---|---|"]
    for size in sorted({s for s, _ in rows}):
        for ours, theirs in RATIOS:
            if (size, ours) in rows and (size, theirs) in rows:
                a, b = rows[size, ours], rows[size, theirs]
                lines.append(f"| {size} | {ours} vs {theirs} | {b['unet_s'] / a['unet_s']:.2f}x | "
                             f"{b['unet_cpu_s'] / a['unet_cpu_s']:.2f}x | {a['efficiency'] / b['efficiency']:.2f}x "
                             f"| {b['e2e_s'] / a['e2e_s']:.2f}x |")
    lines += ["", f"Image difference from {REFERENCE} (8-bit images in [0, 1] units; check = {check_steps}-step run, "
              f"full = {steps}-step run):", "",
              "| size | configuration | run | max abs | mean abs | PSNR dB | within tolerance |",
              "|---|---|---|---|---|---|---|"]
    for (size, config, run), d in diffs.items():
        lines.append(f"| {size} | {config} | {run} | {d['max_abs']:.4f} | {d['mean_abs']:.4f} | {d['psnr_db']:.1f} "
                     f"| {'yes' if within_tolerance(config, d) else 'NO'} |")
    lines += ["", f"Tolerances: bf16 configurations mean abs <= {BF16_MEAN_ABS_TOL} and PSNR >= {BF16_PSNR_MIN_DB} dB; "
              f"fp32 against fp32 max abs <= {FP32_MAX_ABS_TOL:.4f} (two 8-bit levels)."]
    return "\n".join(lines)


def within_tolerance(config: str, d: dict) -> bool:
    if config.endswith("fp32"):
        return d["max_abs"] <= FP32_MAX_ABS_TOL
    return d["mean_abs"] <= BF16_MEAN_ABS_TOL and d["psnr_db"] >= BF16_PSNR_MIN_DB


def run_config(args, config: str, size: int, steps: int) -> dict:
    """One configuration in a fresh Python process; its images land in --workdir."""
    command = [sys.executable, __file__, "--child", config, str(size), str(steps), "--threads", str(args.threads),
               "--check-steps", str(args.check_steps), "--workdir", str(args.workdir)]
    return child_json(command, f"{config} at {size}")


def child_json(command: list[str], what: str) -> dict:
    """Run one configuration's child process (the benchmark scripts' --child) and return the JSON object its last
    line prints, with the machine's load average when it ended; RuntimeError with its stderr if it failed."""
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        raise RuntimeError(f"{what} failed:\n{proc.stderr[-4000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    row.setdefault("load_average", load_average())
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--check-steps", type=int, default=2, help="steps of the short warm-up/check generation")
    parser.add_argument("--fp32-steps", type=int, default=None,
                        help="cap diffusers-fp32's timed run at this many steps and extrapolate (default: --steps)")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--rounds", type=int, default=1, help="timed runs per configuration, interleaved")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in every configuration")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "kedavra-benchmark")
    parser.add_argument("--json", type=Path, help="also write every measurement here")
    parser.add_argument("--child", nargs=3, metavar=("CONFIG", "SIZE", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folder = args.workdir / f"sd15-random-seed{WEIGHT_SEED}"

    if args.child:
        config, size, steps = args.child[0], int(args.child[1]), int(args.child[2])
        out = args.workdir / f"images-{config}-{size}.npz"
        print(json.dumps(run_child(config, folder, size, steps, args.check_steps, out)))
        return

    print(f"CPU: {cpu_model()}; torch {torch.__version__}, {args.threads} thread(s); load average {load_average()}")
    peaks = [matmul_peak(PEAK_DTYPE)]
    other = "" if PEAK_DTYPE == torch.float32 else f"; fp32: {matmul_peak(torch.float32) / 1e12:.3f} TFLOP/s"
    print(f"{PEAK_NAME} matmul (best over sides {PEAK_SIDES}): {peaks[0] / 1e12:.3f} TFLOP/s{other}", flush=True)
    if not (folder / "complete").exists():
        start = time.perf_counter()
        build_folder(folder)
        print(f"built the random-weight SD 1.5 diffusers folder in {time.perf_counter() - start:.0f} s: {folder}")

    results: dict[tuple[int, str], list[dict]] = {}
    images, flops = {}, {}
    for size in args.sizes:
        flops[size], theirs = unet_flops(size)
        print(f"{size}x{size}: U-Net forward (batch 2) = {flops[size] / 1e9:.1f} GFLOP (diffusers' count "
              f"{theirs / 1e9:.1f})", flush=True)
        for round_index in range(args.rounds):
            for config in args.configs:
                if config in CHECK_ONLY and round_index:
                    continue
                capped = config == REFERENCE and args.fp32_steps
                result = run_config(args, config, size, args.fp32_steps if capped else args.steps)
                results.setdefault((size, config), []).append(result)
                if "peak" in result:
                    peaks.append(result["peak"])
                if round_index == 0:
                    with np.load(args.workdir / f"images-{config}-{size}.npz") as saved:
                        images[size, config] = {k: saved[k] for k in saved.files}
                timed = result.get("timed_unet_wall_s")
                print(f"  {config}" + (f" (round {round_index + 1})" if args.rounds > 1 else "") + ": "
                      + (f"U-Net {np.median(timed):.2f} s/step (CPU {np.median(result['timed_unet_cpu_s']):.2f}), "
                         f"VAE decode {result['timed_vae_s']:.1f} s, e2e {result['timed_e2e_s']:.1f} s over "
                         f"{result['timed_steps']} steps, {PEAK_NAME} peak {result['peak'] / 1e12:.2f} TFLOP/s, "
                         if timed else "")
                      + f"check run {result['check_e2e_s']:.1f} s, load {result['load_s']:.1f} s, peak RSS "
                      f"{result['peak_rss_gib']:.2f} GiB, after {result['end_rss_gib']:.2f} GiB; load average "
                      f"{load_average()}", flush=True)

    peaks.append(matmul_peak(PEAK_DTYPE))
    print(f"\n{PEAK_NAME} matmul peak: best {max(peaks) / 1e12:.3f} TFLOP/s, lowest {min(peaks) / 1e12:.3f} over "
          f"{len(peaks)} measurements during the run; load average at the end {load_average()}\n")
    rows = {key: summarize(rounds, args.steps, flops[key[0]]) for key, rounds in results.items()
            if key[1] not in CHECK_ONLY}
    diffs = {}
    for (size, config), found in images.items():
        reference = images.get((size, REFERENCE))
        if reference is None or config == REFERENCE:
            continue
        full_length = results[size, REFERENCE][0]["timed_steps"] == args.steps  # else --fp32-steps capped it
        for run, label in (("check", "check"), ("timed", "full")):
            if run in found and (run == "check" or full_length):
                diffs[size, config, label] = image_difference(found[run], reference[run])
    print(markdown(rows, diffs, args.steps, args.check_steps))
    if args.json:
        args.json.write_text(json.dumps({"peak_dtype": PEAK_NAME, "peaks": peaks, "results": {
            f"{s} {c}": r for (s, c), r in results.items()}, "diffs": {
            f"{s} {c} {r}": d for (s, c, r), d in diffs.items()}}, indent=1))


if __name__ == "__main__":
    main()
