"""Checks of values that cross a boundary (a call, a flag, a config field, an HTTP field, a file).

Each check returns the value when it is allowed and otherwise raises `ValueError` naming the value and what is
allowed, so an edge reads as a list of checks:

    steps = check_int("steps", steps, low=1, high=1000)
    scale = check_number("guidance_scale", scale, low=0)
    sampler = check_choice("spacing", spacing, SPACINGS)

Python's `bool` is an `int`; here it is never accepted as a number. Inner layers trust what an edge checked and
check nothing again.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection, Iterable


def describe_range(low: float | None, high: float | None) -> str:
    """"from 1 to 20", ">= 0", "<= 1" or "" for the bounds given."""
    if low is not None and high is not None:
        return f"from {low} to {high}"
    if low is not None:
        return f">= {low}"
    if high is not None:
        return f"<= {high}"
    return ""


def is_int(value) -> bool:
    """True for an integer (Python's or numpy's), never for a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(name: str, value, low: int | None = None, high: int | None = None, *,
              multiple_of: int | None = None, note: str = "") -> int:
    """`value` as an int when it is an integer in [low, high] (and a multiple of `multiple_of`), else ValueError.

    note: a few words that say why, put after what is allowed: "a multiple of 8{note} from 8 to 2048"."""
    in_range = is_int(value) and (low is None or value >= low) and (high is None or value <= high)
    if not in_range or (multiple_of is not None and value % multiple_of):
        kind = f"a multiple of {multiple_of}" if multiple_of is not None else "an integer"
        bounds = describe_range(low, high)
        raise ValueError(f"{name} must be {kind}{note}{' ' + bounds if bounds else ''}, got {value!r}")
    return int(value)


def check_optional_int(name: str, value, low: int | None = None, high: int | None = None, *,
                       none_means: str = "") -> int | None:
    """None, or `check_int(name, value, low, high)`; `none_means` says what None stands for in the error."""
    if value is None:
        return None
    if not is_int(value) or (low is not None and value < low) or (high is not None and value > high):
        bounds = describe_range(low, high)
        alternative = f" (or None for {none_means})" if none_means else " or None"
        raise ValueError(f"{name} must be an integer{' ' + bounds if bounds else ''}{alternative}, got {value!r}")
    return int(value)


def check_number(name: str, value, low: float | None = None, high: float | None = None, *,
                 low_inclusive: bool = True) -> float:
    """`value` as a float when it is a finite real number in [low, high] ((low, high] when not low_inclusive)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value >= low if low_inclusive else value > low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        if low is not None and high is not None:  # a closed interval: "finite" goes without saying
            raise ValueError(f"{name} must be a number in {'[' if low_inclusive else '('}{low}, {high}], got {value!r}")
        if low is not None:
            bounds = f" {'>=' if low_inclusive else '>'} {low}"
        else:
            bounds = f" <= {high}" if high is not None else ""
        raise ValueError(f"{name} must be a finite number{bounds}, got {value!r}")
    return float(value)


def finite_float(text: str) -> float | None:
    """The finite number `text` writes (Python's float syntax), or None for anything else (words, inf, nan): for
    numbers inside text, such as a prompt's weights, whose error message the caller words."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def check_bool(name: str, value) -> bool:
    """`value` when it is True or False (not 0, 1 or a string)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_choice(name: str, value, allowed: Collection[str]) -> str:
    """`value` when it is one of `allowed`, else an error listing them."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}")
    return value


def check_text(name: str, value, *, optional: bool = False) -> str | None:
    """`value` when it is a str (or None when optional)."""
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{name} must be text (a str{' or None' if optional else ''}), got {type(value).__name__}")
    return value


def some(names: Iterable, count: int = 5) -> str:
    """The first `count` of `names`, comma-separated, with ", ..." when there are more: for error messages."""
    names = [str(name) for name in names]
    return ", ".join(names[:count]) + (", ..." if len(names) > count else "")


MAX_SEED = 2**32 - 1  # seeds are 32-bit unsigned, as in A1111 and diffusers' examples: one range everywhere


def check_seed(name: str, value, *, optional: bool = False) -> int | None:
    """A seed from 0 to MAX_SEED (or None, for a random one, when optional)."""
    if optional:
        return check_optional_int(name, value, 0, MAX_SEED, none_means="a random one")
    return check_int(name, value, 0, MAX_SEED)


def check_keys(what: str, missing: Iterable, unexpected: Iterable, *, prefix: str = "", hint: str = "") -> None:
    """Refuse a state dict whose keys do not match a model's: ValueError with `what` (e.g. "U-Net state dict does
    not match layout 'ldm' for this config"), how many keys are missing and unexpected, the first few of each, and
    `hint` when an unexpected key starts with `prefix` (a checkpoint whose prefix was left on)."""
    missing, unexpected = list(missing), list(unexpected)
    if not missing and not unexpected:
        return
    message = (f"{what}: {len(missing)} missing keys [{some(missing)}], "
               f"{len(unexpected)} unexpected keys [{some(unexpected)}]")
    if prefix and any(key.startswith(prefix) for key in unexpected):
        message += f"; {hint}"
    raise ValueError(message)
