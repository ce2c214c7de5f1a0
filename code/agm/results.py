"""The book's results table: every registered generative model, read from its verified manifest.

`python -m agm train NAME` stores the metrics kit's numbers (on 10 000 samples) in the manifest,
together with the sha256 of the classifier that computed them; a table built from manifests whose
classifier differs from the shipped one would mix two rulers, so it is refused.
"""

from __future__ import annotations

import pandas as pd
import torch

from agm import checkpoint, registry

COLUMNS = {
    "fid": "FID (MNIST classifier)",
    "inception_score": "IS",
    "precision": "precision",
    "recall": "recall",
    "class_coverage": "class coverage",
    "test_nll_nats": "test NLL (nats)",
    "bits_per_dim": "test bits/dim (bound)",
    "n_samples": "n",
    "sample_steps": "sampling steps",
}


class StaleMetricsError(RuntimeError):
    """A manifest's metrics were computed with another classifier than the shipped one."""


def model_rows(classifier_sha256: str) -> list[dict]:
    rows = []
    for name, spec in registry.all_specs().items():
        if not spec.generative or not spec.kit or checkpoint.status(name) != "verified":
            continue
        m = checkpoint.read_manifest(name)
        used = m.metrics.get("metrics_classifier_sha256")
        if used != classifier_sha256 or checkpoint.stale_requirements({"classifier": str(used)}):
            raise StaleMetricsError(
                f"{name}: its manifest's metrics were computed with classifier {str(used)[:12]}…, not the "
                f"shipped {classifier_sha256[:12]}…; recompute them with `python -m agm train {name}`"
            )
        row = {"model": name, "chapter": spec.chapter, "samples": spec.samples}
        row |= {label: m.metrics.get(key, float("nan")) for key, label in COLUMNS.items()}
        if "full_test_nll_nats" in m.metrics:  # `evaluate NAME --full`: the whole test set, more samples
            row[COLUMNS["test_nll_nats"]] = m.metrics["full_test_nll_nats"]
        row["training time (min)"] = m.wall_time_s / 60
        rows.append(row)
    return rows


def results_table(reference: dict[str, float] | None = None, extra_rows: list[dict] = ()) -> pd.DataFrame:
    """One row per generative model (by chapter), then ``extra_rows``; the real-data reference first if given."""
    from agm.metrics import classifier

    rows = model_rows(classifier()[1]) + list(extra_rows)
    rows.sort(key=lambda row: (row["chapter"], row["model"].removesuffix(" (binary draws)"), row["model"]))
    if reference is not None:
        rows.insert(0, {"model": "real training images", "chapter": float("nan"), "samples": "gray levels"}
                    | {label: reference.get(key, float("nan")) for key, label in COLUMNS.items()})
    table = pd.DataFrame(rows).set_index("model")
    return table.astype({"chapter": "Int64", COLUMNS["n_samples"]: "Int64", COLUMNS["sample_steps"]: "Int64"})


def draws_binary(spec: registry.ModelSpec) -> bool:
    """Whether the model's sampler can return one Bernoulli draw of its pixel probabilities (``mean=False``)."""
    import inspect

    return spec.sample is not None and "mean" in inspect.signature(spec.sample).parameters


def binary_draw_rows(n: int, seed: int = 0) -> list[dict]:
    """The kit on ``n`` binary draws of every model that samples gray decoder means by default.

    Its stored metrics measure the means; these rows measure what the Bernoulli models of Chapter 1 are
    measured on, so the two kinds of model can be compared like with like.
    """
    from agm.metrics import sample_metrics
    from agm.runtime import seed_everything

    rows = []
    for name, spec in registry.all_specs().items():
        if not draws_binary(spec) or checkpoint.status(name) != "verified":
            continue
        model, _ = registry.load_model(name)
        seed_everything(seed)
        with torch.no_grad():
            images = spec.sample(model, n, torch.Generator().manual_seed(seed), None, mean=False)
        metrics = sample_metrics(images.float().cpu()) | {"n_samples": n}
        rows.append({"model": f"{name} (binary draws)", "chapter": spec.chapter, "samples": "binary draws"}
                    | {label: metrics.get(key, float("nan")) for key, label in COLUMNS.items()})
    return rows


@torch.no_grad()
def sample_grids(n: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """``n`` samples of every verified generative model, drawn as its metrics draw them: name -> [n, 1, 28, 28]."""
    grids = {}
    for name, spec in registry.all_specs().items():
        if not spec.generative or not spec.kit or checkpoint.status(name) != "verified":
            continue
        model, _ = registry.load_model(name)
        options = spec.metric_sample_options() if spec.metric_sample_options else {}
        labels = torch.arange(n) % spec.num_classes if spec.conditional else None
        grids[name] = spec.sample(model, n, torch.Generator().manual_seed(seed), labels, **options).clamp(0, 1).cpu()
    return grids
