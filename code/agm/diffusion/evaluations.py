"""The sampler measurements of Chapters 31, 32 and 40, run by ``python -m agm evaluate ddpm --full``.

Every cell — one sampler setting at one seed — draws :data:`N_SAMPLES` images and scores them with the
metrics kit; the same n in every cell, beside the real-data reference at that n. A 1000-step cell
takes about half an hour on 2 CPU cores, so the table is filled incrementally: each cell is written
to the model's manifest as soon as it is done, cells already there are skipped, and an interrupted
run resumes where it stopped. :func:`table` reads the cells back as mean and standard deviation over
seeds.
"""

from __future__ import annotations

import inspect
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from agm import checkpoint
from agm.diffusion import ddpm
from agm.diffusion.samplers import SAMPLERS
from agm.metrics import classifier_outputs, real_reference, sample_metrics
from agm.runtime import budget

N_SAMPLES = 1000
SEEDS = (0, 1, 2)
KEY = "sampler_cells"  # where the cells live in the manifest's metrics
KIT = ("fid", "inception_score", "precision", "recall")


SAMPLER_NAMES = {"ancestral": "ancestral", "ddim": "DDIM", "dpmsolver++": "DPM-Solver++"}


@dataclass(frozen=True)
class Setting:
    """One sampler configuration: a row of the tables."""

    sampler: str
    steps: int
    clip_denoised: bool | None = None  # None: the sampler's own default
    eta: float = 0.0
    guidance: float | None = None  # classifier-free guidance weight w (ddpm-cfg)
    classifier_scale: float | None = None  # classifier guidance scale s (ddpm steered by noise-classifier)

    @property
    def key(self) -> str:
        clip = {None: "", True: "-clip", False: "-noclip"}[self.clip_denoised]
        eta = f"-eta{self.eta:g}" if self.sampler == "ddim" else ""
        w = "" if self.guidance is None else f"-w{self.guidance:g}"
        scale = "" if self.classifier_scale is None else f"-s{self.classifier_scale:g}"
        return f"{self.sampler}{eta}-{self.steps}{clip}{w}{scale}"

    def _name(self, name: str, eta: str, clip: str) -> str:
        """``name``, then DDIM's η after ``eta`` and the clipping the sampler runs with after ``clip``."""
        eta = f"{eta}η = {self.eta:g}" if self.sampler == "ddim" else ""
        clipping = self.resolved().clip_denoised
        return name + eta + ("" if clipping is None else f"{clip}{'clipped' if clipping else 'unclipped'}")

    @property
    def label(self) -> str:
        """How a table names the setting: 'ancestral, clipped', 'DDIM, η = 0, unclipped'."""
        return self._name(SAMPLER_NAMES.get(self.sampler, self.sampler), ", ", ", ")

    @property
    def phrase(self) -> str:
        """How a sentence names the setting: 'the ancestral sampler, x̂₀ clipped', 'DDIM with η = 0, x̂₀ unclipped'."""
        name = "the ancestral sampler" if self.sampler == "ancestral" else SAMPLER_NAMES.get(self.sampler, self.sampler)
        return self._name(name, " with ", ", x̂₀ ")

    @property
    def conditional(self) -> bool:
        return self.guidance is not None or self.classifier_scale is not None

    def labels(self, n: int) -> torch.Tensor | None:
        """The digits a guided setting requests for n images, 0..9 in turn; None for an unguided one."""
        return torch.arange(n) % 10 if self.conditional else None

    def options(self) -> dict:
        options = {"sampler": self.sampler, "steps": self.steps, "clip_denoised": self.clip_denoised}
        if self.guidance is not None:
            options["guidance"] = self.guidance
        if self.classifier_scale is not None:
            options["classifier_scale"] = self.classifier_scale
        return options | ({"eta": self.eta} if self.sampler == "ddim" else {})

    def resolved(self) -> Setting:
        """The same computation with the sampler's clipping default written out: equal ones share their cells."""
        default = inspect.signature(SAMPLERS[self.sampler]).parameters.get("clip_denoised")
        if self.clip_denoised is None and default is not None:
            return replace(self, clip_denoised=default.default)
        return self


# Chapter 31-32: clipping x̂_0 and the chain, at the reference's two step counts
CLIPPING = [Setting("ancestral", s, c) for s in (50, 1000) for c in (True, False)] + \
           [Setting("ddim", 50, c) for c in (True, False)]
