"""Domain-adversarial training, Chapter 13: the gradient-reversal layer against autograd, the schedules and the
loss against closed forms, which gradient reaches which network, refusals, a NaN, and a smoke run."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from agm import checkpoint
from agm.gan import dann
from agm.train import NonFiniteLossError, gradient_step


def small() -> dann.DANN:
    torch.manual_seed(0)
    return dann.DANN(dann.DANNConfig(hidden=16))


# -- oracles --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0, 2.5])
def test_gradient_reversal_is_the_identity_forward_and_minus_lambda_backward(lam):
    x = torch.randn(4, 7, requires_grad=True)
    upstream = torch.randn(4, 7)
    y = dann.reverse_gradient(x, lam)
    assert torch.equal(y, x)
    (grad,) = torch.autograd.grad(y, x, upstream)
    assert torch.equal(grad, -lam * upstream)


def test_schedules_match_ganins_closed_forms():
    config = dann.DANNConfig()
    assert dann.schedules(config, 0.0) == (0.01, 0.0)
    lr, lam = dann.schedules(config, 1.0)
    assert lr == pytest.approx(0.01 / 11 ** 0.75) and lam == pytest.approx(2 / (1 + math.exp(-10)) - 1)
    lams = [dann.schedules(config, p / 10)[1] for p in range(11)]
    assert all(a < b for a, b in zip(lams, lams[1:], strict=False))  # lambda rises from 0 towards 1


def test_loss_is_cross_entropy_plus_domain_cross_entropy_by_hand():
    model = small().eval()
    g = torch.Generator().manual_seed(0)
    xs, xt = torch.rand(6, 1, 28, 28, generator=g), torch.rand(5, 1, 28, 28, generator=g)
    ys = torch.randint(10, (6,), generator=g)
    loss, logs = dann.dann_loss(model, xs, ys, xt, lam=0.7)
    with torch.no_grad():
        ce = -model(xs).log_softmax(1)[torch.arange(6), ys].mean()
        d_s = model.domain(model.features(xs)).squeeze(1)
        d_t = model.domain(model.features(xt)).squeeze(1)
        # source labelled 0, target 1: -log(1 - sigmoid(d)) on source, -log sigmoid(d) on target, averaged over 11
        bce = (F.softplus(d_s).sum() + F.softplus(-d_t).sum()) / 11
    assert loss.item() == pytest.approx((ce + bce).item(), rel=1e-6)
    assert float(logs["class_loss"]) == pytest.approx(ce.item(), rel=1e-6)
    assert float(logs["domain_loss"]) == pytest.approx(bce.item(), rel=1e-6)


def test_the_domain_loss_reaches_the_features_reversed_and_the_domain_head_unchanged():
    model = small()
    x = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    domains = torch.tensor([0.0] * 4 + [1.0] * 4)
    lam = 0.4

    def grads(reversed_: bool):
        model.zero_grad()
        logits = model.domain_logits(x, lam) if reversed_ else model.domain(model.features(x)).squeeze(1)
        F.binary_cross_entropy_with_logits(logits, domains).backward()
        return ([p.grad.clone() for p in model.features.parameters()],
                [p.grad.clone() for p in model.domain.parameters()])

    (f_rev, d_rev), (f_plain, d_plain) = grads(True), grads(False)
    for a, b in zip(f_rev, f_plain, strict=True):
        assert torch.allclose(a, -lam * b, atol=1e-7)
    for a, b in zip(d_rev, d_plain, strict=True):
        assert torch.allclose(a, b)
    # dann.domain_gradients (the chapter's check) gives the same vectors, flattened
    for reverse, (f, d) in ((True, (f_rev, d_rev)), (False, (f_plain, d_plain))):
        got_f, got_d = dann.domain_gradients(model, x, domains, lam, reverse)
        assert torch.allclose(got_f, torch.cat([g.flatten() for g in f])) and torch.equal(got_d, torch.cat(
            [g.flatten() for g in d]))


# -- properties and refusals ----------------------------------------------------------------------------


def test_the_target_domains_invert_gray_levels_or_add_seeded_clipped_noise():
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(dann.invert(dann.invert(x)), x) and dann.invert(x).min() >= 0 and dann.invert(x).max() <= 1
    assert torch.equal(dann.to_target(x, "invert", 1.0, "test"), 1 - x)
    noisy = dann.to_target(x, "noise", 0.5, "test")
    assert torch.equal(noisy, dann.to_target(x, "noise", 0.5, "test")) and 0 <= noisy.min() and noisy.max() <= 1
    assert not torch.equal(noisy, dann.to_target(x, "noise", 0.5, "trainval"))  # each split its own noise
    # away from the clipping, the added noise has the asked standard deviation
    middle = torch.full((200, 1, 28, 28), 0.5)
    added = dann.to_target(middle, "noise", 0.05, "test") - middle
    assert abs(added.std().item() - 0.05) < 0.002 and abs(added.mean().item()) < 0.001
    with pytest.raises(ValueError, match="unknown shift"):
        dann.to_target(x, "blur", 1.0, "test")


def test_shapes_and_refusals():
    model = small()
    assert model(torch.rand(5, 1, 28, 28)).shape == (5, 10)
    assert model.domain_logits(torch.rand(5, 1, 28, 28)).shape == (5,)
    with pytest.raises(ValueError, match=r"images of shape \[B, 1, 28, 28\]"):
        model(torch.rand(5, 784))
    with pytest.raises(ValueError, match="unknown setting"):
        dann.DANNConfig(setting="target-aware")
    with pytest.raises(ValueError, match="unknown shift"):
        dann.DANNConfig(shift="rotate")


def test_a_nan_stops_before_any_update():
    model = small()
    xs = torch.rand(4, 1, 28, 28)
    xs[1, 0, 3, 3] = float("nan")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = copy.deepcopy(model.state_dict())
    loss, _ = dann.dann_loss(model, xs, torch.zeros(4, dtype=torch.long), torch.rand(4, 1, 28, 28), 1.0)
    with pytest.raises(NonFiniteLossError, match="dann"):
        gradient_step(loss, opt, desc="dann step")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


# -- smoke ----------------------------------------------------------------------------------------------


def test_every_setting_trains_at_the_smoke_budget(monkeypatch):
    monkeypatch.setenv("AGM_SMOKE", "1")
    table = dann.seed_table("noise", seeds=(0, 1), log=lambda _: None)
    assert table["shift"] == "noise" and set(table["runs"]) == {f"{s}/seed{k}" for s in dann.SETTINGS for k in (0, 1)}
    for setting in dann.SETTINGS:
        cell = table["summary"][f"{setting}/target_accuracy"]
        assert len(cell["values"]) == 2 and 0 <= cell["mean"] <= 1 and cell["sd"] >= 0
    assert all(run["n_test"] == 500 for run in table["runs"].values())


def test_the_inversion_table_trains_the_settings_asked(monkeypatch):
    monkeypatch.setenv("AGM_SMOKE", "1")
    table = dann.seed_table("invert", settings=("dann",), seeds=(0,), log=lambda _: None)
    assert table["shift"] == "invert" and set(table["runs"]) == {"dann/seed0"}


def test_the_full_evaluation_stores_each_run_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("AGM_CHECKPOINTS", str(tmp_path))
    model = dann.DANN(dann.DANNConfig())
    checkpoint.save("dann", {"state_dict": model.state_dict()}, checkpoint.new_manifest("dann", {}, 0, 0.0, {}))
    calls = []

    def fake_run(shift, setting, seed, steps=None, log=print):
        calls.append((shift, setting, seed))
        if len(calls) == 4:
            raise KeyboardInterrupt  # stopped during the fourth run
        return {"source_accuracy": 0.9, "target_accuracy": 0.1 * seed, "n_test": 10}

    monkeypatch.setattr(dann, "seed_run", fake_run)
    with pytest.raises(KeyboardInterrupt):
        dann.evaluate_full(model, log=lambda _: None)
    assert len(checkpoint.read_manifest("dann").metrics["seed_runs"]) == 3
    tables = dann.evaluate_full(model, log=lambda _: None)
    assert len(calls) == 4 + 12 and calls[3] == calls[4]  # the interrupted run again, none of the stored ones
    noise = tables["seed_table"]["summary"]["dann/target_accuracy"]
    assert noise["values"] == [0.0, 0.1, 0.2] and noise["mean"] == pytest.approx(0.1)
    invert = {f"{s}/seed{k}" for s in ("source-only", "dann") for k in (0, 1, 2)}
    assert set(tables["seed_table_invert"]["runs"]) == invert
