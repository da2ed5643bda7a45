"""SDXL base U-Net on this CPU: kedavra against diffusers, seconds per guidance call, memory and output agreement.

    .venv/bin/python scripts/benchmark_sdxl.py                          # 768 and 1024, torch's default threads
    .venv/bin/python scripts/benchmark_sdxl.py --sizes 768 --threads 1
(docs/benchmark.md, section "SDXL", gives the commands behind its table.)

Both sides get the SDXL base U-Net (diffusers' UNet2DConditionModel from the released unet/config.json,
tests/test_unet_configs.py's SDXL_BASE) with the same random weights: built on the meta device, given bf16 memory
and re-drawn under WEIGHT_SEED by tests/reference_models.randomize, parameter by parameter in diffusers' order.
kedavra's U-Net receives those tensors as views (convert_unet_state_dict, load_state_dict(assign=True)) and the
diffusers module is dropped, so each process holds one copy of the weights. Configurations, each in its own
process, one at a time (scripts/benchmark_pipeline.py defines them for SD 1.5):

    diffusers-bf16   diffusers at its best CPU settings: bf16 weights, channels_last, SDPA (AttnProcessor2_0)
    kedavra          kedavra's U-Net as kedavra.Pipeline runs it on a CPU with AMX: bf16, channels_last, SDPA,
                     packed oneDNN weights (kedavra.networks.acceleration.optimize_for_inference)
    kedavra-int8     the same with `--precision int8` (kedavra.networks.int8.quantise_unet before packing): the large
                     conv and linear layers as oneDNN int8 products, the rest as kedavra
    diffusers-fp32   (--configs) diffusers' U-Net in fp32 (the same bf16-drawn weights, widened), one untimed call:
                     the reference the others' outputs are measured against (relative L2 error, as
                     scripts/int8_error_sources.py measures SD 1.5's); 10 GB of weights, alone in its process
    diffusers-bf16-compiled, kedavra-compiled   (--configs) the same U-Nets (kedavra's unpacked) through
                     torch.compile (inductor, default mode, frozen weights: torch._inductor.config.freezing); the
                     warm-up call includes the compilation

Each process makes one U-Net call on the classifier-free guidance batch (2 latents of size/8, one timestep, a 77-token
context, SDXL's pooled text embeds and micro-conditioning time ids) to warm up (oneDNN's kernel choice, the packed
weights), measures the matmul peak (benchmark_pipeline.matmul_peak, bf16 where native, else fp32: the machine is shared
and its speed drifts), then times --calls calls (wall and thread CPU seconds). Reported: the median of the timed calls,
peak resident memory (VmHWM, building included), the memory held after the calls (VmRSS), the same after glibc's
malloc_trim(0) returns the freed pages its heap keeps (the memory really in use), and the agreement of the last call's
outputs (max |kedavra - diffusers| / max |diffusers|, both bf16) and, with diffusers-fp32 run first, each output's
relative L2 error ||y - y_fp32|| / ||y_fp32||.
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
sys.path.insert(0, str(REPO / "tests"))  # the released SDXL config and the seeded re-draw live in the test helpers

from benchmark_pipeline import PEAK_DTYPE, PEAK_NAME, child_json, cpu_model, load_average, matmul_peak, vm_kib  # noqa: E402

CONFIGS = ("diffusers-bf16", "kedavra", "kedavra-int8")
EXTRA = ("diffusers-fp32", "diffusers-bf16-compiled", "kedavra-compiled")
REFERENCE = "diffusers-fp32"  # untimed: one call, the outputs' reference
WEIGHT_SEED = 0  # the same random weights on both sides
INPUT_SEED = 1
TIMESTEP = 500.0  # mid-schedule: the cost of a call does not depend on it
SDXL_MAX_LENGTH = 77  # CLIP's context length, both text encoders
TARGET_SPEEDUP = 1.3  # the SDXL issue: kedavra at least 1.3x faster than diffusers-bf16 per U-Net call


# ---- one configuration (child process) -------------------------------------------------------------------


def reference_unet() -> torch.nn.Module:
    """diffusers' SDXL base U-Net in bf16 with the seeded random weights, never allocated in fp32 here."""
    from diffusers import UNet2DConditionModel
    from reference_models import randomize
    from test_unet_configs import SDXL_BASE

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_BASE).to(torch.bfloat16)
    unet.to_empty(device="cpu")
    randomize(unet, torch.Generator().manual_seed(WEIGHT_SEED))
    return unet.eval()


def compiled(module: torch.nn.Module) -> torch.nn.Module:
    """`module` through torch.compile with inductor's frozen weights (constant folding, prepacked oneDNN weights)."""
    import torch._inductor.config as inductor

    inductor.freezing = True
    return torch.compile(module)


