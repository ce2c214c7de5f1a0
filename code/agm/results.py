"""The book's results table: every registered generative model, read from its verified manifest.

`python -m agm train NAME` stores the metrics kit's numbers (on 10 000 samples) in the manifest,
together with the sha256 of the classifier that computed them; a table built from manifests whose
classifier differs from the shipped one would mix two rulers, so it is refused.
"""

from __future__ import annotations

import pandas as pd

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
        if not spec.generative or checkpoint.status(name) != "verified":
            continue
        m = checkpoint.read_manifest(name)
        used = m.metrics.get("metrics_classifier_sha256")
        if used != classifier_sha256 or checkpoint.stale_requirements({"classifier": str(used)}):
            raise StaleMetricsError(
                f"{name}: its manifest's metrics were computed with classifier {str(used)[:12]}…, not the "
                f"shipped {classifier_sha256[:12]}…; recompute them with `python -m agm train {name}`"
            )
        row = {"model": name, "chapter": spec.chapter}
        row |= {label: m.metrics.get(key, float("nan")) for key, label in COLUMNS.items()}
        if "full_test_nll_nats" in m.metrics:  # `evaluate NAME --full`: the whole test set, more samples
            row[COLUMNS["test_nll_nats"]] = m.metrics["full_test_nll_nats"]
        row["training time (min)"] = m.wall_time_s / 60
        rows.append(row)
    return rows


def results_table(floor: dict[str, float] | None = None) -> pd.DataFrame:
    """One row per generative model (by chapter), and the real-data floor first if given."""
    from agm.metrics import classifier

    rows = model_rows(classifier()[1])
    if floor is not None:
        rows.insert(0, {"model": "real training images", "chapter": float("nan")}
                    | {label: floor.get(key, float("nan")) for key, label in COLUMNS.items()})
    table = pd.DataFrame(rows).set_index("model")
    return table.astype({"chapter": "Int64", COLUMNS["n_samples"]: "Int64", COLUMNS["sample_steps"]: "Int64"})
