"""Every registered model, end to end at smoke budgets: train, sample (if it draws images), evaluate."""

import shutil

import pytest
import torch

from agm import checkpoint, registry
from agm.cli import main
from agm.runtime import checkpoint_dir

SPECS = registry.all_specs()
# parents whose shipped checkpoints are too large for smoke budgets: from the shipped ar-transformer (width 128,
# 4 layers) each fine-tune of Chapters 50-55 took 14-33 s of one core here, from a smoke-size one 3-4 s
SMALL_PARENTS = {"ar-transformer"}


def ancestors(name: str) -> set[str]:
    """The checkpoints ``name`` is built on, directly or through its parents."""
    return {a for parent in SPECS[name].requires for a in {parent, *ancestors(parent)}}


def built_on_small_parent(name: str) -> bool:
    """Whether ``name`` is a small parent or is trained on one (then its shipped checkpoint pins another parent)."""
    return name in SMALL_PARENTS or any(built_on_small_parent(p) for p in SPECS[name].requires)


def copy_parents(name: str, folder, smoke_parents) -> None:
    """Put the metrics' classifier and every ancestor of ``name`` in ``folder``: those built on a small parent as
    ``smoke_parents`` trains them, the others as shipped."""
    for parent in {"classifier", *ancestors(name)} - {name}:
        source = smoke_parents(parent) if built_on_small_parent(parent) else checkpoint_dir()
        if source != folder:
            for suffix in (".pt", ".json"):
                shutil.copy(source / f"{parent}{suffix}", folder / f"{parent}{suffix}")


@pytest.fixture(scope="session")
def smoke_parents(tmp_path_factory):
    """``smoke_parents(NAME)``: a folder holding NAME as ``train NAME --smoke`` writes it, trained once per session
    when first asked for, on its ancestors in the same folder and evaluated against them."""
    folder = tmp_path_factory.mktemp("smoke-parents")

    def build(name: str):
        if checkpoint.status(name, folder) != "verified":
            copy_parents(name, folder, build)
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("AGM_CHECKPOINTS", str(folder))
                assert main(["train", name, "--smoke", "--out-dir", str(folder)]) == 0
        return folder

    return build


@pytest.mark.parametrize("name", sorted(SPECS))
def test_train_sample_evaluate(name, tmp_path, monkeypatch, capsys, smoke_parents):
    spec = SPECS[name]
    monkeypatch.setenv("AGM_SMOKE", "1")  # sample and evaluate at smoke budgets too, not only train
    copy_parents(name, tmp_path, smoke_parents)  # the metrics' classifier and the model's ancestors
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
