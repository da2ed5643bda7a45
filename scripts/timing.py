"""The timing rule the benchmark scripts share: best of `repeats` runs after one warm-up run."""

from __future__ import annotations

import time


def best_time(run, repeats: int) -> float:
    """Seconds of the fastest of `repeats` calls of run(), after one untimed call (oneDNN primitive creation,
    ncnn's pipeline set-up and the like happen on the first call)."""
    return min(run_times(run, repeats))


def run_times(run, repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls of run(), after one untimed warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times
