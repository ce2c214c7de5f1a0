import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from agm import checkpoint
from agm.cli import main
from agm.runtime import checkpoint_dir


@pytest.fixture
def trained(tmp_path, monkeypatch):
    """Smoke-trained Chapter 1 models in a private checkpoint folder."""
    shipped = checkpoint_dir()
    monkeypatch.setenv("AGM_CHECKPOINTS", str(tmp_path / "ckpt"))
    (tmp_path / "ckpt").mkdir()
    for f in ("classifier.pt", "classifier.json"):  # the metrics kit's ruler
        shutil.copy(shipped / f, tmp_path / "ckpt" / f)
    for name in ("bernoulli", "bernoulli-mixture"):
        assert main(["train", name, "--smoke", "--out-dir", str(tmp_path / "ckpt")]) == 0
    return tmp_path


def test_data_reports_verified_files(capsys):
    assert main(["data"]) == 0
    assert "verified" in capsys.readouterr().out


def test_list_shows_every_model_and_its_checkpoint(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "bernoulli-mixture" in out and "verified" in out and "test_nll_nats" in out


def test_train_smoke_writes_checkpoint_and_manifest(trained):
    assert os.environ.get("AGM_SMOKE") in (None, "", "0")  # --smoke does not leak into the caller
    manifest = checkpoint.read_manifest("bernoulli-mixture", trained / "ckpt")
    assert manifest.command == "python -m agm train bernoulli-mixture --smoke"
    assert manifest.steps == manifest.config["iterations"] and manifest.wall_time_s > 0
    assert manifest.metrics["test_nll_nats"] > 0
    assert checkpoint.status("bernoulli-mixture", trained / "ckpt") == "verified"


def test_sample_writes_the_documented_format(trained, capsys):
    out, png = trained / "s.pt", trained / "s.png"
    assert main(["sample", "bernoulli-mixture", "--n", "10", "--seed", "3", "--out", str(out), "--png", str(png)]) == 0
    samples = torch.load(out, weights_only=True)
    assert set(samples) == {"images"}
    images = samples["images"]
    assert images.shape == (10, 1, 28, 28) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    assert png.stat().st_size > 0
    main(["sample", "bernoulli-mixture", "--n", "10", "--seed", "3", "--out", str(trained / "t.pt")])
    assert torch.equal(torch.load(trained / "t.pt", weights_only=True)["images"], images)


def test_evaluate_json_reports_likelihood_and_the_kit(trained, capsys):
    assert main(["evaluate", "bernoulli", "--json", "--n", "300"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["test_nll_nats"] > 0 and metrics["test_bits_per_dim"] > 0
    assert metrics["n_samples"] == 300 and metrics["fid"] > 0 and 0 <= metrics["precision"] <= 1
    manifest = checkpoint.read_manifest("bernoulli", trained / "ckpt")
    assert manifest.metrics["metrics_classifier_sha256"] == metrics["metrics_classifier_sha256"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["sample", "no-such-model", "--n", "4", "--out", "x.pt"], "unknown model 'no-such-model'"),
        (["sample", "bernoulli", "--n", "0", "--out", "x.pt"], "--n must be between"),
        (["sample", "bernoulli", "--n", "4", "--label", "3", "--out", "x.pt"], "not class-conditional"),
        (["sample", "cgan", "--n", "4", "--label", "10", "--out", "x.pt"], "--label must be in 0..9, got 10"),
        (["sample", "ddpm-cfg", "--n", "4", "--label", "-1", "--out", "x.pt"], "--label must be in 0..9, got -1"),
        (["sample", "bernoulli", "--n", "4", "--out", "no/such/dir/x.pt"], "does not exist"),
        (["train", "no-such-model"], "unknown model"),
        (["evaluate", "no-such-model"], "unknown model"),
        (["evaluate", "bernoulli", "--n", "1"], "--n must be between"),
        (["evaluate", "bernoulli", "--n", "100"], "--n must be between 129"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_a_diverged_training_run_stops_with_one_line_and_leaves_the_checkpoint_on_disk(trained, monkeypatch, capsys):
    from agm import registry
    from agm.train import check_finite

    def diverge(seed, parents):  # the training loops' own check, on a loss that came out NaN at step 3
        check_finite(torch.tensor(float("nan")), "bernoulli-mixture", step=3)

    monkeypatch.setattr(registry.get("bernoulli-mixture"), "train", diverge)
    pt, js = checkpoint.paths("bernoulli-mixture")
    before = pt.read_bytes(), js.read_bytes()
    assert main(["train", "bernoulli-mixture"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: bernoulli-mixture: loss is nan at step 3") and err.count("\n") == 1
    assert (pt.read_bytes(), js.read_bytes()) == before and checkpoint.status("bernoulli-mixture") == "verified"


def test_unknown_sample_option_is_rejected():
    with pytest.raises(SystemExit) as e:
        main(["sample", "bernoulli", "--n", "4", "--out", "x.pt", "--guidance", "3"])
    assert e.value.code == 2


def test_missing_checkpoint_names_the_training_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AGM_CHECKPOINTS", str(tmp_path))
    assert main(["sample", "bernoulli", "--n", "4", "--out", str(tmp_path / "x.pt")]) == 1
    assert "python -m agm train bernoulli" in capsys.readouterr().err


def test_module_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "agm", "sample", "nope", "--n", "1", "--out", "x.pt"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: unknown model")


def test_train_seed_reaches_the_model_and_the_manifest(tmp_path):
    assert main(["train", "bernoulli-mixture", "--smoke", "--seed", "1", "--out-dir", str(tmp_path)]) == 0
    manifest = checkpoint.read_manifest("bernoulli-mixture", tmp_path)
    assert manifest.config["seed"] == 1 and manifest.command.endswith("--smoke --seed 1")


def test_evaluate_store_writes_what_train_writes_and_drops_stale_sampler_options(trained, monkeypatch, capsys):
    from agm.cli import all_metrics
    from agm.registry import get, load_model

    monkeypatch.setenv("AGM_SMOKE", "1")  # the default n of the smoke budget
    checkpoint.update_metrics("bernoulli-mixture", {"fid": -1.0, "sample_sampler": "old"})
    before = checkpoint.read_manifest("bernoulli-mixture")
    assert main(["evaluate", "bernoulli-mixture", "--store"]) == 0
    after = checkpoint.read_manifest("bernoulli-mixture")
    expected = all_metrics(get("bernoulli-mixture"), load_model("bernoulli-mixture")[0])
    timing = {"samples_per_s"}  # the one entry that is not a function of the seed
    assert {k: v for k, v in after.metrics.items() if k not in timing} == {
        k: v for k, v in expected.items() if k not in timing}
    assert after.metrics["fid"] > 0 and "sample_sampler" not in after.metrics
    assert after.sha256 == before.sha256 and checkpoint.status("bernoulli-mixture") == "verified"
    assert main(["evaluate", "bernoulli-mixture", "--store", "--n", "300"]) == 2
    assert "drop --n" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --store and --full are two different writes
        main(["evaluate", "bernoulli-mixture", "--store", "--full"])


def test_evaluate_full_stores_its_metrics_in_the_manifest(trained, monkeypatch, capsys):
    from agm import registry

    spec = registry.get("bernoulli-mixture")
    monkeypatch.setattr(spec, "evaluate_full", lambda model: {"full_probe": 1.5})
    before = checkpoint.read_manifest("bernoulli-mixture")
    assert main(["evaluate", "bernoulli-mixture", "--full"]) == 0
    after = checkpoint.read_manifest("bernoulli-mixture")
    assert after.metrics == before.metrics | {"full_probe": 1.5} and after.sha256 == before.sha256
    assert checkpoint.status("bernoulli-mixture") == "verified"
    assert main(["evaluate", "bernoulli", "--full"]) == 2
    assert "no --full evaluation" in capsys.readouterr().err
