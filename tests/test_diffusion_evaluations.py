"""The incremental sampler tables: which cells, in which order, stored as they finish, resumed, summarized."""

import shutil
import statistics

import pytest
import torch

from agm import checkpoint, registry
from agm.cli import main
from agm.diffusion import evaluations
from agm.diffusion.evaluations import CLIPPING, STEPS, Setting, fill, plan, table
from agm.runtime import checkpoint_dir


def test_settings_have_distinct_keys_and_the_tables_hold_the_measured_rows():
    keys = [s.key for s in CLIPPING + STEPS]
    assert len(set(keys)) == len(keys)
    assert {"ancestral-1000-clip", "ancestral-1000-noclip", "ancestral-50-clip", "ancestral-50-noclip",
            "ddim-eta0-50-clip", "ddim-eta0-50-noclip"} <= set(keys)
    assert {"ddim-eta1-10", "ddim-eta0.5-100", "dpmsolver++-20"} <= set(keys)
    assert Setting("ddim", 20, False, 1.0).options() == {"sampler": "ddim", "steps": 20, "clip_denoised": False,
                                                         "eta": 1.0}


def test_labels_name_the_sampler_eta_and_the_clipping_it_runs_with():
    assert Setting("ddim", 50).label == "DDIM, η = 0, clipped"  # DDIM clips by default
    assert Setting("ddim", 50, False, 0.5).label == "DDIM, η = 0.5, unclipped"
    assert Setting("dpmsolver++", 20).label == "DPM-Solver++, unclipped"
    assert Setting("ancestral", 1000, True).label == "ancestral, clipped"
    assert Setting("ancestral", 50).phrase == "the ancestral sampler, x̂₀ clipped"  # in a sentence
    assert Setting("ddim", 50, False, 0.5).phrase == "DDIM with η = 0.5, x̂₀ unclipped"
    assert Setting("dpmsolver++", 20).phrase == "DPM-Solver++, x̂₀ unclipped"
    assert Setting("ancestral", 50).labels(3) is None
    assert Setting("dpmsolver++", 20, guidance=1.0).labels(12).tolist() == [*range(10), 0, 1]


def test_plan_runs_the_cheap_cells_first_and_each_once():
    cells = plan(CLIPPING + STEPS + CLIPPING, seeds=(0, 1))
    assert len(cells) == 2 * len({s.key for s in CLIPPING + STEPS})
    steps = [s.steps for s, _ in cells]
    assert steps == sorted(steps) and steps[-1] == 1000


@pytest.fixture(scope="module")
def trained_smoke_ddpm(tmp_path_factory):
    """One smoke-trained ddpm for the module (training it is most of these tests' time)."""
    d = tmp_path_factory.mktemp("ddpm")
    for suffix in (".pt", ".json"):
        shutil.copy(checkpoint_dir() / f"classifier{suffix}", d / f"classifier{suffix}")
    assert main(["train", "ddpm", "--smoke", "--out-dir", str(d)]) == 0
    return d


@pytest.fixture
def smoke_ddpm(trained_smoke_ddpm, tmp_path, monkeypatch):
    """A fresh copy per test: the tests write cells into the manifest."""
    shutil.copytree(trained_smoke_ddpm, tmp_path, dirs_exist_ok=True)
    monkeypatch.setenv("AGM_CHECKPOINTS", str(tmp_path))
    return tmp_path


def test_fill_stores_each_cell_skips_what_is_stored_and_restarts_for_another_n(smoke_ddpm, monkeypatch):
    calls = []

    def fake(model, setting, seed, n, classifier=None):
        calls.append((setting.key, seed))
        return {"fid": setting.steps + seed, "inception_score": 1.0, "precision": 0.5, "recall": 0.5,
                "images_per_s": 10.0, "seconds": 1.0, "n_samples": n}

    monkeypatch.setattr(evaluations, "measure", fake)
    settings = [Setting("ddim", 3), Setting("ancestral", 2, True)]
    model, _ = registry.load_model("ddpm")
    fill("ddpm", model, settings, seeds=(0, 1), n=200, log=lambda _: None)
    assert calls == [("ancestral-2-clip", 0), ("ancestral-2-clip", 1), ("ddim-eta0-3", 0), ("ddim-eta0-3", 1)]
    stored = checkpoint.read_manifest("ddpm").metrics[evaluations.KEY]
    assert stored["reference"]["n_samples"] == 200 and stored["ddim-eta0-3/seed1"]["fid"] == 4
    calls.clear()
    fill("ddpm", model, settings + [Setting("ddim", 4)], seeds=(0, 1), n=200, log=lambda _: None)
    assert calls == [("ddim-eta0-4", 0), ("ddim-eta0-4", 1)]  # only the new setting
    calls.clear()
    fill("ddpm", model, settings, seeds=(0,), n=201, log=lambda _: None)  # another n: nothing compares
    assert len(calls) == 2 and "ddim-eta0-4/seed0" not in checkpoint.read_manifest("ddpm").metrics[evaluations.KEY]


