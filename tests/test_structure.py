"""The shared layers: the batch iterator, distributions, configs, the transformer, models that require models."""

import math
from dataclasses import dataclass, field

import pytest
import torch

from agm import checkpoint, distributions, registry
from agm.checkpoint import CheckpointError
from agm.config import TrainConfig, from_dict, to_dict
from agm.data import batches, binarize
from agm.nn.attention import KVCache
from agm.nn.transformer import Transformer, TransformerConfig

# -- agm.data.batches ----------------------------------------------------------------------------------


def test_batches_cover_each_epoch_once_in_a_seeded_order():
    x, y = torch.arange(10.0).view(10, 1), torch.arange(10)
    first = list(batches(x, y, batch_size=4, generator=torch.Generator().manual_seed(0), epochs=2))
    again = list(batches(x, y, batch_size=4, generator=torch.Generator().manual_seed(0), epochs=2))
    assert [len(b[1]) for b in first] == [4, 4, 2, 4, 4, 2]
    assert sorted(torch.cat([b[1] for b in first[:3]]).tolist()) == list(range(10))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(first, again, strict=True))
    assert all(torch.equal(bx.squeeze(1), by.float()) for bx, by in first)  # images stay with their labels
    dropped = list(batches(x, batch_size=4, generator=torch.Generator(), drop_last=True, epochs=1))
    assert [len(b) for b in dropped] == [4, 4]


def test_batches_redraw_a_random_transform_at_every_use():
    x = torch.full((4, 1, 28, 28), 0.5)
    it = batches(x, batch_size=4, generator=torch.Generator().manual_seed(0), transform=binarize)
    a, b = next(it), next(it)
    assert set(a.unique().tolist()) <= {0.0, 1.0} and not torch.equal(a, b)


def test_batches_reject_bad_input():
    with pytest.raises(ValueError, match="same length"):
        next(batches(torch.zeros(3, 1), torch.zeros(2), batch_size=1, generator=torch.Generator()))
    with pytest.raises(ValueError, match="batch_size"):
        next(batches(torch.zeros(3, 1), batch_size=0, generator=torch.Generator()))
    with pytest.raises(ValueError, match="drop_last"):
        next(batches(torch.zeros(3, 1), batch_size=4, generator=torch.Generator(), drop_last=True))


# -- agm.distributions ----------------------------------------------------------------------------------


def test_gaussian_kl_against_torch_distributions():
    g = torch.Generator().manual_seed(0)
    m1, m2, lv1, lv2 = (torch.randn(5, 3, generator=g) for _ in range(4))
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * lv1).exp()),
                                            torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    assert torch.allclose(distributions.gaussian_kl(m1, lv1, m2, lv2), ref, atol=1e-5)
    standard = torch.distributions.Normal(torch.zeros(3), torch.ones(3))
    ref0 = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * lv1).exp()), standard).sum(-1)
    assert torch.allclose(distributions.diagonal_gaussian_kl(m1, lv1), ref0, atol=1e-5)


def test_gaussian_log_prob_and_bernoulli_against_torch_distributions():
    g = torch.Generator().manual_seed(1)
    z, m, lv = (torch.randn(4, 6, generator=g) for _ in range(3))
    ref = torch.distributions.Normal(m, (0.5 * lv).exp()).log_prob(z).sum(-1)
    assert torch.allclose(distributions.diagonal_gaussian_log_prob(z, m, lv), ref, atol=1e-5)
    logits = torch.randn(3, 1, 28, 28, generator=g)
    x = torch.bernoulli(torch.full((3, 1, 28, 28), 0.3), generator=g)
    ref_b = torch.distributions.Bernoulli(logits=logits).log_prob(x).flatten(1).sum(1)
    assert torch.allclose(distributions.bernoulli_log_likelihood(logits, x), ref_b, atol=1e-3)
    assert torch.allclose(distributions.bernoulli_log_prob(x.flatten(1), torch.sigmoid(logits).flatten(1)), ref_b,
                          atol=1e-2)
    assert distributions.bernoulli_log_prob(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0])).item() == 0.0