# Chapter 40: FID against steps for DDIM's eta, and DPM-Solver++ beside it. At the full chain of 1000 steps the
# deterministic sampler is measured; DDIM with eta = 1 there is the ancestral chain with the posterior variance
# up to where the clipped x̂_0 enters (Chapter 40), which CLIPPING measures.
STEPS = [Setting("ddim", s, None, eta) for eta in (0.0, 0.5, 1.0) for s in (10, 20, 50, 100)] + \
        [Setting("ddim", 1000, None, 0.0)] + [Setting("dpmsolver++", s) for s in (10, 20, 50)]


def plan(settings: list[Setting], seeds=SEEDS) -> list[tuple[Setting, int]]:
    """The cells of ``settings`` x ``seeds``, cheapest first, each setting once (by its key)."""
    unique = list({s.key: s for s in settings}.values())
    return sorted(((s, seed) for s in unique for seed in seeds), key=lambda c: (c[0].steps, c[1], c[0].key))


def measure(model: nn.Module, setting: Setting, seed: int, n: int,
            classifier: nn.Module | None = None) -> dict[str, float]:
    """One cell: the kit on n samples of ``setting`` drawn from seed ``seed``, with the time they took.

    A guided setting draws the digits 0..9 in turn and also reports ``label_accuracy``, the kit
    classifier's agreement with the requested digit.
    """
    labels = setting.labels(n)
    extra = {"classifier": classifier} if setting.classifier_scale is not None else {}
    start = time.perf_counter()
    images = ddpm.sample(model, n, torch.Generator().manual_seed(seed), labels, **setting.options(), **extra)
    seconds = time.perf_counter() - start
    metrics = {**sample_metrics(images), "seconds": seconds, "images_per_s": n / seconds}
    if labels is not None:
        predicted = classifier_outputs(images)[1].argmax(1)
        metrics["label_accuracy"] = (predicted == labels).float().mean().item()
    return metrics


def chain_seconds(model: nn.Module, setting: Setting, n: int, steps: int, repeats: int = 3) -> float:
    """The best of ``repeats`` timings of ``setting``'s sampler run for ``steps`` steps on n images.

    Every step of a chain is one network call and one update, whatever the chain's length, so a short chain
    timed here prices a long one: a cell's own ``seconds`` also hold whatever else its machine was doing.
    """
    options = setting.options() | {"steps": steps}
    times = []
    for repeat in range(repeats):
        start = time.perf_counter()
        ddpm.sample(model, n, torch.Generator().manual_seed(repeat), setting.labels(n), **options)
        times.append(time.perf_counter() - start)
    return min(times)


def fill(name: str, model: nn.Module, settings: list[Setting], seeds=SEEDS, n: int | None = None,
         log: Callable[[str], None] = print, classifier: nn.Module | None = None) -> dict[str, dict]:
    """Measure every cell that the manifest of ``name`` does not hold yet, storing each when done.

    Two settings that are one computation (:meth:`Setting.resolved`) are measured once: the second
    key gets a copy of the first's cell.
    """
    n = n or budget(N_SAMPLES, 200)

    def stored() -> dict[str, dict]:
        return dict(checkpoint.read_manifest(name).metrics.get(KEY, {}))

    def store(cell: str, result: dict) -> dict[str, dict]:
        # merged into what is stored at this moment: another process may have filled other cells meanwhile
        cells = stored() | {cell: result}
        checkpoint.update_metrics(name, {KEY: cells})
        return cells

    cells = stored()
    if "reference" not in cells or cells["reference"]["n_samples"] != n:
        cells = {"reference": real_reference(n)}  # another n: the old cells do not compare; start again
        checkpoint.update_metrics(name, {KEY: cells})
    measured = {f"{s.resolved().key}/seed{seed}": f"{s.key}/seed{seed}"
                for s, seed in plan(settings, seeds) if f"{s.key}/seed{seed}" in cells}
    for setting, seed in plan(settings, seeds):
        cell, same = f"{setting.key}/seed{seed}", f"{setting.resolved().key}/seed{seed}"
        cells = stored()
        if cell in cells:
            continue
        if same in measured:
            cells = store(cell, cells[measured[same]])
            continue
        measured[same] = cell
        log(f"{name}: {cell} ({n} samples) ...")
        cells = store(cell, measure(model, setting, seed, n, classifier))
        log(f"{name}: {cell}: FID {cells[cell]['fid']:.2f} in {cells[cell]['seconds']:.0f} s")
    return cells