def test_fill_measures_one_computation_once_under_both_keys(smoke_ddpm, monkeypatch):
    calls = []
    monkeypatch.setattr(evaluations, "measure", lambda model, setting, seed, n, classifier=None: calls.append(
        setting.key) or {"fid": float(len(calls)), "seconds": 1.0, "n_samples": n})
    assert Setting("ddim", 3).resolved() == Setting("ddim", 3, True)  # DDIM clips by default
    assert Setting("dpmsolver++", 3).resolved() == Setting("dpmsolver++", 3, False)
    model, _ = registry.load_model("ddpm")
    settings = [Setting("ddim", 3), Setting("ddim", 3, True), Setting("ddim", 3, False)]
    cells = fill("ddpm", model, settings, seeds=(0,), n=200, log=lambda _: None)
    assert calls == ["ddim-eta0-3", "ddim-eta0-3-noclip"]
    assert cells["ddim-eta0-3-clip/seed0"] == cells["ddim-eta0-3/seed0"] and cells["ddim-eta0-3/seed0"]["fid"] == 1


def test_fill_keeps_the_cells_that_another_process_stores_meanwhile(smoke_ddpm, monkeypatch):
    """Two fillers of disjoint cells of one manifest: each stores its cell into what is there at that moment."""
    def fake(model, setting, seed, n, classifier=None):
        if seed == 0:  # while this cell is measured, another process stores seed 1
            cells = checkpoint.read_manifest("ddpm").metrics[evaluations.KEY]
            checkpoint.update_metrics("ddpm", {evaluations.KEY: cells | {"ddim-eta0-3/seed1": {"fid": 7.0}}})
        return {"fid": 3.0, "seconds": 1.0, "n_samples": n}

    monkeypatch.setattr(evaluations, "measure", fake)
    model, _ = registry.load_model("ddpm")
    cells = fill("ddpm", model, [Setting("ddim", 3)], seeds=(0, 1), n=200, log=lambda _: None)
    stored = checkpoint.read_manifest("ddpm").metrics[evaluations.KEY]
    assert stored["ddim-eta0-3/seed1"] == {"fid": 7.0} and stored["ddim-eta0-3/seed0"]["fid"] == 3.0
    assert cells == stored  # and the seed-1 cell, stored meanwhile, was not measured again


def test_chain_seconds_times_the_settings_chain_at_the_steps_asked_and_keeps_the_best(monkeypatch):
    calls = []
    monkeypatch.setattr(evaluations.ddpm, "sample", lambda model, n, generator, labels, **options: calls.append(
        (n, labels, options)))
    ticks = iter([0.0, 5.0, 10.0, 12.0, 20.0, 23.0])  # the three chains take 5, 2 and 3 seconds
    monkeypatch.setattr(evaluations.time, "perf_counter", lambda: next(ticks))
    seconds = evaluations.chain_seconds(None, Setting("ddim", 50, False, 0.5), n=4, steps=5, repeats=3)
    assert seconds == 2.0
    assert calls == [(4, None, {"sampler": "ddim", "steps": 5, "clip_denoised": False, "eta": 0.5})] * 3
    calls.clear()
    monkeypatch.setattr(evaluations.time, "perf_counter", iter([0.0, 1.0]).__next__)
    evaluations.chain_seconds(None, Setting("dpmsolver++", 20, guidance=2.0), n=3, steps=4, repeats=1)
    assert calls[0][1].tolist() == [0, 1, 2] and calls[0][2]["guidance"] == 2.0  # a guided chain asks for digits


def test_table_reports_mean_and_sd_over_the_seeds_and_marks_missing_rows():
    cells = {"reference": {"fid": 1.0}}
    for seed, fid in enumerate((10.0, 12.0, 14.0)):
        cells[f"ddim-eta0-50/seed{seed}"] = {"fid": fid, "inception_score": 9.0, "precision": 0.7, "recall": 0.8,
                                             "images_per_s": 5.0}
    rows = table(cells, [Setting("ddim", 50), Setting("ancestral", 1000, True)])
    assert rows[0]["fid"] == 12.0 and rows[0]["fid_sd"] == pytest.approx(statistics.stdev([10, 12, 14]))
    assert rows[0]["seeds"] == 3 and rows[1]["seeds"] == 0 and rows[1]["fid"] is None


