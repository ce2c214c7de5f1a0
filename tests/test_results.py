import json
import shutil

import pytest

from agm import checkpoint, metrics
from agm.results import StaleMetricsError, results_table
from agm.runtime import checkpoint_dir


def test_table_has_every_generative_model_and_the_floor():
    table = results_table(floor={"fid": 0.1, "n_samples": 10})
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