def table(cells: dict[str, dict], settings: list[Setting]) -> list[dict]:
    """Rows of mean and standard deviation over the seeds measured, per setting (missing ones say so)."""
    rows = []
    for s in settings:
        done = [v for k, v in cells.items() if k.split("/")[0] == s.key]
        row = {"setting": s.key, "sampler": s.sampler, "steps": s.steps, "eta": s.eta, "clip": s.clip_denoised,
               "guidance": s.guidance, "classifier_scale": s.classifier_scale, "seeds": len(done)}
        for m in (*KIT, "fid_mean_term", "trace_ratio", "images_per_s", "label_accuracy"):
            values = [d[m] for d in done if m in d]
            row[m] = statistics.fmean(values) if values else None
            row[f"{m}_sd"] = statistics.stdev(values) if len(values) > 1 else None
        rows.append(row)
    return rows


def seed_values(cells: dict[str, dict], setting: Setting, metric: str, seeds=SEEDS) -> list[float]:
    """``metric`` of ``setting`` at each seed, in the order of ``seeds``: the cells behind a row of :func:`table`."""
    return [cells[f"{setting.key}/seed{seed}"][metric] for seed in seeds]


def paired_difference(cells: dict[str, dict], a: Setting, b: Setting, metric: str = "fid",
                      seeds=SEEDS) -> tuple[float, float]:
    """Mean over seeds of ``metric`` of ``a`` minus that of ``b`` at the same seed, and its standard error.

    At one seed two settings start from the same x_T (and, where both draw it, the same noise z), so what is
    common to the seed cancels in the difference and its spread can be smaller than either row's.
    """
    differences = [x - y for x, y in zip(seed_values(cells, a, metric, seeds), seed_values(cells, b, metric, seeds),
                                         strict=True)]
    return statistics.fmean(differences), statistics.stdev(differences) / len(differences) ** 0.5


P_MARK = 0.05  # a paired difference counts as measured when differences without any effect rarely reach it


def paired_tail(mean: float, se: float, seeds: int) -> float:
    """How often differences without any effect give a ratio |mean| / se at least this large: the two-sided tail
    of Student's t with ``seeds`` - 1 degrees of freedom (the standard error is itself estimated from the seeds)."""
    from scipy import stats

    return float(2 * stats.t.sf(abs(mean) / se, seeds - 1)) if se > 0 else float(mean == 0)


def mean_sd(row: dict, metric: str, fmt: str = ".2f", scale: float = 1.0) -> str:
    """'mean ± s.d.' of ``metric`` in a row of :func:`table` (the mean alone where one seed gives no s.d.)."""
    sd = row.get(f"{metric}_sd")
    return f"{scale * row[metric]:{fmt}}" + ("" if sd is None else f" ± {scale * sd:{fmt}}")


def kit_columns(row: dict) -> dict[str, str]:
    """The kit's four columns of a row of :func:`table`, each as 'mean ± s.d.' over the seeds."""
    return {"FID": mean_sd(row, "fid"), "IS": mean_sd(row, "inception_score"),
            "precision": mean_sd(row, "precision", ".3f"), "recall": mean_sd(row, "recall", ".3f")}


def stored_table(name: str, settings: list[Setting], seeds=SEEDS) -> tuple[list[dict], dict]:
    """The rows of :func:`table` from the manifest of ``name``, and the real-data reference at the cells' n.

    Every cell of ``settings`` x ``seeds`` must be there: a missing one is an error naming the command
    that measures it.
    """
    cells = checkpoint.read_manifest(name).metrics.get(KEY, {})
    missing = [f"{s.key}/seed{seed}" for s, seed in plan(settings, seeds) if f"{s.key}/seed{seed}" not in cells]
    if missing:
        raise RuntimeError(f"the manifest of {name} lacks {len(missing)} sampler cells "
                           f"({', '.join(missing[:3])}, ...): run `python -m agm evaluate {name} --full` "
                           "(resumable; it stores each cell when done)")
    return table(cells, settings), cells["reference"]


