"""`kedavra evaluate`'s report: what it measures (`EvaluationSettings`), what it found (`Evaluation`) and how that is
written: report.md with PNG plots beside it, and report.json with the numbers.

    evaluation = run_evaluation(pipe, load_inception(), EvaluationSettings(data="shapes"), model_name="m")
    write_report(evaluation, "out/evaluate")   # report.md, report.json, samples.png, adherence.png, sampler_steps.png

The measuring (`run_evaluation`, kedavra/commands/evaluate.py) takes three measurements and times each:
    FID / KID   one generated image per caption of the held-out real images (seed + i for image i) against those
                real images (kedavra/evaluation/fid.py). Held out: the data set's test split (shapes, emoji, digits,
                a folder with train/ and test/); a folder without one gives its last images in file order, which
                its training run may have seen (the report says so).
    adherence   shapes only: `measure_adherence` on held-out prompts, per GenEval category
    curve       for each sampler and step count: adherence overall on shapes (the same prompts and seeds at every
                point, so points differ by the sampler alone), FID of `curve_images` images otherwise
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from matplotlib.figure import Figure
from PIL import Image

from kedavra.data import DATASETS
from kedavra.data.shapes import PROMPT_KINDS
from kedavra.diffusion.samplers import resolve_sampler
from kedavra.evaluation.adherence import DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_STEPS, AdherenceResult
from kedavra.evaluation.fid import KernelDistance
from kedavra.formats.grid import image_grid
from kedavra.pipeline.request import MAX_IMAGES
from kedavra.toy.figures import save_png
from kedavra.validation import check_int, check_number

DEFAULT_IMAGES = 100  # generated and real images for FID/KID: ~1 min of CPU for a 32 px model and Inception here
DEFAULT_PER_KIND = 10  # adherence prompts of each of the 4 kinds: 40 images
DEFAULT_CURVE_IMAGES = 8  # images per sampler-steps point (on shapes, 2 prompts of each kind)
CURVE_SAMPLERS = ("euler", "dpmpp_2m", "ddim", "unipc")
CURVE_STEPS = (5, 10, 20, 40)
DEFAULT_BATCH = 50  # images per pipeline call (measure_adherence's default)
GRID_IMAGES = 16  # generated and real images shown in samples.png
GRID_COLUMNS = 8  # images per row of samples.png
GRID_ZOOM = 4  # samples.png shows 32 px images 4x larger, nearest-neighbour
CURVE_MARKERS = ("o", "s", "^", "D", "v", "P")  # one per sampler, shrinking, so points that coincide stay visible
CURVE_LINES = ("-", "--", "-.", ":")
KID_SCALE = 1e3  # KID is reported x 10³, as Bińkowski et al. and clean-fid do
FILES = {"report": "report.md", "summary": "report.json", "samples": "samples.png", "adherence": "adherence.png",
         "curve": "sampler_steps.png"}


@dataclass(frozen=True)
class EvaluationSettings:
    """What to measure. data: "shapes", "emoji", "digits" or a folder of captioned images; sampler / steps /
    guidance_scale: the FID and adherence runs' settings; curve_samplers x curve_steps: the sampler-steps curve."""

    data: str
    images: int = DEFAULT_IMAGES
    per_kind: int = DEFAULT_PER_KIND
    sampler: str = DEFAULT_SAMPLER
    steps: int = DEFAULT_STEPS
    guidance_scale: float = DEFAULT_GUIDANCE
    curve_samplers: tuple[str, ...] = CURVE_SAMPLERS
    curve_steps: tuple[int, ...] = CURVE_STEPS
    curve_images: int = DEFAULT_CURVE_IMAGES
    seed: int = 0
    batch_size: int = DEFAULT_BATCH

    def __post_init__(self):
        if not isinstance(self.data, str) or not (self.data in DATASETS or Path(self.data).expanduser().is_dir()):
            raise ValueError(f"unknown data {self.data!r}: expected one of {', '.join(DATASETS)} or an existing "
                             "folder of captioned images")
        check_int("images", self.images, low=2)  # a covariance needs two
        check_int("per_kind", self.per_kind, low=1)
        check_int("steps", self.steps, low=1)
        check_int("curve_images", self.curve_images, low=2)
        check_int("seed", self.seed, low=0)
        check_int("batch_size", self.batch_size, 1, MAX_IMAGES)
        check_number("guidance_scale", self.guidance_scale, low=0)
        for name in (self.sampler, *self.curve_samplers):
            resolve_sampler(name)
        if not self.curve_samplers or len(set(self.curve_samplers)) != len(self.curve_samplers):
            raise ValueError(f"curve_samplers must be distinct names, at least one, got {list(self.curve_samplers)}")
        for steps in self.curve_steps:
            check_int("each curve step count", steps, low=1)
        if not self.curve_steps or list(self.curve_steps) != sorted(set(self.curve_steps)):
            raise ValueError(f"curve_steps must be distinct and increasing, at least one, got {list(self.curve_steps)}")

    @property
    def shapes(self) -> bool:
        return self.data == "shapes"

    @property
    def curve_per_kind(self) -> int:
        """Shapes prompts of each kind per curve point: curve_images over the kinds, rounded up."""
        return math.ceil(self.curve_images / len(PROMPT_KINDS))


