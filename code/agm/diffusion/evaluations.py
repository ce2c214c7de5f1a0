"""The sampler measurements of Chapters 31, 32 and 40, run by ``python -m agm evaluate ddpm --full``.

Every cell — one sampler setting at one seed — draws :data:`N_SAMPLES` images and scores them with the
metrics kit; the same n in every cell, beside the real-data reference at that n. A 1000-step cell
takes about half an hour on 2 CPU cores, so the table is filled incrementally: each cell is written
to the model's manifest as soon as it is done, cells already there are skipped, and an interrupted
run resumes where it stopped. :func:`table` reads the cells back as mean and standard deviation over
seeds.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from agm import checkpoint
from agm.diffusion import ddpm
from agm.metrics import real_reference, sample_metrics
from agm.runtime import budget

N_SAMPLES = 1000
SEEDS = (0, 1, 2)
KEY = "sampler_cells"  # where the cells live in the manifest's metrics
KIT = ("fid", "inception_score", "precision", "recall")


@dataclass(frozen=True)
class Setting:
    """One sampler configuration: a row of the tables."""

    sampler: str
    steps: int
    clip_denoised: bool | None = None  # None: the sampler's own default
    eta: float = 0.0

    @property
    def key(self) -> str:
        clip = {None: "", True: "-clip", False: "-noclip"}[self.clip_denoised]
        eta = f"-eta{self.eta:g}" if self.sampler == "ddim" else ""
        return f"{self.sampler}{eta}-{self.steps}{clip}"

    def options(self) -> dict:
        options = {"sampler": self.sampler, "steps": self.steps, "clip_denoised": self.clip_denoised}
        return options | ({"eta": self.eta} if self.sampler == "ddim" else {})


# Chapter 31-32: clipping x̂_0 and the chain, at the reference's two step counts
CLIPPING = [Setting("ancestral", s, c) for s in (50, 1000) for c in (True, False)] + \
           [Setting("ddim", 50, c) for c in (True, False)]
# Chapter 40: FID against steps for DDIM's eta, and DPM-Solver++ beside it
STEPS = [Setting("ddim", s, None, eta) for eta in (0.0, 0.5, 1.0) for s in (10, 20, 50, 100, 1000)] + \
        [Setting("dpmsolver++", s) for s in (10, 20, 50)]


def plan(settings: list[Setting], seeds=SEEDS) -> list[tuple[Setting, int]]:
    """The cells of ``settings`` x ``seeds``, cheapest first, each setting once."""
    unique = list({s.key: s for s in settings}.values())
    return sorted(((s, seed) for s in unique for seed in seeds), key=lambda c: (c[0].steps, c[1], c[0].key))


def measure(model: nn.Module, setting: Setting, seed: int, n: int) -> dict[str, float]:
    """One cell: the kit on n samples of ``setting`` drawn from seed ``seed``, with the time they took."""
    start = time.perf_counter()
    images = ddpm.sample(model, n, torch.Generator().manual_seed(seed), **setting.options())
    seconds = time.perf_counter() - start
    return {**sample_metrics(images), "seconds": seconds, "images_per_s": n / seconds}


def fill(name: str, model: nn.Module, settings: list[Setting], seeds=SEEDS, n: int | None = None,
         log: Callable[[str], None] = print) -> dict[str, dict]:
    """Measure every cell that the manifest of ``name`` does not hold yet, storing each when done."""
    n = n or budget(N_SAMPLES, 200)
    cells = dict(checkpoint.read_manifest(name).metrics.get(KEY, {}))
    if "reference" not in cells or cells["reference"]["n_samples"] != n:
        cells = {"reference": real_reference(n)}  # another n: the old cells do not compare; start again
    for setting, seed in plan(settings, seeds):
        cell = f"{setting.key}/seed{seed}"
        if cell in cells:
            continue
        log(f"{name}: {cell} ({n} samples) ...")
        cells[cell] = measure(model, setting, seed, n)
        checkpoint.update_metrics(name, {KEY: cells})
        log(f"{name}: {cell}: FID {cells[cell]['fid']:.2f} in {cells[cell]['seconds']:.0f} s")
    return cells


def table(cells: dict[str, dict], settings: list[Setting]) -> list[dict]:
    """Rows of mean and standard deviation over the seeds measured, per setting (missing ones say so)."""
    rows = []
    for s in settings:
        done = [v for k, v in cells.items() if k.split("/")[0] == s.key]
        row = {"setting": s.key, "sampler": s.sampler, "steps": s.steps, "eta": s.eta, "clip": s.clip_denoised,
               "seeds": len(done)}
        for m in (*KIT, "images_per_s"):
            values = [d[m] for d in done]
            row[m] = statistics.fmean(values) if values else None
            row[f"{m}_sd"] = statistics.stdev(values) if len(values) > 1 else None
        rows.append(row)
    return rows


def evaluate_full(model: nn.Module) -> dict:
    """``evaluate ddpm --full``: the clipping table first (Chapters 31-32), then the steps table (Chapter 40)."""
    return {KEY: fill("ddpm", model, CLIPPING + STEPS)}
