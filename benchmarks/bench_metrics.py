"""Time the metrics kit on 10 000 samples once the test-set statistics are cached.

    python benchmarks/bench_metrics.py [--n 10000]
"""

import argparse
import time

import torch

from agm import metrics
from agm.data import mnist
from agm.runtime import hardware, set_threads


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    set_threads()
    metrics.reference_stats()  # computed once per classifier, then read from data/cache
    x, _ = mnist("trainval")
    images = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[: args.n]]
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        result = metrics.sample_metrics(images)
        times.append(time.perf_counter() - start)
    print(f"{hardware()}; n = {args.n}: best {min(times):.1f} s, median {sorted(times)[len(times) // 2]:.1f} s")
    print(result)


if __name__ == "__main__":
    main()