@dataclass
class CurvePoint:
    """One sampler at one step count: the curve's metric (adherence overall or FID), and KID where FID is used."""

    sampler: str
    steps: int
    value: float
    images: int
    seconds: float
    kid: float | None = None


@dataclass
class Evaluation:
    """Everything the report shows."""

    settings: EvaluationSettings
    model: str
    model_description: str
    device: str
    dtype: str
    threads: int
    real_source: str
    images: int
    fid: float
    kid: KernelDistance
    generated: list[Image.Image] = field(repr=False)
    real: list[Image.Image] = field(repr=False)
    adherence: AdherenceResult | None
    curve_metric: str
    curve: list[CurvePoint]
    seconds: dict[str, float]

    def summary(self) -> dict:
        """JSON-ready numbers and settings (report.json)."""
        return {
            "model": self.model, "model_description": self.model_description, "device": self.device,
            "dtype": self.dtype, "threads": self.threads, "settings": asdict(self.settings),
            "real_images": self.real_source, "images": self.images, "fid": self.fid, "kid": asdict(self.kid),
            "adherence": self.adherence.summary() if self.adherence else None,
            "curve_metric": self.curve_metric, "curve": [asdict(point) for point in self.curve],
            "seconds": {phase: round(seconds, 1) for phase, seconds in self.seconds.items()},
        }


def check_out_dir(out_dir: str | Path) -> Path:
    """The report's folder as a Path, refusing a path that exists and is not a folder."""
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"output folder {str(out)!r} exists and is not a folder")
    return out


def write_report(evaluation: Evaluation, out_dir: str | Path) -> dict[str, Path]:
    """Write report.md, report.json and the PNGs into out_dir (created if needed); returns the paths written."""
    out = check_out_dir(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / file for name, file in FILES.items()}
    if evaluation.adherence is None:
        del paths["adherence"]
    plot_samples(evaluation.generated, evaluation.real, paths["samples"])
    if evaluation.adherence is not None:
        plot_adherence(evaluation.adherence, paths["adherence"])
    plot_curve(evaluation.curve, evaluation.curve_metric, paths["curve"])
    paths["summary"].write_text(json.dumps(evaluation.summary(), indent=2, ensure_ascii=False) + "\n")
    paths["report"].write_text(markdown(evaluation), encoding="utf-8")
    return paths


def plot_samples(generated: list[Image.Image], real: list[Image.Image], path: Path) -> None:
    """Generated images above held-out real ones, GRID_COLUMNS to a row, zoomed GRID_ZOOM x with nearest-neighbour."""
    columns = min(GRID_COLUMNS, max(len(generated), len(real)))
    rows = math.ceil(len(generated) / columns) + math.ceil(len(real) / columns)
    fig = Figure(figsize=(8, 8 / columns * rows + 1))
    for axis_index, (images, title) in enumerate(((generated, "generated"), (real, "held-out real"))):
        grid = image_grid(images, columns=columns, padding=1)
        grid = grid.resize((grid.width * GRID_ZOOM, grid.height * GRID_ZOOM), Image.Resampling.NEAREST)
        axis = fig.add_subplot(2, 1, axis_index + 1)
        axis.imshow(grid, interpolation="nearest")
        axis.set_title(title)
        axis.axis("off")
    fig.tight_layout()
    save_png(fig, path)


def plot_adherence(adherence: AdherenceResult, path: Path) -> None:
    """Accuracy per GenEval category and overall, as horizontal bars with the number of images scored."""
    report = adherence.report
    names = [*report.accuracy, "overall"]
    values = [*report.accuracy.values(), report.overall]
    counts = [*report.counts.values(), len(report.results)]
    fig = Figure(figsize=(6.4, 0.45 * len(names) + 1.2))
    axis = fig.add_subplot()
    axis.barh(names[::-1], values[::-1], color=["tab:gray"] + ["tab:blue"] * (len(names) - 1))
    for row, (value, count) in enumerate(zip(values[::-1], counts[::-1], strict=True)):
        axis.text(min(value, 1) + 0.01, row, f"{value:.2f} (n={count})", va="center", fontsize=8)
    axis.set_xlim(0, 1.2)
    axis.set_xlabel("accuracy")
    axis.set_title(f"prompt adherence, held-out prompts ({adherence.settings['sampler']}, "
                   f"{adherence.settings['steps']} steps)")
    fig.tight_layout()
    save_png(fig, path)


