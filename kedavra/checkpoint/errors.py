"""Checkpoint errors, and the two helpers that word their messages (the file's path first, long lists cut short)."""

from pathlib import Path


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and what is wrong with it."""


class UnsafeCheckpointError(CheckpointError):
    """A pickled checkpoint that names code to run; refused without running it."""


def _fail(path: Path, message: str, error: type[CheckpointError] = CheckpointError) -> CheckpointError:
    return error(f"{path}: {message}")


def _some(names, count: int = 5) -> str:
    names = list(names)
    return ", ".join(names[:count]) + (", ..." if len(names) > count else "")
