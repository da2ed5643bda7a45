"""Checkpoint errors, and the helper that words their messages (the file's path first)."""

from pathlib import Path


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and what is wrong with it."""


class UnsafeCheckpointError(CheckpointError):
    """A pickled checkpoint that names code to run; refused without running it."""


def _fail(path: Path, message: str, error: type[CheckpointError] = CheckpointError) -> CheckpointError:
    return error(f"{path}: {message}")