def test_guided_settings_have_their_own_keys_and_options():
    from agm.diffusion.evaluations import CFG, CFG_SOLVER, CLASSIFIER, CLASSIFIER_SOLVER

    keys = [s.key for s in CFG + CLASSIFIER + CFG_SOLVER + CLASSIFIER_SOLVER]
    assert len(set(keys)) == len(keys)
    assert {"ancestral-50-w2", "ancestral-50-s4", "dpmsolver++-20-w2", "dpmsolver++-20-s4"} <= set(keys)
    assert all(s.conditional for s in CFG + CLASSIFIER) and not Setting("ddim", 5).conditional
    assert CFG[0].options()["guidance"] == -1.0 and CLASSIFIER[1].options()["classifier_scale"] == 1.0
    # the solver's sweeps are the same weights and scales, so the page can set them side by side
    assert [s.guidance for s in CFG] == [s.guidance for s in CFG_SOLVER]
    assert [s.classifier_scale for s in CLASSIFIER] == [s.classifier_scale for s in CLASSIFIER_SOLVER]


def test_chosen_weight_is_the_lowest_fid_among_the_accurate_or_else_the_most_accurate():
    from agm.diffusion.evaluations import chosen_weight

    rows = [{"guidance": 0.0, "fid": 10.0, "label_accuracy": 0.95},
            {"guidance": 1.0, "fid": 30.0, "label_accuracy": 0.992},
            {"guidance": 2.0, "fid": 20.0, "label_accuracy": 0.995},
            {"guidance": 4.0, "fid": 50.0, "label_accuracy": 0.999}]
    assert chosen_weight(rows) == 2.0  # w = 0 has the lowest FID but misses the mark
    assert chosen_weight(rows, mark=0.9) == 0.0
    assert chosen_weight(rows, mark=0.9999) == 4.0  # none reaches it: the most accurate
    scales = [{"classifier_scale": s, "fid": f, "label_accuracy": a}
              for s, f, a in ((1.0, 5.0, 0.99), (8.0, 4.0, 0.98))]
    assert chosen_weight(scales, key="classifier_scale") == 1.0


def test_measure_reports_the_accuracy_on_the_requested_digit(tmp_path, monkeypatch):
    from agm.diffusion.noise_classifier import NoiseClassifier, NoiseClassifierConfig

    for name in ("classifier",):
        for suffix in (".pt", ".json"):
            shutil.copy(checkpoint_dir() / f"{name}{suffix}", tmp_path / f"{name}{suffix}")
    assert main(["train", "ddpm-cfg", "--smoke", "--out-dir", str(tmp_path)]) == 0
    monkeypatch.setenv("AGM_CHECKPOINTS", str(tmp_path))
    model, _ = registry.load_model("ddpm-cfg")
    cell = evaluations.measure(model, Setting("ddim", 2, guidance=1.0), seed=0, n=130)
    assert cell["n_samples"] == 130 and 0 <= cell["label_accuracy"] <= 1 and cell["images_per_s"] > 0
    # classifier guidance steers an unconditional model; here the conditional net's null label plays it
    classifier = NoiseClassifier(NoiseClassifierConfig(channels=8, multipliers=(1, 1)))
    with pytest.raises(ValueError, match="classifier-free"):
        evaluations.measure(model, Setting("ddim", 2, guidance=1.0, classifier_scale=1.0), 0, 130, classifier)


def test_stored_table_names_the_command_for_missing_cells_and_reads_complete_ones(smoke_ddpm, monkeypatch):
    settings = [Setting("ddim", 3)]
    with pytest.raises(RuntimeError, match="python -m agm evaluate ddpm --full"):
        evaluations.stored_table("ddpm", settings, seeds=(0, 1))
    monkeypatch.setattr(evaluations, "measure", lambda model, setting, seed, n, classifier=None: {
        "fid": 3.0 + seed, "inception_score": 1.0, "precision": 0.5, "recall": 0.5, "images_per_s": 10.0,
        "seconds": 1.0})
    fill("ddpm", registry.load_model("ddpm")[0], settings, seeds=(0, 1), n=200, log=lambda _: None)
    rows, reference = evaluations.stored_table("ddpm", settings, seeds=(0, 1))
    assert rows[0]["fid"] == 3.5 and rows[0]["seeds"] == 2 and reference["n_samples"] == 200


