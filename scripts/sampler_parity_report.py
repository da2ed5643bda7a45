"""Print the largest per-step relative error of every sampler against diffusers, for the cases of
tests/test_sampler_parity.py, as a Markdown table.  Run: .venv/bin/python scripts/sampler_parity_report.py"""

import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
warnings.filterwarnings("ignore")

from test_sampler_parity import CASES, max_relative_error  # noqa: E402

print("| sampler | schedule | prediction | spacing | steps | dtype | max relative error |")
print("|---|---|---|---|---|---|---|")
for case in CASES:
    name, kind, prediction, spacing, _, karras, zero_snr, _, steps = case
    options = spacing + (" + Karras" if karras else "") + (" + zero SNR" if zero_snr else "")
    dtype = "float64" if steps < 0 else "float32"
    print(f"| {name} | {kind} | {prediction} | {options} | {abs(steps)} | {dtype} | {max_relative_error(*case):.1e} |")