@torch.no_grad()
def clipping_shift(model: nn.Module, x_T: torch.Tensor, steps: int | None = None,
                   generator: torch.Generator | None = None) -> list[dict[str, float]]:
    r"""What clipping x̂_0 would change at each step of the unclipped ancestral chain from x_T (Chapter 31).

    Per step t -> s (the paper's time index ``t`` + 1 in the rows): ``outside``, the fraction of pixels of x̂_0
    outside [-1, 1]; ``shift``, the root-mean-square over pixels of $\gamma (c - \hat x_0)$, the change of the
    posterior mean that the clipped $c$ makes; ``sigma``, the standard deviation of the step's noise (σ² = β̃).
    """
    from agm.diffusion.samplers import predict_eps, walk

    schedule, rows = model.schedule, []

    def update(x: torch.Tensor, t: int, s: int) -> torch.Tensor:
        x_s, x0_hat = schedule.step(predict_eps(model, x, t, None), t, x, generator, prev_t=s, clip_denoised=False)
        gamma, _, var_tilde, _ = schedule.posterior_coefficients(t, s)
        # the shift of the mean: $\gamma\,(\mathrm{clip}(\hat x_0) - \hat x_0)$
        shift = gamma.item() * (x0_hat.clamp(-1, 1) - x0_hat)
        rows.append({"t": t + 1, "outside": (x0_hat.abs() > 1).float().mean().item(),
                     "shift": shift.pow(2).mean().sqrt().item(), "sigma": var_tilde.sqrt().item() if s >= 0 else 0.0})
        return x_s

    walk(schedule, x_T, steps, update)
    return rows


def clipping_shift_summary(rows: list[dict[str, float]]) -> dict[str, float]:
    """The rows of :func:`clipping_shift` in five numbers: the share outside [-1, 1] at the first and the last step,
    at how many of the steps that draw noise the shift exceeds σ, of how many, and the shift at the last step."""
    noisy = [r for r in rows if r["sigma"] > 0]
    return {"outside_T": rows[0]["outside"], "outside_last": rows[-1]["outside"],
            "shift_over_sigma": sum(r["shift"] > r["sigma"] for r in noisy), "noisy_steps": len(noisy),
            "shift_last": rows[-1]["shift"]}


@torch.no_grad()
def clipping_drift(model: nn.Module, x_T: torch.Tensor, steps=(20, 50, 100), reference_steps: int = 100
                   ) -> list[dict[str, float]]:
    """How far deterministic DDIM (η = 0) with a clipped x̂_0 lands from the unclipped probability-flow ODE's
    solution, from the same x_T, as the chain grows: once with the network's ε kept in the direction term
    (diffusers' default), once with ε re-derived from the clipped x̂_0. The ODE's solution is DPM-Solver++ at
    ``reference_steps``. Distances are root-mean-square over pixels of images clamped to [-1, 1]; ``ink`` is
    the fraction of pixels above the midpoint 0."""
    from agm.diffusion.samplers import ddim_sample, dpm_solver_sample

    schedule = model.schedule
    ode = dpm_solver_sample(model, schedule, x_T, reference_steps).clamp(-1, 1)

    def rms(x: torch.Tensor) -> float:
        return (x.clamp(-1, 1) - ode).pow(2).mean().sqrt().item()

    rows = [{"steps": 0, "variant": "ODE", "rms": 0.0, "ink": (ode > 0).float().mean().item()}]
    for S in steps:
        for variant, rederive in (("eps kept", False), ("eps re-derived", True)):
            x = ddim_sample(model, schedule, x_T, S, eta=0.0, clip_denoised=True, use_clipped_model_output=rederive)
            rows.append({"steps": S, "variant": variant, "rms": rms(x), "ink": (x > 0).float().mean().item()})
        x = ddim_sample(model, schedule, x_T, S, eta=0.0, clip_denoised=False)
        rows.append({"steps": S, "variant": "unclipped", "rms": rms(x), "ink": (x > 0).float().mean().item()})
    return rows