def test_seed_values_and_mean_sd_read_the_cells_behind_a_row():
    setting = Setting("ddim", 50)
    cells = {f"{setting.key}/seed{seed}": {"fid": fid} for seed, fid in zip((0, 1, 2), (10.0, 13.0, 16.0), strict=True)}
    assert evaluations.seed_values(cells, setting, "fid", seeds=(2, 0)) == [16.0, 10.0]
    row = table(cells, [setting])[0]
    assert evaluations.mean_sd(row, "fid") == "13.00 ± 3.00"
    assert evaluations.mean_sd(row, "fid", ".1f", scale=0.1) == "1.3 ± 0.3"
    assert evaluations.mean_sd({"fid": 2.0, "fid_sd": None}, "fid") == "2.00"  # one seed: no spread to show


def test_paired_difference_is_the_mean_per_seed_difference_with_its_standard_error():
    a, b = Setting("ancestral", 50, True), Setting("ancestral", 50, False)
    cells = {f"{a.key}/seed{i}": {"fid": f} for i, f in enumerate((10.0, 20.0, 30.0))}
    cells |= {f"{b.key}/seed{i}": {"fid": f} for i, f in enumerate((11.0, 22.0, 30.0))}  # differences -1, -2, 0
    mean, se = evaluations.paired_difference(cells, a, b)
    assert mean == pytest.approx(-1.0) and se == pytest.approx(1.0 / 3**0.5)
    # the seeds' common part cancels: the rows spread by 10 per seed, the difference by 1
    assert se < statistics.stdev([10.0, 20.0, 30.0]) / 3**0.5
    with pytest.raises(KeyError):
        evaluations.paired_difference(cells, a, Setting("ancestral", 1000, True))


def test_clipping_drift_is_zero_for_a_network_that_never_needs_clipping():
    """An x0-prediction inside [-1, 1] everywhere makes the three DDIM variants one chain; the ODE reference is
    then reached up to the solvers' own difference, the same for every variant."""
    from agm.diffusion.ddpm import DDPM, DDPMConfig
    from agm.diffusion.schedule import ScheduleConfig
    from agm.nn.unet import UNetConfig

    class Shrink(torch.nn.Module):  # eps that makes x0_hat = 0: (x - sqrt(1 - abar) eps) / sqrt(abar) = 0
        def __init__(self, schedule):
            super().__init__()
            self.schedule = schedule

        def forward(self, x, t, labels=None):
            return x / (1 - self.schedule.alpha_bar(t[0])).sqrt()

    model = DDPM(DDPMConfig(unet=UNetConfig(channels=8, multipliers=(1, 1, 1)),
                            schedule=ScheduleConfig(num_timesteps=50))).eval()
    model.net = Shrink(model.schedule)
    x_T = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    rows = evaluations.clipping_drift(model, x_T, steps=(5, 10), reference_steps=10)
    by = {(r["steps"], r["variant"]): r["rms"] for r in rows}
    for S in (5, 10):
        assert by[S, "eps kept"] == pytest.approx(by[S, "unclipped"], abs=1e-6)
        assert by[S, "eps re-derived"] == pytest.approx(by[S, "unclipped"], abs=1e-6)
    assert by[10, "unclipped"] < 1e-5  # x0_hat = 0 at every step: every solver returns 0


def test_clipping_drift_separates_the_variants_when_clipping_bites():
    """A network whose x0-prediction overshoots the data range: keeping eps and re-deriving it differ."""
    from agm.diffusion.ddpm import DDPM, DDPMConfig
    from agm.diffusion.schedule import ScheduleConfig
    from agm.nn.unet import UNetConfig

    class Overshoot(torch.nn.Module):  # x0_hat = (1 + 2 sqrt(1 - abar_t)) x_t / sqrt(abar_t): outside [-1, 1]
        def forward(self, x, t, labels=None):
            return -2 * x

    model = DDPM(DDPMConfig(unet=UNetConfig(channels=8, multipliers=(1, 1, 1)),
                            schedule=ScheduleConfig(num_timesteps=50))).eval()
    model.net = Overshoot()
    x_T = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    by = {(r["steps"], r["variant"]): r["rms"] for r in evaluations.clipping_drift(model, x_T, (10,), 10)}
    assert abs(by[10, "eps kept"] - by[10, "eps re-derived"]) > 1e-3


