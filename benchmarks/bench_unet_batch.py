"""Time the shipped ddpm's network on one batch of noisy images, called whole and in pieces.

Sampling calls the network once a step on every image of a batch (``ddpm.sample`` draws 500 at a time).
Without gradients, ``DDPM.forward`` splits a batch larger than ``EVAL_CHUNK`` into pieces of that size: the
output is the same to float rounding (bit for bit on one thread), and this script measures what the split
buys. It reports the time per image of each piece size, best and median over the repeats, and the largest
difference from the whole batch's output.

    python benchmarks/bench_unet_batch.py [--batch 500] [--pieces 500 250 125 50] [--repeats 5]
"""

import argparse
import statistics
import time

import torch

from agm import registry
from agm.diffusion import ddpm
from agm.runtime import hardware, set_threads


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--pieces", type=int, nargs="+", default=[500, 250, ddpm.EVAL_CHUNK, 50])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    set_threads()
    model, _ = registry.load_model("ddpm")
    model.eval()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 1, 28, 28, generator=generator)
    t = torch.randint(0, model.schedule.num_timesteps, (args.batch,), generator=generator)
    results = {}
    with torch.no_grad():
        whole = model.net(x, t)
        for piece in args.pieces:
            def call():
                return torch.cat([model.net(x[i : i + piece], t[i : i + piece]) for i in range(0, args.batch, piece)])

            difference = (call() - whole).abs().max().item()  # also the warm-up
            assert difference < 1e-5, f"pieces of {piece} changed the output by {difference:.1e}"
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                call()
                times.append(time.perf_counter() - start)
            results[piece] = times, difference
    print(f"{hardware()}; a batch of {args.batch} images, {args.repeats} repeats; the sampler uses pieces of "
          f"{ddpm.EVAL_CHUNK}")
    print(f"{'piece':>6} {'best (ms/image)':>16} {'median (ms/image)':>18} {'max |difference|':>17}")
    for piece, (times, difference) in results.items():
        best, median = (1000 * f(times) / args.batch for f in (min, statistics.median))
        print(f"{piece:>6} {best:>16.2f} {median:>18.2f} {difference:>17.1e}")


if __name__ == "__main__":
    main()
