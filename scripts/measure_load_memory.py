"""Peak resident memory of kedavra.checkpoint.load_model on a full-size random-weight checkpoint.

    .venv/bin/python scripts/measure_load_memory.py                    # SD 1.5, the table in docs/checkpoints.md
    .venv/bin/python scripts/measure_load_memory.py --dtypes float16 --json

Writes an original single-file checkpoint (the CompVis layout of v1-5-pruned-emaonly.safetensors, random
weights) per file dtype into a temporary folder, one tensor at a time. Then, for each case, a fresh Python
process imports torch and kedavra, reads its resident set (VmRSS), calls load_model, reads every weight once
(so weights that alias the mapped file are resident too), and reports its peak resident set (VmHWM) minus the
baseline, divided by the bytes of the loaded weights. "no release" repeats a case with madvise(MADV_DONTNEED)
turned off, to show what dropping the consumed file pages buys.
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

DTYPES = {"float16": torch.float16, "float32": torch.float32}
INIT_STD = 0.02  # scale of the random weights; their values do not matter here


def write_checkpoint(path: Path, family: str, dtype: torch.dtype) -> None:
    """A random-weight original single file for `family`, generated and written tensor by tensor."""
    config = PRESETS[family]
    with torch.device("meta"):
        model = StableDiffusion(config)
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
    parser.add_argument("--dtypes", nargs="+", default=["float16", "float32"], choices=DTYPES, help="file dtypes")
    parser.add_argument("--dir", type=Path, help="where to write the checkpoints (default: a temporary folder)")
    parser.add_argument("--json", action="store_true", help="print the rows as one JSON line at the end")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model-dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--no-release", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.model_dtype, not args.no_release)
        return 0
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        cases = []
        for file_dtype in args.dtypes:
            path = Path(folder) / f"{args.family}-{file_dtype}.safetensors"
            write_checkpoint(path, args.family, DTYPES[file_dtype])
            cases.append((path, file_dtype, "float32", True))
            if file_dtype == "float16":
                cases += [(path, file_dtype, "float32", False), (path, file_dtype, "float16", True)]
        rows = []
        print(f"{args.family}: peak RSS of load_model in a fresh process, minus its RSS after import", file=sys.stderr)
        print("| file | model | release | file GB | weights GB | peak - baseline GB | ratio | load s |")
        print("|---|---|---|---|---|---|---|---|")
        for path, file_dtype, model_dtype, release in cases:
            row = measure(path, model_dtype, release)
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