def test_clipping_shift_is_the_difference_of_the_clipped_and_unclipped_steps():
    """Each row's shift is the change of x_s that clipping makes at that step (same state, same noise), and no
    pixel outside [-1, 1] means no shift."""
    from agm.diffusion.ddpm import DDPM, DDPMConfig
    from agm.diffusion.samplers import chain_pairs
    from agm.diffusion.schedule import ScheduleConfig
    from agm.nn.unet import UNetConfig

    class Overshoot(torch.nn.Module):
        def forward(self, x, t, labels=None):
            return -2 * x

    model = DDPM(DDPMConfig(unet=UNetConfig(channels=8, multipliers=(1, 1, 1)),
                            schedule=ScheduleConfig(num_timesteps=50))).eval()
    model.net = Overshoot()
    schedule = model.schedule
    x_T = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    rows = evaluations.clipping_shift(model, x_T, steps=10, generator=torch.Generator().manual_seed(1))
    pairs = chain_pairs(schedule, 10)
    assert [r["t"] for r in rows] == [t + 1 for t, _ in pairs]
    x, generator = x_T, torch.Generator().manual_seed(1)
    for row, (t, s) in zip(rows, pairs, strict=True):
        eps = model(x, torch.full((2,), t))
        state = generator.get_state()
        clipped, _ = schedule.step(eps, t, x, generator, prev_t=s, clip_denoised=True)
        generator.set_state(state)
        x, x0_hat = schedule.step(eps, t, x, generator, prev_t=s, clip_denoised=False)
        assert row["shift"] == pytest.approx((clipped - x).pow(2).mean().sqrt().item(), rel=1e-4, abs=1e-7)
        assert row["outside"] == pytest.approx((x0_hat.abs() > 1).float().mean().item())
        assert (row["shift"] == 0) == (row["outside"] == 0)
    assert rows[-1]["sigma"] == 0 and all(r["sigma"] > 0 for r in rows[:-1])
    assert max(r["outside"] for r in rows) > 0.5  # the overshooting network does leave the range
    summary = evaluations.clipping_shift_summary(rows)
    assert summary["noisy_steps"] == len(rows) - 1 and summary["outside_T"] == rows[0]["outside"]
    assert summary["shift_over_sigma"] == sum(r["shift"] > r["sigma"] for r in rows[:-1])
    assert summary["shift_last"] == rows[-1]["shift"] and summary["outside_last"] == rows[-1]["outside"]


def test_posterior_coefficients_are_those_of_the_one_step_posterior_and_compose_for_a_jump():
    from agm.diffusion.schedule import NoiseSchedule, ScheduleConfig

    schedule = NoiseSchedule(ScheduleConfig())
    for t in (1, 500, 999):
        coef_x0, coef_xt, var, beta = schedule.posterior_coefficients(t, t - 1)
        assert coef_x0.item() == pytest.approx(schedule.posterior_mean_coef1[t].item(), rel=1e-12)
        assert coef_xt.item() == pytest.approx(schedule.posterior_mean_coef2[t].item(), rel=1e-12)
        assert var.item() == pytest.approx(schedule.posterior_variance[t].item(), rel=1e-12)
        assert beta.item() == pytest.approx(schedule.betas[t].item(), rel=1e-12)
    # a jump t -> s is the one-step posterior of the respaced chain through s and t
    respaced, tau = schedule.respaced(10)
    i = 5
    jump = schedule.posterior_coefficients(int(tau[i]), int(tau[i - 1]))
    assert jump[0].item() == pytest.approx(respaced.posterior_mean_coef1[i].item(), rel=1e-10)
    assert jump[2].item() == pytest.approx(respaced.posterior_variance[i].item(), rel=1e-10)


def test_the_width_and_length_runs_change_only_the_width_and_the_training_steps():
    """Chapter 32 compares them with the shipped ddpm: at its width and length the configuration is the shipped one."""
    from agm.config import to_dict
    from agm.diffusion import ddpm
    from agm.diffusion.evaluations import SCALE_RUNS, scale_config

    shipped = ddpm.DDPMConfig()
    assert to_dict(scale_config(shipped.unet.channels, shipped.train.steps)) == to_dict(shipped)
    for channels, steps in SCALE_RUNS.values():
        changed = to_dict(scale_config(channels, steps))
        changed["unet"]["channels"], changed["train"]["steps"] = shipped.unet.channels, shipped.train.steps
        assert changed == to_dict(shipped)


def test_paired_tail_is_students_t_two_sided_tail():
    """At |mean|/se = 4.303 with three seeds (2 degrees of freedom) the two-sided tail is 0.05 (t tables)."""
    assert evaluations.paired_tail(4.303, 1.0, 3) == pytest.approx(0.05, abs=1e-4)
    assert evaluations.paired_tail(-4.303, 1.0, 3) == evaluations.paired_tail(4.303, 1.0, 3)
    assert evaluations.paired_tail(0.0, 1.0, 3) == pytest.approx(1.0)
    assert evaluations.paired_tail(12.706, 1.0, 2) == pytest.approx(0.05, abs=1e-4)  # 1 degree of freedom
