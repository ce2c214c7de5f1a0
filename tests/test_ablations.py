"""The transformer ablations: one change per variant, stored cell by cell, resumed, summarized."""

import dataclasses
import math

import pytest

from agm import checkpoint
from agm.autoregressive import ablations
from agm.autoregressive.ar_transformer import ARConfig, ARTransformer


def test_each_variant_changes_one_setting_of_the_baseline():
    base = dataclasses.asdict(ablations.variant_config("pre-LN", steps=30))
    for name, change in ablations.VARIANTS.items():
        config = dataclasses.asdict(ablations.variant_config(name, steps=30))
        differ = {k for k in config if config[k] != base[k]}
        assert differ == set(change), name
    assert set().union(*ablations.CHAPTER_VARIANTS.values()) == set(ablations.VARIANTS)


def test_every_variant_shares_the_baselines_training_run():
    configs = [ablations.variant_config(name, seed=1, steps=200) for name in ablations.VARIANTS]
    assert all(c.train == configs[0].train for c in configs)
    assert configs[0].train.steps == 200 and configs[0].train.warmup_steps == 20 and configs[0].train.seed == 1


def test_an_unknown_variant_is_refused_with_the_choices():
    with pytest.raises(KeyError, match="post-LN"):
        ablations.variant_config("layer-scale")


def test_a_variant_trains_and_reports_an_exact_nll(monkeypatch):
    monkeypatch.setenv("AGM_SMOKE", "1")
    cell = ablations.run("post-LN", seed=0, steps=4, n_test=20, log=lambda _: None)
    config = ablations.variant_config("post-LN")
    assert cell["steps"] == 4 and cell["test_nll_n"] == 20
    assert cell["parameters"] == sum(p.numel() for p in ARTransformer(config).parameters())
    # 196 tokens of 16 symbols: a model that has learnt little sits near the uniform 196 log 16 nats
    assert 0 < cell["test_nll_nats"] < 1.5 * 196 * math.log(16)
    assert cell["curve"]["step"] == sorted(cell["curve"]["step"]) and all(map(math.isfinite, cell["curve"]["loss"]))


@pytest.fixture
def manifest(tmp_path, monkeypatch):
    """A verified checkpoint named ar-transformer in a folder of its own, to write cells into."""
    monkeypatch.setenv("AGM_CHECKPOINTS", str(tmp_path))
    model = ARTransformer(ARConfig(width=16, layers=1, heads=2))
    checkpoint.save("ar-transformer", {"state_dict": model.state_dict()},
                    checkpoint.new_manifest("ar-transformer", {}, 0, 0.0, {}), tmp_path)
    return tmp_path


def test_fill_stores_each_cell_and_resumes_without_repeating_one(manifest, monkeypatch):
    calls = []

    def fake_run(variant, seed, steps=None, log=print):
        calls.append((variant, seed))
        return {"test_nll_nats": 100.0 + len(calls), "seconds": 1.0}

    monkeypatch.setattr(ablations, "run", fake_run)
    ablations.fill(variants=("pre-LN", "rotary"), seeds=(0,), log=lambda _: None)
    stored = checkpoint.read_manifest("ar-transformer").metrics[ablations.KEY]
    assert set(stored) == {"pre-LN/seed0", "rotary/seed0"} and len(calls) == 2
    cells = ablations.fill(variants=("pre-LN", "rotary"), seeds=(0, 1), log=lambda _: None)
    assert calls[2:] == [("pre-LN", 1), ("rotary", 1)] and len(cells) == 4
    assert cells["pre-LN/seed0"]["test_nll_nats"] == 101.0  # kept, not re-measured


def test_table_gives_mean_and_spread_over_the_seeds_stored():
    cells = {"pre-LN/seed0": {"test_nll_nats": 90.0}, "pre-LN/seed1": {"test_nll_nats": 92.0},
             "rotary/seed0": {"test_nll_nats": 88.0}}
    rows = {r["variant"]: r for r in ablations.table(cells, ("pre-LN", "rotary", "none"))}
    assert rows["pre-LN"]["test_nll_nats"] == 91.0 and rows["pre-LN"]["test_nll_sd"] == pytest.approx(2 ** 0.5)
    assert rows["rotary"]["seeds"] == 1 and rows["rotary"]["test_nll_sd"] is None
    assert rows["none"]["seeds"] == 0 and rows["none"]["test_nll_nats"] is None



def test_stored_is_empty_before_the_evaluation_and_holds_the_cells_after(manifest, monkeypatch):
    assert ablations.stored() == {}
    monkeypatch.setattr(ablations, "run", lambda variant, seed, steps=None, log=print: {"test_nll_nats": 90.0 + seed,
                                                                                  "seconds": 1.0})
    ablations.fill(variants=("rotary",), seeds=(0, 3), log=lambda _: None)
    cells = ablations.stored()
    assert set(cells) == {"rotary/seed0", "rotary/seed3"} and ablations.by_seed(cells, "rotary") == {0: 90.0, 3: 93.0}


def test_paired_difference_compares_seed_with_seed_over_the_seeds_both_have():
    nll = {"pre-LN": [90.0, 92.0, 95.0, 91.0], "post-LN": [91.0, 93.5, 95.5], "none": [96.0]}
    cells = {f"{v}/seed{s}": {"test_nll_nats": x} for v, xs in nll.items() for s, x in enumerate(xs)}
    d = ablations.paired_difference(cells, "post-LN")
    # differences 1.0, 1.5, 0.5: mean 1, sd 0.5, se 0.5 / sqrt 3
    assert d["seeds"] == 3 and d["difference"] == pytest.approx(1.0) and d["se"] == pytest.approx(0.5 / 3 ** 0.5)
    assert d["resolved"] is True  # 1 > 2 * 0.289
    unpaired_sd = ablations.table(cells, ("pre-LN",))[0]["test_nll_sd"]
    assert unpaired_sd > 2  # the seeds differ far more than the paired differences do
    one = ablations.paired_difference(cells, "none")
    assert one["seeds"] == 1 and one["difference"] == 6.0 and one["se"] is None and one["resolved"] is None
    assert ablations.paired_difference(cells, "rotary") == {"seeds": 0, "difference": None, "se": None,
                                                            "resolved": None}
    close = {**cells, "post-LN/seed2": {"test_nll_nats": 92.0}}  # differences 1.0, 1.5, -3.0
    assert ablations.paired_difference(close, "post-LN")["resolved"] is False


def test_evaluate_full_stores_the_test_nll_before_the_ablations_start(manifest, monkeypatch):
    from agm.autoregressive import ar_transformer

    monkeypatch.setenv("AGM_SMOKE", "1")
    model = ARTransformer(ARConfig(width=16, layers=1, heads=2))

    def fill_after_the_nll_is_stored():
        stored = checkpoint.read_manifest("ar-transformer").metrics
        assert stored["test_nll_n"] == 100 and stored["test_nll_nats"] > 0
        return {"pre-LN/seed0": {"test_nll_nats": 90.0}}

    monkeypatch.setattr(ablations, "fill", fill_after_the_nll_is_stored)
    metrics = ar_transformer.evaluate_full(model)
    assert metrics["test_nll_nats"] == pytest.approx(ar_transformer.evaluate(model)["test_nll_nats"])
    assert metrics[ablations.KEY] == {"pre-LN/seed0": {"test_nll_nats": 90.0}}
