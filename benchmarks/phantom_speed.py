"""Time phantom generation and print images per second.

Goal: 1,000 images of 64 x 64 in well under a minute on one core (a few
seconds). The script also times the larger size with fewer images. Usage:
``python benchmarks/phantom_speed.py [--count N] [--size S] [--large-count N] [--large-size S]``.
"""

from __future__ import annotations

import argparse
import time

from xreal.phantom.renderer import generate


def measure(count: int, size: int, repeats: int) -> float:
    """Best wall-clock seconds of `repeats` runs of ``generate(count, size)``."""
    generate(min(count, 4), size, seed=1)
    best = float("inf")
    for repeat in range(repeats):
        started = time.perf_counter()
        generate(count, size, seed=repeat)
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000, help="images at --size (default 1000)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--large-count", type=int, default=100, help="images at --large-size (default 100)")
    parser.add_argument("--large-size", type=int, default=256, help="larger image side (default 256)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per size; the best is reported (default 3)")
    args = parser.parse_args()
    for count, size in ((args.count, args.size), (args.large_count, args.large_size)):
        seconds = measure(count, size, args.repeats)
        print(f"{count:6d} images of {size}x{size}: {seconds:7.2f} s  {count / seconds:8.1f} images/s")


if __name__ == "__main__":
    main()
