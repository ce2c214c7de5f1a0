"""Chapters 54–55's data and models: the simulated annotator against Bradley–Terry's probabilities, the cache of
pairs, the reward model learning a criterion it never sees, DPO's training on a small transformer, and PPO on a
learned reward logging the hidden one."""

import copy
import math

import pytest
import torch
from scipy import stats

from agm.autoregressive.ar_transformer import ARConfig, detokenize, tokenize
from agm.preference import dpo, pairs, reward_model
from agm.preference.losses import dpo_loss
from agm.preference.pairs import PreferencePairs, annotator_accuracy, label_pairs
from agm.preference.reward_model import RewardModel, RewardModelConfig
from agm.rl import finetune
from agm.rl.finetune import FinetuneConfig, PPOConfig

SMALL = ARConfig(width=16, layers=1, heads=2)




def random_tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 16, (n, 196), generator=torch.Generator().manual_seed(seed))


def ink(tokens: torch.Tensor) -> torch.Tensor:
    """A criterion a small network can learn: the share of black pixels of the decoded image, times 20."""
    return 20 * detokenize(tokens, 2).mean((1, 2, 3))


def ink_pairs(n: int, seed: int) -> PreferencePairs:
    g = torch.Generator().manual_seed(seed)
    # images of varied ink: each pixel black with a probability drawn per image
    density = torch.rand(2 * n, 1, 1, 1, generator=g)
    tokens = tokenize((torch.rand(2 * n, 1, 28, 28, generator=g) < density).float(), 2)
    scores = ink(tokens)
    return label_pairs(tokens[:n], tokens[n:], scores[:n], scores[n:], g)


# -- the annotator ----------------------------------------------------------------------------------------------


def test_the_annotator_chooses_with_the_bradley_terry_probability():
    n = 20_000
    differences = torch.tensor([0.0, 1.0, -2.0])
    a, b = random_tokens(3, 0), random_tokens(3, 1)
    for i, d in enumerate(differences):
        labelled = label_pairs(a[i:i + 1].expand(n, -1), b[i:i + 1].expand(n, -1), torch.full((n,), d),
                               torch.zeros(n), torch.Generator().manual_seed(i))
        a_chosen = (labelled.chosen == a[i]).all(1).float()
        p = torch.sigmoid(d).item()
        assert abs(a_chosen.mean().item() - p) < 4 * math.sqrt(p * (1 - p) / n)  # within four standard errors
        # the other one is rejected, and each score travels with its sequence
        assert ((labelled.rejected == b[i]).all(1) == (a_chosen == 1)).all()
        assert torch.equal(labelled.chosen_scores, torch.where(a_chosen == 1, d, torch.tensor(0.0)))


def test_the_annotators_ceiling_is_the_mean_sigmoid_of_the_absolute_score_difference():
    """By hand: |differences| 2 and 0 give (sigmoid(2) + 1/2) / 2 = 0.690399; and by simulation, the share of
    fresh labels that the hidden score orders correctly."""
    hand = PreferencePairs(random_tokens(2, 0), random_tokens(2, 1), torch.tensor([1.0, 3.0]), torch.tensor([3.0, 3.0]))
    assert annotator_accuracy(hand) == pytest.approx(0.690399, abs=1e-6)
    g = torch.Generator().manual_seed(0)
    n = 40_000
    score_a, score_b = 2 * torch.randn(n, generator=g), 2 * torch.randn(n, generator=g)
    tokens = random_tokens(1, 2).expand(n, -1)
    labelled = label_pairs(tokens, tokens, score_a, score_b, g)
    agree = (labelled.chosen_scores > labelled.rejected_scores).float().mean().item()
    assert abs(agree - annotator_accuracy(labelled)) < 4 * 0.5 / math.sqrt(n)


def test_pairs_refuse_bad_shapes_and_splits():
    t = random_tokens(4, 0)
    with pytest.raises(ValueError, match="one shape"):
        PreferencePairs(t, t[:, :10], torch.zeros(4), torch.zeros(4))
    with pytest.raises(ValueError, match="scores of shape"):
        PreferencePairs(t, t, torch.zeros(3), torch.zeros(4))
    p = PreferencePairs(t, t, torch.zeros(4), torch.zeros(4))
    train, held = p.split(1)
    assert len(train) == 3 and len(held) == 1 and torch.equal(held.chosen, t[3:])
    for bad in (0, 4):
        with pytest.raises(ValueError, match="held_out"):
            p.split(bad)


def test_cached_pairs_are_drawn_once_keyed_by_the_weights_and_redrawn_when_damaged(reference, classifier, tmp_path,
                                                                                     monkeypatch):
    monkeypatch.setenv("AGM_DATA", str(tmp_path))
    first = pairs.cached_pairs(reference, classifier, 6, seed=0)
    files = list((tmp_path / "cache").glob("preference-pairs-*.pt"))
    assert len(first) == 6 and len(files) == 1
    again = pairs.cached_pairs(reference, classifier, 6, seed=0)
    assert torch.equal(again.chosen, first.chosen) and torch.equal(again.rejected_scores, first.rejected_scores)
    # the hidden score is the classifier's log-probability of a seven, for chosen and rejected alike
    score = finetune.DigitReward(classifier, 7, 2)
    assert torch.allclose(first.chosen_scores, score(first.chosen)) and torch.allclose(first.rejected_scores,
                                                                                       score(first.rejected))
    files[0].write_bytes(b"not a checkpoint")
    assert torch.equal(pairs.cached_pairs(reference, classifier, 6, seed=0).chosen, first.chosen)
    other = copy.deepcopy(reference)
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    pairs.cached_pairs(other, classifier, 6, seed=0)
    assert len(list((tmp_path / "cache").glob("preference-pairs-*.pt"))) == 2  # other weights, another key


