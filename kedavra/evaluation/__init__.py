"""Scoring generated images (a layer on top of the core; the core never imports it).

    shapes_eval   does an image match its shapes prompt? GenEval's categories by classical vision
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
