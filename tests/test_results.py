import json
import shutil

import pytest
import torch

from agm import checkpoint, metrics
from agm.results import StaleMetricsError, results_table
from agm.runtime import checkpoint_dir


def test_table_has_every_generative_model_and_the_real_data_reference():
    table = results_table(reference={"fid": 0.1, "n_samples": 10})
    assert table.index[0] == "real training images"
    assert {"bernoulli", "bernoulli-mixture"} <= set(table.index)
    assert "classifier" not in table.index
    assert (table.loc["bernoulli-mixture", "FID (MNIST classifier)"] > table.loc["real training images",
                                                                                 "FID (MNIST classifier)"])
    stored = checkpoint.read_manifest("bernoulli").metrics["fid"]
    assert table.loc["bernoulli", "FID (MNIST classifier)"] == stored


def test_metrics_from_another_classifier_are_refused(tmp_path, monkeypatch):
    for f in checkpoint_dir().iterdir():
        shutil.copy(f, tmp_path / f.name)
    manifest = json.loads((tmp_path / "bernoulli.json").read_text())
    manifest["metrics"]["metrics_classifier_sha256"] = "0" * 64
    (tmp_path / "bernoulli.json").write_text(json.dumps(manifest))
    monkeypatch.setenv("AGM_CHECKPOINTS", str(tmp_path))
    with pytest.raises(StaleMetricsError, match="python -m agm train bernoulli"):
        results_table()
    metrics._classifier.cache_clear()


def test_each_decoder_mean_model_gets_a_binary_draw_row():
    from agm import registry
    from agm.results import binary_draw_rows, draws_binary

    rows = {row["model"]: row for row in binary_draw_rows(200)}
    expected = {f"{name} (binary draws)" for name, spec in registry.all_specs().items() if draws_binary(spec)}
    assert set(rows) == expected and {"vae (binary draws)", "vq-vae (binary draws)"} <= expected
    assert all(row["samples"] == "binary draws" and row["n"] == 200 for row in rows.values())
    spec = registry.get("vae")
    draws = spec.sample(registry.load_model("vae")[0], 8, torch.Generator().manual_seed(0), None, mean=False)
    assert set(draws.unique().tolist()) <= {0.0, 1.0}
    table = results_table(extra_rows=list(rows.values()))
    assert list(table.index).index("vae (binary draws)") == list(table.index).index("vae") + 1


def test_sample_grids_hold_every_generative_model_the_kit_measures():
    """Every generator of all ten digits has a grid; the one-digit fine-tunes of Module 6 (``kit=False``) do not."""
    from agm import registry
    from agm.results import sample_grids

    grids = sample_grids(4, seed=1)
    assert set(grids) == {n for n, s in registry.all_specs().items() if s.generative and s.kit}
    assert "ppo" not in grids and "ar-transformer" in grids
    assert all(g.shape == (4, 1, 28, 28) and 0 <= g.min() and g.max() <= 1 for g in grids.values())