def plot_curve(curve: list[CurvePoint], metric: str, path: Path) -> None:
    """The metric against the number of steps (log scale), one line per sampler."""
    fig = Figure(figsize=(6.4, 4.2))
    axis = fig.add_subplot()
    for index, sampler in enumerate(dict.fromkeys(point.sampler for point in curve)):
        points = [point for point in curve if point.sampler == sampler]
        axis.plot([p.steps for p in points], [p.value for p in points], label=sampler,
                  marker=CURVE_MARKERS[index % len(CURVE_MARKERS)], markersize=max(10 - 2 * index, 4),
                  linestyle=CURVE_LINES[index % len(CURVE_LINES)])  # small samples tie: keep tied lines visible
    steps = sorted({point.steps for point in curve})
    axis.set_xscale("log")
    axis.set_xticks(steps, [str(s) for s in steps])
    axis.minorticks_off()
    axis.set_xlabel("steps")
    adherence = metric.startswith("adherence")
    better = "higher" if adherence else "lower"
    if adherence:
        axis.set_ylim(-0.03, 1.03)
    axis.set_ylabel(f"{metric} ({better} is better)")
    axis.set_title(f"sampler quality against steps ({curve[0].images} images per point)")
    axis.grid(alpha=0.3)
    axis.legend()
    fig.tight_layout()
    save_png(fig, path)


def _duration(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:.0f} s" if seconds >= 60 else f"{seconds:.1f} s"


def markdown(evaluation: Evaluation) -> str:
    """The report's Markdown text (the PNGs it links sit beside it)."""
    e, s = evaluation, evaluation.settings
    size = e.generated[0].width
    total = sum(e.seconds.values())
    lines = [
        f"# Evaluation of {e.model} on {s.data}", "",
        f"Model: {e.model_description}. Run on {e.device} in {e.dtype} with {e.threads} torch thread(s); wall time "
        f"{_duration(total)}.", "",
        "## FID and KID against held-out real images", "",
        "| images (generated / real) | FID | KID x 10³ (mean ± std) |", "|---|---:|---:|",
        f"| {e.images} / {e.images} | {e.fid:.2f} | {e.kid.mean * KID_SCALE:.2f} ± {e.kid.std * KID_SCALE:.2f} "
        f"({e.kid.subsets} subsets of {e.kid.subset_size}) |", "",
        f"Real images: {e.real_source}. Generated: one image per real image's caption, seeds {s.seed} to "
        f"{s.seed + e.images - 1}, sampler {s.sampler}, {s.steps} steps, guidance scale {s.guidance_scale:g}.", "",
        f"- These are {size} px images; the Inception-v3 of FID sees them upsampled to 299 x 299 (TF's bilinear "
        "resize), far from the ImageNet photographs it was trained on. The numbers rank models and settings on "
        "this data set; they are not comparable with published FIDs of photographs.",
        f"- FID is biased upwards at small sample sizes: compare FIDs only at the same number of images (here "
        f"{e.images}). KID is unbiased (it can dip below 0 when the sets match); its ± is the spread over subsets.",
        "", f"![generated and held-out real images]({FILES['samples']})", "",
    ]
    if e.adherence is not None:
        a = e.adherence.settings
        lines += [
            "## Prompt adherence (shapes, held-out prompts)", "",
            f"{a['per_kind']} held-out prompts of each kind ({', '.join(PROMPT_KINDS)}), scored by the shapes "
            f"evaluator (GenEval's categories); sampler {a['sampler']}, {a['steps']} steps, guidance scale "
            f"{a['guidance_scale']:g}, seeds from {a['seed']}.", "",
            e.adherence.report.table(), "", f"![adherence per category]({FILES['adherence']})", "",
        ]
    lines += _curve_lines(e) + ["## Wall time", "", "| phase | seconds |", "|---|---:|"]
    lines += [f"| {phase} | {seconds:.1f} |" for phase, seconds in e.seconds.items()]
    lines.append(f"| total | {total:.1f} |")
    return "\n".join(lines) + "\n"


def _curve_lines(e: Evaluation) -> list[str]:
    s = e.settings
    if s.shapes:
        how = (f"adherence overall (the fraction of images passing every category) on {e.curve[0].images} held-out "
               "prompts, the same prompts and seeds at every point")
    else:
        how = (f"FID of {s.curve_images} generated images against the {e.images} real ones (KID x 10³ in brackets); "
               f"at {s.curve_images} images FID is dominated by its small-sample bias, so read the differences")
    header = "| sampler | " + " | ".join(f"{steps} steps" for steps in s.curve_steps) + " |"
    rows = []
    for sampler in s.curve_samplers:
        cells = []
        for point in (p for p in e.curve if p.sampler == sampler):
            kid_text = f" ({point.kid * KID_SCALE:.1f})" if point.kid is not None else ""
            cells.append(f"{point.value:.3f}{kid_text}" if s.shapes else f"{point.value:.1f}{kid_text}")
        rows.append(f"| {sampler} | " + " | ".join(cells) + " |")
    return ["## Sampler quality against steps", "",
            f"Metric: {how}; guidance scale {s.guidance_scale:g}.", "",
            header, "|---|" + "---:|" * len(s.curve_steps), *rows, "",
            f"![{e.curve_metric} against steps]({FILES['curve']})", ""]
