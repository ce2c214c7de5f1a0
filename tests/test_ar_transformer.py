"""The autoregressive transformer over patch tokens: exact tokens, causal conditionals, label or null context."""

import itertools

import pytest
import torch

from agm.autoregressive import ar_transformer
from agm.autoregressive.ar_transformer import ARConfig, ARTransformer, detokenize, loss, tokenize
from agm.nn.transformer import Transformer, TransformerConfig, filter_logits


def tiny(**changes):
    torch.manual_seed(0)
    return ARTransformer(ARConfig(**{"width": 16, "layers": 1, "heads": 2} | changes)).eval()


def binary_images(n, seed=0):
    return torch.bernoulli(torch.full((n, 1, 28, 28), 0.3), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("patch", [1, 2])
def test_tokens_round_trip_and_bit_i_is_pixel_i_of_the_patch(patch):
    x = binary_images(3)
    tokens = tokenize(x, patch)
    assert tokens.shape == (3, (28 // patch) ** 2) and tokens.max() < 2 ** (patch * patch)
    assert torch.equal(detokenize(tokens, patch), x)
    if patch == 2:  # token (row r, col c) holds pixels (2r, 2c), (2r, 2c+1), (2r+1, 2c), (2r+1, 2c+1) as bits 0..3
        r, c = 5, 9
        expected = sum(int(x[0, 0, 2 * r + a, 2 * c + b]) << (2 * a + b)
                       for a, b in itertools.product((0, 1), repeat=2))
        assert tokens[0, 14 * r + c].item() == expected


def test_tokenize_refuses_gray_levels_and_wrong_shapes():
    with pytest.raises(ValueError, match="binary images"):
        tokenize(torch.full((1, 1, 28, 28), 0.5), 2)
    with pytest.raises(ValueError, match="binary images"):
        tokenize(torch.zeros(1, 28, 28), 2)


def test_conditionals_are_causal_and_the_context_token_matters():
    model = tiny()
    tokens = tokenize(binary_images(1), 2)
    changed = tokens.clone()
    changed[0, 100:] = (changed[0, 100:] + 1) % 16
    with torch.no_grad():
        a, b = model.token_log_probs(tokens), model.token_log_probs(changed)
        assert torch.allclose(a[0, :100], b[0, :100], atol=1e-6)  # positions before 100 see only earlier tokens
        assert not torch.allclose(a[0, 100], b[0, 100])
        with_label = model.token_log_probs(tokens, torch.tensor([3]))
        assert not torch.allclose(a[0, 0], with_label[0, 0])


def test_log_prob_is_the_sum_of_the_token_conditionals_computed_through_the_cache():
    model = tiny()
    x = binary_images(2, seed=1)
    tokens = tokenize(x, 2)
    labels = torch.tensor([4, 7])
    with torch.no_grad():
        from agm.nn.attention import KVCache

        cache, total = KVCache(), torch.zeros(2)
        logits = model.transformer(model.context(2, labels), cache)[:, -1]
        for i in range(tokens.shape[1]):  # one token at a time, as sampling does
            total += logits.log_softmax(-1).gather(1, tokens[:, i:i + 1]).squeeze(1)
            if i < tokens.shape[1] - 1:
                logits = model.transformer(tokens[:, i:i + 1], cache)[:, -1]
        assert torch.allclose(model.log_prob(x, labels), total, atol=1e-3)


def test_sampling_is_seeded_same_with_and_without_the_cache_and_binary():
    model = tiny()
    labels = torch.tensor([1, 2, 3])
    a = model.sample_tokens(3, labels, torch.Generator().manual_seed(5))
    b = model.sample_tokens(3, labels, torch.Generator().manual_seed(5), use_cache=False)
    assert torch.equal(a, b) and a.shape == (3, 196)
    images = model.sample(3, torch.Generator().manual_seed(5), labels)
    assert torch.equal(images, detokenize(a, 2)) and set(images.unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(ValueError, match="labels must be"):
        model.sample_tokens(2, torch.tensor([1, 10]))


def test_top_k_one_is_greedy_decoding():
    model = tiny()
    drawn = model.sample_tokens(2, None, torch.Generator().manual_seed(0), top_k=1)
    with torch.no_grad():
        greedy = model(drawn).argmax(-1)  # teacher-forced argmax given the drawn prefix
    assert torch.equal(drawn, greedy)


def test_filter_logits_keeps_the_top_k_and_the_smallest_nucleus():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 12, generator=generator)
    kept = filter_logits(logits, top_k=3).isfinite()
    top3 = torch.zeros_like(kept).scatter(1, logits.topk(3).indices, True)
    assert (kept.sum(1) == 3).all() and torch.equal(kept, top3)
    for p in (0.3, 0.75, 0.95, 1.0):
        kept = filter_logits(logits, top_p=p).isfinite()
        probs = logits.softmax(-1)
        for row in range(len(logits)):  # brute force: the smallest prefix of the sorted symbols reaching p
            ordered = probs[row].sort(descending=True)
            size = int((ordered.values.cumsum(0) < p - 1e-6).sum()) + 1
            assert set(kept[row].nonzero().flatten().tolist()) == set(ordered.indices[:size].tolist())
    with pytest.raises(ValueError, match="top_p"):
        filter_logits(logits, top_p=0.0)
    with pytest.raises(ValueError, match="top_k"):
        filter_logits(logits, top_k=13)


def test_label_dropout_uses_the_null_context_at_the_rate_asked():
    x, y = binary_images(4), torch.tensor([0, 1, 2, 3])
    model = tiny(p_uncond=0.0)
    value, logs = loss(model, (x, y), torch.Generator().manual_seed(0))
    assert torch.allclose(value, -model.log_prob(x, y).mean()) and torch.allclose(logs["nll_labelled"], value)
    model.config.p_uncond = 0.999
    value, _ = loss(model, (x, y), torch.Generator().manual_seed(0))
    assert torch.allclose(value, -model.log_prob(x).mean())


def test_model_overfits_one_batch():
    torch.manual_seed(0)
    model = ARTransformer(ARConfig(width=32, layers=1, heads=2, p_uncond=0.0))
    x, y = binary_images(4), torch.tensor([0, 1, 2, 3])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        value, _ = loss(model, (x, y))
        first = first if first is not None else value.item()
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
    assert value.item() < 0.6 * first


def test_sample_option_unconditional_drops_the_labels():
    model = tiny()
    a = ar_transformer.sample(model, 2, torch.Generator().manual_seed(1), torch.tensor([3, 3]), unconditional=True)
    b = model.sample(2, torch.Generator().manual_seed(1), None)
    assert torch.equal(a, b)


def test_sampling_in_chunks_passes_each_chunk_its_own_labels(monkeypatch):
    model = ARTransformer(ARConfig(width=16, layers=1, heads=2))
    seen = []

    def fake_sample_tokens(n, labels, generator, **options):
        seen.append(labels.tolist())
        return torch.zeros(n, model.length, dtype=torch.long)

    monkeypatch.setattr(model, "sample_tokens", fake_sample_tokens)
    images = model.sample(5, None, torch.arange(5), chunk=2)
    assert images.shape == (5, 1, 28, 28)
    assert seen == [[0, 1], [2, 3], [4]]


def test_bayes_classify_is_bayes_rule_over_the_ten_conditional_likelihoods():
    model = tiny()
    x = binary_images(3, seed=2)
    log_prior = torch.log_softmax(torch.randn(10, generator=torch.Generator().manual_seed(0)), 0)
    with torch.no_grad():  # brute force: one image and one label at a time
        joint = torch.tensor([[model.log_prob(x[i:i + 1], torch.tensor([y])).item() + log_prior[y].item()
                               for y in range(10)] for i in range(3)], dtype=torch.float64)
    expected = (joint.exp() / joint.exp().sum(1, keepdim=True)).log()
    got = ar_transformer.bayes_classify(model, x, log_prior)
    assert got.shape == (3, 10) and torch.allclose(got.double(), expected, atol=1e-4)
    uniform = ar_transformer.bayes_classify(model, x)  # the default prior is uniform
    assert torch.allclose(uniform, ar_transformer.bayes_classify(model, x, torch.full((10,), -2.0)), atol=1e-5)
    assert not torch.allclose(uniform, got, atol=1e-3)  # and the prior is not ignored
    certain = torch.full((10,), -1e4).index_fill(0, torch.tensor([7]), 0.0)
    assert (ar_transformer.bayes_classify(model, x, certain).argmax(1) == 7).all()


def test_sampling_log_probs_give_the_law_that_generate_draws_from():
    torch.manual_seed(3)
    K, T = 3, 4  # symbols 0..2, start token 3: 81 sequences
    net = Transformer(TransformerConfig(vocab_size=K + 1, output_size=K, block_size=T, width=16, heads=2,
                                        layers=1)).eval()
    with torch.no_grad():
        net.head.weight.mul_(4)  # peaked conditionals, so that the settings below differ clearly
    every = torch.cartesian_prod(*[torch.arange(K)] * T)  # (K^T, T)
    start = torch.full((len(every), 1), K)
    with torch.no_grad():
        logits = net(torch.cat([start, every[:, :-1]], 1))  # (K^T, T, K)
    plain = logits.log_softmax(-1).gather(-1, every.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(ar_transformer.sampling_log_probs(logits, every), plain)
    n = 20_000
    for options in ({"temperature": 0.5}, {"temperature": 2.0, "top_k": 2}, {"top_p": 0.6}):
        law = ar_transformer.sampling_log_probs(logits, every, **options).sum(1).exp()  # (K^T,)
        assert abs(law.sum().item() - 1) < 1e-5
        drawn = net.generate(torch.full((n, 1), K), T, torch.Generator().manual_seed(1), **options)[:, 1:]
        index = (drawn * K ** torch.arange(T - 1, -1, -1)).sum(1)  # row of each draw in ``every``
        freq = torch.bincount(index, minlength=len(every)).double() / n
        assert 0.5 * (freq - law).abs().sum() < 0.02  # the draws follow the law ...
        assert 0.5 * (freq - plain.sum(1).exp()).abs().sum() > 0.05  # ... and not the untempered, unfiltered one
    with pytest.raises(ValueError, match="temperature"):
        ar_transformer.sampling_log_probs(logits, every, temperature=0.0)
