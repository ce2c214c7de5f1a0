import json

import pytest
import torch

from agm import checkpoint
from agm.checkpoint import CheckpointError


def save_example(tmp_path, name="toy"):
    state = {"config": {"width": 3}, "state_dict": {"w": torch.arange(6.0).view(2, 3)}}
    m = checkpoint.new_manifest(name, state["config"], steps=7, wall_time_s=1.234, metrics={"nll": 1.5})
    checkpoint.save(name, state, m, tmp_path)
    return state


def test_round_trip_preserves_weights_and_manifest(tmp_path):
    state = save_example(tmp_path)
    loaded, manifest = checkpoint.load("toy", tmp_path)
    assert torch.equal(loaded["state_dict"]["w"], state["state_dict"]["w"])
    assert loaded["config"] == {"width": 3}
    assert manifest.steps == 7 and manifest.metrics == {"nll": 1.5}
    assert manifest.command == "python -m agm train toy"
    assert manifest.sha256 == checkpoint.sha256_file(tmp_path / "toy.pt")
    assert manifest.hardware and manifest.torch_version == torch.__version__
    assert checkpoint.status("toy", tmp_path) == "verified"


def test_tampered_weights_are_refused_with_the_rebuild_command(tmp_path):
    save_example(tmp_path)
    pt = tmp_path / "toy.pt"
    raw = bytearray(pt.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # flip one byte
    pt.write_bytes(bytes(raw))
    assert checkpoint.status("toy", tmp_path) == "corrupt"
    with pytest.raises(CheckpointError, match=r"corrupt or was modified.*python -m agm train toy"):
        checkpoint.load("toy", tmp_path)


def test_missing_checkpoint_names_the_command(tmp_path):
    assert checkpoint.status("absent", tmp_path) == "missing"
    with pytest.raises(CheckpointError, match="python -m agm train absent"):
        checkpoint.load("absent", tmp_path)
    save_example(tmp_path)
    (tmp_path / "toy.pt").unlink()
    with pytest.raises(CheckpointError, match="python -m agm train toy"):
        checkpoint.load("toy", tmp_path)


def test_unreadable_manifest_is_an_error(tmp_path):
    save_example(tmp_path)
    (tmp_path / "toy.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        checkpoint.load("toy", tmp_path)


class NotAWeight:
    pass


def test_loading_never_unpickles_arbitrary_objects(tmp_path):
    """Even with a matching sha256, a file holding a Python object is refused (weights_only=True)."""
    save_example(tmp_path)
    pt = tmp_path / "toy.pt"
    torch.save({"state_dict": {}, "config": {}, "payload": NotAWeight()}, pt)
    manifest = json.loads((tmp_path / "toy.json").read_text())
    manifest["sha256"] = checkpoint.sha256_file(pt)
    (tmp_path / "toy.json").write_text(json.dumps(manifest))
    with pytest.raises(Exception, match="Weights only load failed|Unsupported global"):
        checkpoint.load("toy", tmp_path)


def test_shipped_checkpoints_verify():
    from agm import registry

    for name in registry.all_specs():
        assert checkpoint.status(name) == "verified", f"{name}: run python -m agm train {name}"


def test_fill_cells_keeps_the_cells_another_process_stored_meanwhile(tmp_path):
    save_example(tmp_path)

    def measure_while_another_fills():  # a second filler stores cell "b" while this one measures "a"
        checkpoint.update_metrics("toy", {"cells": {"b": {"value": 2}}}, tmp_path)
        return {"value": 1}

    cells = checkpoint.fill_cells("toy", "cells", {"a": measure_while_another_fills}, lambda _: None, tmp_path)
    assert cells == {"a": {"value": 1}, "b": {"value": 2}}
    assert checkpoint.read_manifest("toy", tmp_path).metrics["cells"] == cells
