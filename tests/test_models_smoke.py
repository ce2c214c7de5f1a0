"""Every registered model, end to end at smoke budgets: train, sample (if it draws images), evaluate."""

import shutil

import pytest
import torch

from agm import checkpoint, registry
from agm.cli import main
from agm.runtime import checkpoint_dir

SPECS = registry.all_specs()


@pytest.mark.parametrize("name", sorted(SPECS))
def test_train_sample_evaluate(name, tmp_path, monkeypatch, capsys):
    spec = SPECS[name]
    monkeypatch.setenv("AGM_SMOKE", "1")  # sample and evaluate at smoke budgets too, not only train
    for parent in {"classifier", *spec.requires} - {name}:  # the metrics' classifier and declared parents
        for suffix in (".pt", ".json"):
            shutil.copy(checkpoint_dir() / f"{parent}{suffix}", tmp_path / f"{parent}{suffix}")
    assert main(["train", name, "--smoke", "--out-dir", str(tmp_path)]) == 0
    manifest = checkpoint.read_manifest(name, tmp_path)
    assert manifest.command == f"python -m agm train {name} --smoke" and manifest.steps >= 1
    assert set(manifest.requires) == set(spec.requires)
    monkeypatch.setenv("AGM_CHECKPOINTS", str(tmp_path))
    out = tmp_path / "samples.pt"
    if spec.generative:
        assert main(["sample", name, "--n", "3", "--seed", "1", "--out", str(out)]) == 0
        images = torch.load(out, weights_only=True)["images"]
        assert images.shape == (3, 1, 28, 28) and 0 <= images.min() and images.max() <= 1
        if not spec.conditional:
            assert main(["sample", name, "--n", "3", "--label", "1", "--out", str(out)]) == 2
    else:
        assert main(["sample", name, "--n", "3", "--out", str(out)]) == 2
        assert "nothing to sample" in capsys.readouterr().err
    assert main(["evaluate", name, "--json", "--n", "200"]) == 0