def test_mean_and_standard_error():
    mean, se = distributions.mean_and_standard_error(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert mean == pytest.approx(2.5) and se == pytest.approx(math.sqrt(5 / 3) / 2)
    with pytest.raises(ValueError, match="at least two"):
        distributions.mean_and_standard_error(torch.tensor([1.0]))


# -- agm.config -----------------------------------------------------------------------------------------


@dataclass
class Inner:
    widths: tuple[int, ...] = (1, 2)


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)
    train: TrainConfig = field(default_factory=TrainConfig)
    label: str | None = None


def test_config_round_trip_through_json_values():
    config = Outer(Inner((3, 4, 5)), TrainConfig(steps=7, betas=(0.5, 0.999), lr_final=1e-4), "x")
    data = to_dict(config)
    assert data["inner"]["widths"] == [3, 4, 5] and data["train"]["betas"] == [0.5, 0.999]
    assert from_dict(Outer, data) == config
    assert from_dict(Outer, {}) == Outer()  # missing keys take the defaults


def test_config_refuses_unknown_keys():
    with pytest.raises(ValueError, match="Outer has no field.*widths"):
        from_dict(Outer, {"widths": [1]})
    with pytest.raises(ValueError, match="Inner has no field"):
        from_dict(Outer, {"inner": {"channels": 3}})


# -- agm.nn.transformer ------------------------------------------------------------------------------------


@pytest.mark.parametrize("positions", ["learned", "sinusoidal", "2d", "rotary", "none"])
@pytest.mark.parametrize("norm", ["pre", "post"])
def test_kv_cache_gives_the_logits_of_the_full_forward_pass(positions, norm):
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=7, block_size=12, width=16, heads=2, layers=2,
                                          positions=positions, norm=norm, grid=(3, 4))).eval()
    tokens = torch.randint(7, (3, 12))
    full = model(tokens)
    cache = KVCache()
    parts = [model(tokens[:, :5], cache)] + [model(tokens[:, i : i + 1], cache) for i in range(5, 12)]
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)


def test_transformer_is_causal_and_attention_matches_sdpa_by_hand():
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=5, block_size=6, width=8, heads=2, layers=1)).eval()
    a, b = torch.tensor([[1, 2, 3, 4, 0, 0]]), torch.tensor([[1, 2, 3, 4, 4, 4]])
    assert torch.allclose(model(a)[:, :4], model(b)[:, :4], atol=1e-6)  # the future does not leak
    attn = model.blocks[0].attn
    h = torch.randn(2, 6, 8)
    q, k, v = attn.qkv(h).view(2, 6, 3, 2, 4).permute(2, 0, 3, 1, 4)
    scores = q @ k.transpose(-1, -2) / math.sqrt(4) + torch.full((6, 6), float("-inf")).triu(1)
    by_hand = attn.out((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 6, 8))
    assert torch.allclose(attn(h), by_hand, atol=1e-5)


def test_residual_switch_and_bad_configs():
    torch.manual_seed(0)
    with_res = Transformer(TransformerConfig(vocab_size=5, block_size=4, width=8, heads=2, layers=2))
    without = Transformer(TransformerConfig(vocab_size=5, block_size=4, width=8, heads=2, layers=2, residual=False))
    without.load_state_dict(with_res.state_dict())
    tokens = torch.tensor([[0, 1, 2, 3]])
    assert not torch.allclose(with_res(tokens), without(tokens))
    with pytest.raises(ValueError, match="norm"):
        TransformerConfig(norm="sandwich")
    with pytest.raises(ValueError, match="grid"):
        TransformerConfig(positions="2d")
    with pytest.raises(ValueError, match="block_size"):
        with_res(torch.zeros(1, 5, dtype=torch.long))


# -- models that require models --------------------------------------------------------------------------


def save(name, directory, value=1.0, requires=None):
    state = {"config": {}, "state_dict": {"w": torch.full((2,), value)}}
    manifest = checkpoint.new_manifest(name, {}, 1, 0.1, {}, requires=requires)
    return checkpoint.save(name, state, manifest, directory)