def diffusers_unet(compile_it: bool = False, fp32: bool = False):
    """diffusers at its best CPU settings (fp32: at fp32, the reference), and call(x, t, context, added) -> (B, 4, h, w)
    output."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet = reference_unet()
    if fp32:
        unet.float()  # parameter by parameter: the bf16 copy shrinks as the fp32 one grows
    unet = unet.to(memory_format=torch.channels_last)
    unet.set_attn_processor(AttnProcessor2_0())
    run = compiled(unet) if compile_it else unet
    dtype = torch.float32 if fp32 else torch.bfloat16

    def call(x, t, context, added):
        added = {name: value.to(dtype) for name, value in added.items()}
        return run(x.to(dtype), t, encoder_hidden_states=context.to(dtype), added_cond_kwargs=added).sample

    return call


def kedavra_unet(compile_it: bool = False, int8: bool = False):
    """kedavra's U-Net as kedavra.Pipeline prepares it on a CPU with AMX, and call(x, t, context, added); compiled:
    the unpacked U-Net through `compiled`; int8: as `--precision int8` prepares it."""
    from kedavra.networks.acceleration import optimize_for_inference
    from kedavra.networks.int8 import quantise_unet
    from kedavra.networks.model import PRESETS
    from kedavra.networks.unet import UNet
    from kedavra.networks.unet_keys import convert_unet_state_dict

    config = PRESETS["sdxl"].unet
    state = convert_unet_state_dict(reference_unet().state_dict(), "diffusers", config)  # views: one copy
    with torch.device("meta"):
        unet = UNet(config)
    unet.load_state_dict(state, strict=True, assign=True)
    del state  # the diffusers module is gone already; its tensors live on as ours
    unet.eval().to(memory_format=torch.channels_last)
    if compile_it:
        run = compiled(unet)
        return lambda x, t, context, added: run(x, t, context, added_cond=added)
    if int8:
        quantise_unet(unet)
    optimize_for_inference(unet, "cpu", torch.bfloat16)
    return lambda x, t, context, added: unet(x, t, context, added_cond=added)


def inputs(size: int) -> tuple[torch.Tensor, ...]:
    """The guidance batch at `size` pixels: latents, timesteps, context, pooled embeds and time ids (bf16)."""
    generator = torch.Generator().manual_seed(INPUT_SEED)
    side = size // 8  # the SDXL VAE's downsampling factor
    x = torch.randn(2, 4, side, side, generator=generator).to(torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last)
    t = torch.full((2,), TIMESTEP)
    context = torch.randn(2, SDXL_MAX_LENGTH, 2048, generator=generator).to(torch.bfloat16)  # ViT-L | bigG
    text_embeds = torch.randn(2, 1280, generator=generator).to(torch.bfloat16)  # bigG's pooled projection
    # original size, crop top-left, target size (Podell et al. 2023, sec. 2.2)
    time_ids = torch.tensor([[size, size, 0, 0, size, size]] * 2, dtype=torch.bfloat16)
    return x, t, context, {"text_embeds": text_embeds, "time_ids": time_ids}


def run_child(config: str, size: int, calls: int, out: Path) -> dict:
    started = time.perf_counter()
    compile_it = config.endswith("-compiled")
    if config.startswith("diffusers"):
        call = diffusers_unet(compile_it, fp32=config == REFERENCE)
    else:
        call = kedavra_unet(compile_it, int8=config == "kedavra-int8")
    if config == REFERENCE:
        calls = 0  # the warm-up call's output is the reference
    result = {"config": config, "size": size, "build_s": time.perf_counter() - started,
              "built_rss_gib": vm_kib("VmRSS") / 2**20}
    x, t, context, added = inputs(size)
    with torch.no_grad():
        start = time.perf_counter()
        output = call(x, t, context, added)  # warm-up
        result["warmup_s"] = time.perf_counter() - start
        result["peak"] = matmul_peak(PEAK_DTYPE)
        wall, cpu = [], []
        for _ in range(calls):
            start, start_cpu = time.perf_counter(), time.thread_time()
            output = call(x, t, context, added)
            wall.append(time.perf_counter() - start)
            cpu.append(time.thread_time() - start_cpu)
    torch.save(output.float().contiguous(), out)
    result.update(wall_s=wall, cpu_s=cpu, peak_rss_gib=vm_kib("VmHWM") / 2**20, end_rss_gib=vm_kib("VmRSS") / 2**20)
    del output
    result["trimmed_rss_gib"] = trimmed_rss_gib()
    return result


def trimmed_rss_gib() -> float | None:
    """VmRSS in GiB after glibc's malloc_trim(0) hands the heap's freed pages back to the OS: the memory the process
    really uses, without what its allocator keeps for reuse (None where the C library has no malloc_trim)."""
    from kedavra.pipeline.device import trim_heap

    return vm_kib("VmRSS") / 2**20 if trim_heap() else None


# ---- parent ------------------------------------------------------------------------------------------------


def run_config(config: str, size: int, args, folder: Path) -> tuple[dict, torch.Tensor]:
    out = folder / f"{config}-{size}.pt"
    command = [sys.executable, __file__, "--child", config, str(size), str(out), "--calls", str(args.calls)]
    if args.threads is not None:
        command += ["--threads", str(args.threads)]
    return child_json(command, f"{config} at {size}"), torch.load(out)


def gib_text(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def relative_l2(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return (torch.linalg.vector_norm(ours - reference) / torch.linalg.vector_norm(reference)).item()


def agreement(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).abs().max() / reference.abs().max()).item()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[768, 1024], help="image sides in pixels")
    parser.add_argument("--calls", type=int, default=2, help="timed U-Net calls per configuration, after a warm-up")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS + EXTRA,
                        help="configurations to run, in this order (default: %(default)s)")
    parser.add_argument("--json", type=Path, help="also write every measurement here")
    parser.add_argument("--child", nargs=3, metavar=("CONFIG", "SIZE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.child:
        config, size, out = args.child
        print(json.dumps(run_child(config, int(size), args.calls, Path(out))))
        return 0
    for size in args.sizes:
        if size % 8:
            parser.error(f"--sizes must be multiples of 8 (the VAE's factor), got {size}")
    print(f"CPU: {cpu_model()}; torch {torch.__version__}, {torch.get_num_threads()} thread(s); "
          f"load average {load_average()}")
    rows = []
    print("| size | configuration | U-Net s/call (median of timed; calls) | thread CPU s | warm-up s | "
          f"{PEAK_NAME} peak "
          "TFLOP/s | peak RSS GiB | RSS after GiB | after malloc_trim GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    summary, errors = [], []
    with tempfile.TemporaryDirectory() as folder:
        for size in args.sizes:
            outputs = {}
            measured = {}
            for config in args.configs:
                measured[config], outputs[config] = run_config(config, size, args, Path(folder))
                row = measured[config]
                rows.append(row)
                if config == REFERENCE:
                    print(f"| {size} | {config} | (reference, untimed) | | {row['warmup_s']:.2f} "
                          f"| {row['peak'] / 1e12:.2f} | {row['peak_rss_gib']:.2f} | {row['end_rss_gib']:.2f} "
                          f"| {gib_text(row['trimmed_rss_gib'])} |", flush=True)
                    continue
                calls = ", ".join(f"{s:.2f}" for s in row["wall_s"])
                print(f"| {size} | {config} | {np.median(row['wall_s']):.2f} ({calls}) "
                      f"| {np.median(row['cpu_s']):.2f} | {row['warmup_s']:.2f} | {row['peak'] / 1e12:.2f} "
                      f"| {row['peak_rss_gib']:.2f} | {row['end_rss_gib']:.2f} | {gib_text(row['trimmed_rss_gib'])} |",
                      flush=True)
            for theirs in (c for c in args.configs if c.startswith("diffusers") and c != REFERENCE):
                for ours in (c for c in args.configs if c.startswith("kedavra")):
                    wall = np.median(measured[theirs]["wall_s"]) / np.median(measured[ours]["wall_s"])
                    cpu = np.median(measured[theirs]["cpu_s"]) / np.median(measured[ours]["cpu_s"])
                    summary.append((size, theirs, ours, wall, cpu, agreement(outputs[ours], outputs[theirs]),
                                    np.median(measured[ours]["wall_s"])))
            if REFERENCE in outputs:
                for config in (c for c in args.configs if c != REFERENCE):
                    errors.append((size, config, relative_l2(outputs[config], outputs[REFERENCE])))
    print()
    print(f"| size | against | kedavra | speed-up, wall (target >= {TARGET_SPEEDUP}x) | thread CPU "
          "| output max rel diff | 20-step U-Net estimate s (kedavra) |")
    print("|---|---|---|---|---|---|---|")
    for size, theirs, ours, speedup, cpu_speedup, difference, per_call in summary:
        print(f"| {size} | {theirs} | {ours} | {speedup:.2f}x | {cpu_speedup:.2f}x | {difference:.3g} "
              f"| {20 * per_call:.0f} |")
    if errors:
        print(f"\n| size | configuration | relative L2 error against {REFERENCE} |\n|---|---|---|")
        for size, config, error in errors:
            print(f"| {size} | {config} | {error:.4f} |")
    if args.json:
        args.json.write_text(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
