"""Fixtures shared by test modules: the tiny reference models (tests/reference_models.py) and their original-layout
file, built once per module that asks for them."""

from reference_models import tiny_file, tiny_refs

__all__ = ["tiny_file", "tiny_refs"]