# -- the reward model -------------------------------------------------------------------------------------------


def test_the_reward_model_learns_a_criterion_it_only_sees_through_choices():
    """Labels from the ink criterion: held-out accuracy near the annotator's ceiling, far above chance."""
    data = ink_pairs(700, 0)
    config = RewardModelConfig(width=4, hidden=8, pairs=700, held_out=200,
                               train=reward_model.reward_model_training(epochs=8, batch_size=32))
    model, history = reward_model.fit(config, data)
    report = reward_model.reward_report(model, data.split(200)[1])
    assert history[-1]["loss"] < history[0]["loss"]
    assert report["accuracy"] > report["ceiling"] - 0.06 and report["ceiling"] > 0.75
    assert report["spearman"] > 0.8 and report["order_agreement"] > 0.85


def test_the_reward_report_of_the_hidden_score_itself():
    """A model that scores exactly the hidden score agrees with its ordering everywhere, and its accuracy is the
    share of labels the hidden score orders correctly."""
    data = ink_pairs(300, 1)

    class Oracle(RewardModel):
        def score_tokens(self, tokens, labels=None):
            return ink(tokens)

    report = reward_model.reward_report(Oracle(RewardModelConfig(pairs=2, held_out=1)), data)
    assert report["order_agreement"] == 1 and report["spearman"] == pytest.approx(1.0)
    assert report["accuracy"] == (data.chosen_scores > data.rejected_scores).float().mean().item()


def test_spearman_matches_scipy():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(50, generator=g)
    b = a + torch.randn(50, generator=g)
    assert reward_model.spearman(a, b) == pytest.approx(stats.spearmanr(a.numpy(), b.numpy()).statistic, abs=1e-10)


def test_the_reward_model_refuses_images_of_the_wrong_shape():
    model = RewardModel(RewardModelConfig())
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3,)
    with pytest.raises(ValueError, match=r"\[B, 1, 28, 28\]"):
        model(torch.zeros(3, 28, 28))
    with pytest.raises(ValueError, match="held_out"):
        RewardModelConfig(pairs=10, held_out=10)


# -- DPO --------------------------------------------------------------------------------------------------------


def test_the_sequence_log_prob_is_the_exact_log_likelihood_of_the_image(reference):
    tokens = random_tokens(5, 3)
    expected = reference.log_prob(detokenize(tokens, 2))
    assert torch.allclose(dpo.sequence_log_prob(reference, tokens, batch_size=2), expected, atol=1e-4)


def test_dpo_starts_at_log_two_and_learns_to_order_its_training_pairs(reference):
    data = ink_pairs(64, 2)
    config = dpo.DPOConfig(beta=0.5, pairs=64, held_out=16, policy=SMALL,
                           train=dpo.dpo_training(epochs=6, batch_size=16, lr=3e-3))
    chosen, rejected = dpo.implicit_rewards(reference, reference, data, config.beta)
    assert chosen.abs().max() == 0 and rejected.abs().max() == 0  # policy = reference: loss log 2
    loss, _ = dpo_loss(chosen, rejected, chosen, rejected, config.beta)
    assert loss.item() == pytest.approx(math.log(2))
    policy, history = dpo.fit(config, reference, data)
    train = data.split(16)[0]
    chosen, rejected = dpo.implicit_rewards(policy, reference, train, config.beta)
    assert (chosen > rejected).float().mean() > 0.8 and history[-1]["loss"] < math.log(2)


@pytest.mark.parametrize("changes, message", [({"beta": 0.0}, "beta"), ({"beta": -1.0}, "beta"),
                                              ({"pairs": 10, "held_out": 0}, "held_out")])
def test_bad_dpo_settings_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        dpo.DPOConfig(**changes)


# -- PPO on a learned reward ------------------------------------------------------------------------------------


def test_ppo_on_a_learned_reward_logs_the_hidden_score_beside_it(reference, classifier):
    torch.manual_seed(0)
    learned = RewardModel(RewardModelConfig(width=4, hidden=8))
    config = FinetuneConfig(method="ppo", kl_coef=0.1, rollout=8, snapshots=2, policy=SMALL,
                            ppo=PPOConfig(epochs=1, minibatches=2), train=finetune.finetune_training(steps=2))
    _, history, _ = finetune.finetune(config, reference, classifier, log=lambda s: None, reward_model=learned)
    # the first rollout is drawn before any update, from the reference itself: recompute both scores
    g = torch.Generator().manual_seed(config.train.seed)
    tokens = reference.sample_tokens(config.rollout, None, g)
    with torch.no_grad():
        assert history[0]["reward"] == pytest.approx(learned.score_tokens(tokens).mean().item(), abs=1e-5)
    assert history[0]["hidden_reward"] == pytest.approx(
        finetune.DigitReward(classifier, 7, 2)(tokens).mean().item(), abs=1e-5)
    _, plain, _ = finetune.finetune(config, reference, classifier, log=lambda s: None)
    assert "hidden_reward" not in plain[0]