# Chapter 41: the guidance weight of ddpm-cfg, and the scale of classifier guidance on ddpm, with the sweeps' sampler
# and, beside it, the fast solver of Chapter 38 at the same weights (the page compares the two)
GUIDANCE_WEIGHTS = (-1.0, 0.0, 0.5, 1.0, 2.0, 3.0, 4.0)
CLASSIFIER_SCALES = (0.0, 1.0, 2.0, 4.0, 8.0)
GUIDED_SAMPLER = {"sampler": "ancestral", "steps": 50}
SOLVER_SAMPLER = {"sampler": "dpmsolver++", "steps": 20}
CFG = [Setting(**GUIDED_SAMPLER, guidance=w) for w in GUIDANCE_WEIGHTS]
CLASSIFIER = [Setting(**GUIDED_SAMPLER, classifier_scale=s) for s in CLASSIFIER_SCALES]
CFG_SOLVER = [Setting(**SOLVER_SAMPLER, guidance=w) for w in GUIDANCE_WEIGHTS]
CLASSIFIER_SOLVER = [Setting(**SOLVER_SAMPLER, classifier_scale=s) for s in CLASSIFIER_SCALES]
ACCURACY_MARK = 0.99  # the requested-digit accuracy a guidance weight must reach to be chosen


def chosen_weight(rows: list[dict], key: str = "guidance", mark: float = ACCURACY_MARK) -> float:
    """The weight (``key`` of the rows of :func:`table`) with the lowest mean FID among those whose mean
    requested-digit accuracy is at least ``mark``; where none is, the most accurate one."""
    accurate = [r for r in rows if r["label_accuracy"] >= mark]
    if accurate:
        return min(accurate, key=lambda r: r["fid"])[key]
    return max(rows, key=lambda r: r["label_accuracy"])[key]


# Chapter 32: what the network's width and the length of its training buy, each varied alone at a small budget.
# The shipped ddpm (16 channels, 4000 steps) is the third point, measured by the same cell in CLIPPING.
SCALE_KEY = "scale_cells"
SCALE_RUNS = {"channels8-steps1000": (8, 1000), "channels16-steps1000": (16, 1000)}
SCALE_SETTING = Setting("ancestral", ddpm.EVAL_STEPS, False)  # the sampler of the shipped metrics


def scale_config(channels: int, steps: int) -> ddpm.DDPMConfig:
    """The shipped ddpm's configuration with ``channels`` base channels and ``steps`` training steps."""
    from agm.nn.unet import UNetConfig

    return ddpm.DDPMConfig(unet=replace(UNetConfig(), channels=channels),
                           train=replace(ddpm.default_training(), steps=steps))


def scale_run(channels: int, steps: int, log=print) -> dict:
    """Train ``ddpm`` with ``channels`` base channels for ``steps`` steps (everything else as shipped) and measure
    it as the seed-0 cell of :data:`SCALE_SETTING`: the kit on N_SAMPLES samples, with the training seconds."""
    from agm.nn import parameter_count

    config = scale_config(channels, budget(steps, 2))
    start = time.perf_counter()
    model, _, diagnostics = ddpm.fit(config, log=log)
    seconds = time.perf_counter() - start
    cell = measure(model, SCALE_SETTING, 0, budget(N_SAMPLES, 200))
    return {"channels": channels, "steps": config.train.steps, "parameters": parameter_count(model),
            "train_seconds": seconds, "final_loss": diagnostics["history"][-1]["loss"], **cell}


def evaluate_scale(log=print) -> dict:
    """The cells of :data:`SCALE_RUNS`, stored in the ddpm manifest under :data:`SCALE_KEY` as each finishes."""
    import functools

    plan = {key: functools.partial(scale_run, c, s, log=log) for key, (c, s) in SCALE_RUNS.items()}
    return checkpoint.fill_cells("ddpm", SCALE_KEY, plan, log)


def evaluate_full(model: nn.Module) -> dict:
    """``evaluate ddpm --full``: the width and training-length runs (Chapter 32), the clipping table (Chapters
    31-32) and the steps table (Chapter 40)."""
    return {SCALE_KEY: evaluate_scale(), KEY: fill("ddpm", model, CLIPPING + STEPS)}


def evaluate_cfg_full(model: nn.Module) -> dict:
    """``evaluate ddpm-cfg --full``: the sweep over the guidance weight w, with each sampler (Chapter 41)."""
    return {KEY: fill("ddpm-cfg", model, CFG + CFG_SOLVER)}


def evaluate_classifier_guidance_full(classifier: nn.Module) -> dict:
    """``evaluate noise-classifier --full``: ``ddpm`` steered by this classifier over the scale s, with each sampler
    (Chapter 41)."""
    from agm import registry

    model, manifest = registry.load_model("ddpm")
    return {KEY: fill("noise-classifier", model, CLASSIFIER + CLASSIFIER_SOLVER, classifier=classifier),
            "guided_ddpm_sha256": manifest.sha256}
