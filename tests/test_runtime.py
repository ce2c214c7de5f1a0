import pytest
import torch
from torch import nn

from agm import runtime, viz
from agm.train import train_loop


def test_budget_follows_agm_smoke(monkeypatch):
    monkeypatch.setenv("AGM_SMOKE", "1")
    assert runtime.is_smoke() and runtime.budget(1000, 10) == 10
    monkeypatch.setenv("AGM_SMOKE", "0")
    assert not runtime.is_smoke() and runtime.budget(1000, 10) == 1000


def test_device_falls_back_to_cpu_and_can_be_forced(monkeypatch):
    monkeypatch.setenv("AGM_DEVICE", "cpu")
    assert runtime.device() == torch.device("cpu")
    monkeypatch.delenv("AGM_DEVICE")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert runtime.device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert runtime.device() == torch.device("cuda")  # cuda is preferred whenever it is there


def test_seeding_is_reproducible():
    g1 = runtime.seed_everything(5)
    a = torch.rand(3, generator=g1), torch.rand(3)
    g2 = runtime.seed_everything(5)
    b = torch.rand(3, generator=g2), torch.rand(3)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


def test_set_threads(monkeypatch):
    monkeypatch.setenv("AGM_THREADS", "1")
    assert runtime.set_threads() == 1 and torch.get_num_threads() == 1
    runtime.set_threads(2)


def mse(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def test_train_loop_overfits_one_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    batch = (torch.randn(16, 8), torch.randn(16, 1))
    history = train_loop(model, mse, iter(lambda: batch, None), torch.optim.Adam(model.parameters(), 1e-2),
                         steps=400, log_every=100)
    assert [h["step"] for h in history] == [100, 200, 300, 400]
    assert history[-1]["loss"] < 0.01 * mse(nn.Linear(8, 1), batch).item() + 1e-3


def test_train_loop_stops_on_nan_without_touching_weights():
    model = nn.Linear(2, 1)
    before = [p.detach().clone() for p in model.parameters()]
    nan_batch = (torch.full((4, 2), float("nan")), torch.zeros(4, 1))
    with pytest.raises(FloatingPointError, match="loss is nan at step 1"):
        train_loop(model, mse, iter(lambda: nan_batch, None), torch.optim.SGD(model.parameters(), 0.1), steps=5)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    with pytest.raises(ValueError, match="steps"):
        train_loop(model, mse, iter(lambda: nan_batch, None), torch.optim.SGD(model.parameters(), 0.1), steps=0)


def test_grid_keeps_pixels_and_saves_png(tmp_path):
    images = torch.zeros(6, 1, 28, 28)
    images[0, 0, 0, 0] = 1.0
    g = viz.grid(images, nrow=3, padding=2)
    assert g.shape == (2 * 30 + 2, 3 * 30 + 2) and g[2, 2] == 1.0 and g[3, 3] == 0.0
    viz.save_grid(images, tmp_path / "g.png")
    assert (tmp_path / "g.png").stat().st_size > 0
    ax = viz.show_grid(images, nrow=3)
    assert ax.images[0].get_interpolation() == "nearest"
    with pytest.raises(ValueError):
        viz.grid(torch.zeros(28, 28))


def test_logs_of_the_loss_reach_the_history_and_on_step():
    model = nn.Linear(2, 1)
    batch = (torch.randn(8, 2), torch.randn(8, 1))
    seen = []

    def loss_fn(m, b):
        loss = mse(m, b)
        return loss, {"half": loss.detach() / 2, "per_example": torch.ones(8)}

    history = train_loop(model, loss_fn, iter(lambda: batch, None), torch.optim.SGD(model.parameters(), 0.1),
                         steps=4, log_every=2,
                         on_step=lambda step, logs: seen.append((step, logs["per_example"].shape)))
    assert [h["step"] for h in history] == [2, 4]
    assert all(h["half"] == pytest.approx(h["loss"] / 2) for h in history)
    assert "per_example" not in history[0]  # only scalars enter the history
    assert seen == [(s, (8,)) for s in (1, 2, 3, 4)]


def test_run_steps_carries_two_optimizers_and_inner_steps():
    """A critic with three inner steps per generator step, as WGAN trains: both models move, logs come out."""
    from agm.train import gradient_step, run_steps

    critic, gen = nn.Linear(1, 1), nn.Linear(1, 1)
    opt_c, opt_g = torch.optim.SGD(critic.parameters(), 0.01), torch.optim.SGD(gen.parameters(), 0.01)
    c0, g0 = critic.weight.item(), gen.weight.item()
    calls = []

    def step_fn(step):
        for _ in range(3):
            calls.append("critic")
            critic_loss = gradient_step(critic(gen(torch.ones(4, 1)).detach()).mean(), opt_c)
        calls.append("generator")
        gen_loss = gradient_step(-critic(gen(torch.ones(4, 1))).mean(), opt_g)
        return {"critic_loss": critic_loss, "generator_loss": gen_loss}

    history = run_steps(step_fn, 2, log_every=1, modules=[critic, gen])
    assert calls == ["critic"] * 3 + ["generator"] + ["critic"] * 3 + ["generator"]
    assert set(history[0]) == {"step", "critic_loss", "generator_loss"}
    assert critic.weight.item() != c0 and gen.weight.item() != g0
    assert not critic.training and not gen.training


def test_ema_along_a_path_matches_the_closed_form():
    """Without warm-up the average is d^k theta_0 + sum_j (1 - d) d^(k-j) theta_j, and theta_0 keeps d^k."""
    from agm.train import ema_along

    path = torch.randn(301, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    d, k = 0.99, 300
    closed = d**k * path[0] + ((1 - d) * d ** (k - torch.arange(1, k + 1, dtype=torch.float64)) * path[1:]).sum()
    average, weight = ema_along(path, d, warmup=False)
    assert average == pytest.approx(closed.item(), abs=1e-12) and weight == pytest.approx(d**k, rel=1e-12)
    _, warm_weight = ema_along(path, d, warmup=True)  # warm-up forgets the start faster
    assert warm_weight < weight
    with pytest.raises(ValueError, match="at least two"):
        ema_along(path[:1], d)
