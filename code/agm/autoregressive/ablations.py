"""The token transformer's ablations at one small budget: Chapter 46 (normalization and residual
connections) and Chapter 47 (positional embeddings).

Every variant is the same small model, data, seed and optimizer as the baseline (pre-LN, residual
connections, learned positions) with one setting changed. Each run stores its exact test NLL, its
training curve and its wall time in the manifest of ``ar-transformer`` (``evaluate ar-transformer
--full``), one cell at a time, so an interrupted evaluation resumes where it stopped. The pages read
the cells; no weights are kept.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable

from agm import checkpoint
from agm.autoregressive.ar_transformer import ARConfig, ar_training, fit, test_nll
from agm.nn import parameter_count
from agm.runtime import budget

KEY = "ablations"
MODEL = {"width": 64, "layers": 6, "heads": 4}  # deeper than wide: normalization matters more with depth
STEPS = 1500  # about seven minutes on one CPU thread
TEST_IMAGES = 2000  # the first 2 000 binarized test images
SEEDS = (0, 1, 2)
VARIANTS: dict[str, dict] = {
    "pre-LN": {},  # the baseline: x + f(LN(x)), learned positions
    "post-LN": {"norm": "post"},  # LN(x + f(x)), Vaswani et al. (2017)
    "no residual": {"residual": False},  # pre-LN blocks without their skip connections
    "sinusoidal": {"positions": "sinusoidal"},
    "2-D": {"positions": "2d"},  # a row and a column embedding, added
    "rotary": {"positions": "rotary"},
    "none": {"positions": "none"},  # the causal mask alone tells a token where it is
}
CHAPTER_VARIANTS = {46: ("pre-LN", "post-LN", "no residual"),
                    47: ("pre-LN", "sinusoidal", "2-D", "rotary", "none")}


def variant_config(name: str, seed: int = 0, steps: int | None = None) -> ARConfig:
    """The baseline's configuration with variant ``name``'s change, trained for ``steps`` (default: STEPS,
    under the runtime's budget) with warm-up over the first tenth."""
    if name not in VARIANTS:
        raise KeyError(f"unknown variant {name!r}; choose one of {', '.join(VARIANTS)}")
    steps = steps or budget(STEPS, 20)
    train = dataclasses.replace(ar_training(steps, warmup_steps=steps // 10).budgeted(seed), steps=steps)
    return ARConfig(**MODEL, **VARIANTS[name], train=train)


def run(name: str, seed: int = 0, steps: int | None = None, n_test: int | None = None, log=print) -> dict:
    """Train variant ``name`` and measure it: test NLL, the training curve (every 50 steps), seconds."""
    return run_config(variant_config(name, seed, steps), n_test=n_test, log=log)


def run_config(config, model_class=None, n_test: int | None = None, log=print) -> dict:
    """Train the token model of ``config`` (a transformer, or ``model_class``) and measure it as a cell: test NLL on
    the first ``n_test`` test images (default TEST_IMAGES), the training curve (every 50 steps), seconds."""
    start = time.perf_counter()
    model, history = fit(config, log=log, log_every=50, model_class=model_class)
    seconds = time.perf_counter() - start
    report = test_nll(model, n=n_test or budget(TEST_IMAGES, 100))
    return {"test_nll_nats": report["test_nll_nats"], "test_nll_n": report["test_nll_n"], "seconds": seconds,
            "steps": config.train.steps, "parameters": parameter_count(model),
            "curve": {"step": [h["step"] for h in history], "loss": [h["loss"] for h in history]}}


def fill(name: str = "ar-transformer", variants=tuple(VARIANTS), seeds=SEEDS, steps: int | None = None,
         log: Callable[[str], None] = print) -> dict[str, dict]:
    """Run every (variant, seed) cell the manifest of ``name`` lacks, storing each as it finishes."""
    def measure(variant: str, seed: int) -> Callable[[], dict]:
        def cell() -> dict:
            result = run(variant, seed, steps, log=log)
            log(f"{variant}/seed{seed}: test NLL {result['test_nll_nats']:.2f} nats in {result['seconds']:.0f} s")
            return result
        return cell

    plan = {f"{variant}/seed{seed}": measure(variant, seed) for seed in seeds for variant in variants}
    return checkpoint.fill_cells(name, KEY, plan, log)


def table(cells: dict[str, dict], variants=tuple(VARIANTS)) -> list[dict]:
    """One row per variant: mean and standard deviation of the test NLL over the seeds stored."""
    rows = []
    for variant in variants:
        values = list(by_seed(cells, variant).values())
        rows.append({"variant": variant, "seeds": len(values),
                     "test_nll_nats": statistics.fmean(values) if values else None,
                     "test_nll_sd": statistics.stdev(values) if len(values) > 1 else None})
    return rows


def stored(name: str = "ar-transformer") -> dict[str, dict]:
    """The cells stored so far in the manifest of ``name`` ({} before ``evaluate NAME --full`` has run)."""
    return dict(checkpoint.read_manifest(name).metrics.get(KEY, {}))


def by_seed(cells: dict[str, dict], variant: str, key: str = "test_nll_nats") -> dict[int, float]:
    """``key`` of each stored seed of ``variant``: {seed: value}."""
    return {int(k.rsplit("/seed", 1)[1]): v[key] for k, v in cells.items() if k.rsplit("/seed", 1)[0] == variant}


def paired_difference(cells: dict[str, dict], variant: str, baseline: str = "pre-LN") -> dict:
    """Test NLL of ``variant`` minus that of ``baseline``, seed by seed, over the seeds both have (a seed fixes the
    batches, their binarization and the dropped labels for every variant alike): the mean difference, its
    standard error sd / sqrt(n), n, and whether |mean| exceeds twice the standard error (None below two seeds)."""
    a, b = by_seed(cells, variant), by_seed(cells, baseline)
    diffs = [a[s] - b[s] for s in sorted(set(a) & set(b))]
    # $\bar d = \frac1n\sum_k d_k$, $\mathrm{se} = s_d/\sqrt n$
    mean = statistics.fmean(diffs) if diffs else None
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else None
    return {"seeds": len(diffs), "difference": mean, "se": se, "resolved": None if se is None else abs(mean) > 2 * se}