def test_a_child_pins_its_parent_and_refuses_a_changed_or_missing_one(tmp_path):
    parent = save("parent", tmp_path)
    save("child", tmp_path, requires={"parent": parent.sha256})
    checkpoint.load("child", tmp_path)  # parent unchanged: loads
    save("parent", tmp_path, value=2.0)  # the parent is retrained
    with pytest.raises(CheckpointError, match=r"parent has changed.*python -m agm train parent && python -m agm "
                                              r"train child"):
        checkpoint.load("child", tmp_path)
    (tmp_path / "parent.pt").unlink()
    with pytest.raises(CheckpointError, match="parent is missing"):
        checkpoint.load("child", tmp_path)


def test_every_registered_requirement_is_a_registered_model():
    specs = registry.all_specs()
    for spec in specs.values():
        assert set(spec.requires) <= set(specs), spec.name


def test_load_parents_pins_the_sha256_of_what_it_loaded(monkeypatch):
    spec = registry.ModelSpec(name="needs-classifier", chapter=99, summary="", build=None, train=None,
                              evaluate=None, requires=("classifier",))
    parents, pins = registry.load_parents(spec)
    assert set(parents) == {"classifier"} and pins["classifier"] == checkpoint.read_manifest("classifier").sha256
    assert not parents["classifier"].training


def test_the_schedule_warms_up_linearly_then_decays_along_a_cosine():
    from agm.config import TrainConfig

    def rates(**fields):
        tc = TrainConfig(steps=100, lr=1.0, **fields)
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(()))], lr=tc.lr)
        scheduler = tc.scheduler(opt)
        seen = []
        for _ in range(tc.steps):
            seen.append(opt.param_groups[0]["lr"])
            opt.step()
            scheduler.step()
        return seen

    assert TrainConfig(steps=10).scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(()))], lr=1.0)) is None
    warm = rates(warmup_steps=10)
    assert warm[:3] == pytest.approx([0.1, 0.2, 0.3]) and warm[9:] == pytest.approx([1.0] * 91)
    both = rates(warmup_steps=10, lr_final=0.1)
    assert both[9] == pytest.approx(1.0) and both[-1] == pytest.approx(0.1, abs=1e-3)
    assert both[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 45 / 90)))
    cosine = rates(lr_final=0.1)  # no warm-up: torch's own cosine annealing
    assert cosine[0] == 1.0 and cosine[50] == pytest.approx(0.55)


def test_train_loop_updates_the_ema_after_every_step():
    from agm.train import EMA, train_loop

    model = torch.nn.Linear(2, 1)
    ema = EMA(model, decay=0.5, warmup=False)
    start = model.weight.detach().clone()
    data = iter([torch.ones(4, 2)] * 3)
    train_loop(model, lambda m, x: m(x).pow(2).mean(), data, torch.optim.SGD(model.parameters(), lr=0.1), 3,
               ema=ema)
    assert ema.updates == 3 and not torch.equal(ema.module.weight, start)
    assert not torch.equal(ema.module.weight, model.weight)  # an average, not a copy


def test_categorical_log_prob_against_torch_distributions():
    g = torch.Generator().manual_seed(0)
    logits, tokens = torch.randn(3, 5, 7, generator=g), torch.randint(0, 7, (3, 5), generator=g)
    expected = torch.distributions.Categorical(logits=logits).log_prob(tokens)
    assert torch.allclose(distributions.categorical_log_prob(logits, tokens), expected, atol=1e-6)


@pytest.mark.parametrize("spec", [s for s in registry.all_specs().values() if s.metric_sample_options],
                         ids=lambda s: s.name)
def test_shipped_metrics_were_sampled_as_the_model_now_samples_them(spec, monkeypatch):
    """A change of a model's metric sampler leaves its manifest stale until `evaluate NAME --store` measures again."""
    monkeypatch.delenv("AGM_SMOKE", raising=False)
    stored = {k.removeprefix("sample_"): v for k, v in checkpoint.read_manifest(spec.name).metrics.items()
              if k.startswith("sample_")}
    assert stored == spec.metric_sample_options()
