"""Prompt adherence of a text-to-image model on the shapes grammar, GenEval-style (Ghosh et al. 2023).

`measure_adherence` generates one image per held-out or seen prompt of `kedavra.data.shapes.evaluation_prompts`
(the same number of prompts of each kind: single object, count, pair, relation) and scores each image with the
shapes evaluator (kedavra/evaluation/shapes_eval.py): object, colour, count, position, colour binding. The
prompts, seeds and sampler settings are part of the result, so a report says exactly what was measured. The
prompts are worded canonically ("a red circle left of a blue square") or, with phrasing="paraphrased", each in a
wording drawn from the grammar's others ("the red circle is to the left of a blue square"; PromptSpec.paraphrase).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from kedavra.data.shapes import ShapesConfig, evaluation_prompts
from kedavra.evaluation.shapes_eval import EvaluationReport, evaluate_batch
from kedavra.validation import check_choice, check_int

# The settings the embedded model is reported with (docs/embedded_model.md): what `kedavra generate` uses for it.
DEFAULT_STEPS = 20
DEFAULT_SAMPLER = "dpmpp_2m"
DEFAULT_GUIDANCE = 5.0
HELD_OUT_CHOICES = {"held-out": True, "seen": False, "any": None}
PHRASINGS = ("canonical", "paraphrased")
PARAPHRASE_STREAM = 3  # the paraphrases' seed stream, apart from the prompts' (kedavra.data.shapes.SPLIT_STREAMS + 1)


@dataclass
class AdherenceResult:
    """The evaluator's report over the generated images, with what produced them."""

    report: EvaluationReport
    prompts: list[str]
    seeds: list[int]
    images: list[Image.Image] = field(repr=False)
    settings: dict
    seconds: float

    def summary(self) -> dict:
        """JSON-ready: per-category accuracy and counts, overall, the settings and the wall time."""
        return {
            "accuracy": self.report.accuracy,
            "counts": self.report.counts,
            "overall": self.report.overall,
            "images": len(self.images),
            "settings": self.settings,
            "seconds": round(self.seconds, 1),
        }


def measure_adherence(
    pipe,
    *,
    per_kind: int = 50,
    prompts: str = "held-out",
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    sampler: str = DEFAULT_SAMPLER,
    guidance_scale: float = DEFAULT_GUIDANCE,
    batch_size: int = 50,
    shapes_config: ShapesConfig | None = None,
    phrasing: str = "canonical",
    **settings,
) -> AdherenceResult:
    """Generate `per_kind` images for each prompt kind and score them.

    prompts: "held-out" (colour/shape combinations the shapes data set never shows in training), "seen" (its
        training distribution) or "any". Image i uses seed `seed + i`; the prompts come from their own seed stream.
    phrasing: "canonical" wording or "paraphrased" (module docstring; the same specs either way).
    settings: other generation settings (GenerationRequest's fields, e.g. sigmas or schedule_type).
    """
    check_choice("prompts", prompts, HELD_OUT_CHOICES)
    check_choice("phrasing", phrasing, PHRASINGS)
    check_int("batch_size", batch_size, low=1)
    config = shapes_config or ShapesConfig()
    specs = evaluation_prompts(config, per_kind=per_kind, seed=seed, held_out=HELD_OUT_CHOICES[prompts])
    if phrasing == "canonical":
        captions = [spec.caption for spec in specs]
    else:
        wording = np.random.default_rng([seed, PARAPHRASE_STREAM])
        captions = [spec.paraphrase(wording) for spec in specs]
    size = pipe.model.config.image_size
    start = time.perf_counter()
    images, seeds = [], []
    for first in range(0, len(captions), batch_size):
        chunk = captions[first : first + batch_size]
        result = pipe(chunk, steps=steps, sampler=sampler, guidance_scale=guidance_scale, seed=seed + first,
                      width=size, height=size, **settings)
        images += result.images
        seeds += result.seeds
    seconds = time.perf_counter() - start
    settings = {"per_kind": per_kind, "prompts": prompts, "phrasing": phrasing, "seed": seed, "steps": steps,
                "sampler": sampler, "guidance_scale": guidance_scale, "size": size, **settings}
    return AdherenceResult(evaluate_batch(images, captions), captions, seeds, images, settings, seconds)
