"""What one garbage collection costs in a server process with a model loaded, plain and after gc.freeze() (what
kedavra serve's worker does after each job: kedavra.serving.worker.Worker._collect).

    .venv/bin/python scripts/gc_cost.py [--model kedavra-shapes]

docs/serving.md quotes a run.
"""

from __future__ import annotations

import argparse
import gc
import time

import kedavra
import kedavra.serving.app  # noqa: F401  (the server's modules loaded too, as in kedavra serve)

REPEATS = 5


def collection_seconds() -> float:
    start = time.perf_counter()
    for _ in range(REPEATS):
        gc.collect()
    return (time.perf_counter() - start) / REPEATS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="kedavra-shapes")
    args = parser.parse_args()
    pipe = kedavra.load(args.model)
    pipe("a red circle", steps=2)  # one job's worth of caches
    tracked = len(gc.get_objects())
    plain = collection_seconds()
    gc.freeze()
    frozen = collection_seconds()
    print(f"{tracked} tracked objects; gc.collect(): {plain * 1e3:.1f} ms plain, {frozen * 1e3:.3f} ms after "
          f"gc.freeze() ({plain / frozen:.0f}x)")


if __name__ == "__main__":
    main()
