"""VQ-VAE: the quantizer, the straight-through estimator, the VQ losses' gradients, EMA, restarts, the prior."""

import itertools
import math

import pytest
import torch

from agm import checkpoint
from agm.cli import main
from agm.data import binarize, mnist
from agm.vae.code_prior import CodePrior, CodePriorConfig
from agm.vae.quantizer import (
    VectorQuantizer,
    ema_codebook_update,
    perplexity,
    quantize,
    restart_dead_codes,
    straight_through,
    vq_losses,
)
from agm.vae.vqvae import VQVAE, VQVAEConfig, decoder_nll, loss, training_pairs


def tiny(**kw) -> VQVAE:
    torch.manual_seed(0)
    config = dict(channels=8, res_blocks=1, codebook_size=6, code_dim=3,
                  prior=CodePriorConfig(width=16, layers=1, heads=2)) | kw
    return VQVAE(VQVAEConfig(**config))


# -- the quantizer -----------------------------------------------------------------------------------

def test_quantize_returns_the_nearest_code(generator):
    z = torch.randn(4, 7, 7, 5, generator=generator, dtype=torch.float64)
    codebook = torch.randn(10, 5, generator=generator, dtype=torch.float64)
    z_q, idx = quantize(z, codebook)
    brute = ((z.unsqueeze(-2) - codebook) ** 2).sum(-1)  # (4, 7, 7, 10), no expansion of the square
    assert idx.shape == (4, 7, 7) and z_q.shape == z.shape
    assert torch.equal(idx, brute.argmin(-1))
    assert torch.equal(z_q, codebook[brute.argmin(-1)])
    with pytest.raises(ValueError, match="share D"):
        quantize(z, codebook[:, :4])


def test_straight_through_passes_the_decoder_gradient_unchanged(generator):
    z_e = torch.randn(3, 7, 7, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    z_q = torch.randn(3, 7, 7, 4, generator=generator, dtype=torch.float64)
    w = torch.randn(4, generator=generator, dtype=torch.float64)

    def f(h):  # any smooth "decoder + loss"
        return (torch.sin(h * w) * h).sum()

    out = straight_through(z_e, z_q)
    assert torch.allclose(out, z_q, rtol=0, atol=1e-15)  # the forward value is the quantized one (to rounding)
    out.retain_grad()
    f(out).backward()
    assert torch.equal(z_e.grad, out.grad)  # the decoder input's gradient, copied bit for bit
    at_zq = z_q.clone().requires_grad_(True)
    f(at_zq).backward()
    assert torch.allclose(z_e.grad, at_zq.grad, rtol=0, atol=1e-12)  # dL/dz_e := dL/dz_q, unchanged


def test_vq_terms_have_the_gradients_of_the_paper(generator):
    """Sum-reduced squared errors: d/dz_q ||sg[z_e] - z_q||^2 = 2(z_q - z_e); d/dz_e beta||z_e - sg[z_q]||^2
    = 2 beta (z_e - z_q); each term reaches only its own argument."""
    beta = 0.3
    z_e = torch.randn(2, 7, 7, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    z_q = torch.randn(2, 7, 7, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    terms = vq_losses(z_e, z_q, beta)
    g_e, g_q = torch.autograd.grad(terms["codebook"].sum(), (z_e, z_q), allow_unused=True, materialize_grads=True)
    assert torch.equal(g_e, torch.zeros_like(g_e))
    assert torch.allclose(g_q, 2 * (z_q - z_e), atol=1e-12)
    g_e, g_q = torch.autograd.grad(terms["commitment"].sum(), (z_e, z_q), allow_unused=True, materialize_grads=True)
    assert torch.equal(g_q, torch.zeros_like(g_q))
    assert torch.allclose(g_e, 2 * beta * (z_e - z_q), atol=1e-12)
    assert torch.allclose(terms["commitment"], beta * ((z_e - z_q) ** 2).sum((1, 2, 3)))


def test_each_loss_term_reaches_only_its_parameters():
    model = tiny(codebook_update="loss")
    x = binarize(mnist("test")[0][:8], torch.Generator().manual_seed(0))
    out = model(x)
    vq = vq_losses(out["z_e"], out["z_q"], model.config.beta)
    reconstruction = torch.nn.functional.binary_cross_entropy_with_logits(out["logits"], x, reduction="sum")
    groups = {"encoder": list(model.encoder.parameters()), "codebook": [model.quantizer.codebook],
              "decoder": list(model.decoder.parameters())}
    reached = {}
    for name, term in {"reconstruction": reconstruction, "codebook": vq["codebook"].sum(),
                       "commitment": vq["commitment"].sum()}.items():
        grads = torch.autograd.grad(term, sum(groups.values(), []), allow_unused=True, retain_graph=True)
        it = iter(grads)
        per_group = {g: [next(it) for _ in ps] for g, ps in groups.items()}
        reached[name] = {g for g, gs in per_group.items() if any(x is not None and x.abs().sum() > 0 for x in gs)}
    assert reached == {"reconstruction": {"encoder", "decoder"}, "codebook": {"codebook"},
                       "commitment": {"encoder"}}


# -- EMA, restarts, perplexity ----------------------------------------------------------------------

def test_ema_with_decay_zero_is_the_k_means_centroid_update(generator):
    z = torch.randn(200, 3, generator=generator, dtype=torch.float64)
    codebook = torch.randn(5, 3, generator=generator, dtype=torch.float64)
    _, idx = quantize(z, codebook)
    N, m, new = ema_codebook_update(torch.ones(5, dtype=torch.float64), codebook.clone(), z, idx, 0.0, 0.0)
    for k in idx.unique():
        assert torch.allclose(new[k], z[idx == k].mean(0), atol=1e-12)
        assert N[k] == (idx == k).sum()
    # Laplace smoothing only shifts the counts by about epsilon
    _, _, smoothed = ema_codebook_update(torch.ones(5, dtype=torch.float64), codebook.clone(), z, idx, 0.0, 1e-5)
    assert torch.allclose(smoothed[idx.unique()], new[idx.unique()], rtol=1e-4)


def test_ema_is_the_exponentially_weighted_centroid(generator):
    """After T steps with epsilon = 0,
    e_i = (g^T m_0 + (1-g) sum_t g^(T-t) S_t) / (g^T N_0 + (1-g) sum_t g^(T-t) n_t)."""
    gamma, K = 0.8, 4
    codebook = torch.randn(K, 2, generator=generator, dtype=torch.float64)
    N, m = torch.ones(K, dtype=torch.float64), codebook.clone()
    num, den = m.clone(), N.clone()
    for _ in range(6):
        z = torch.randn(50, 2, generator=generator, dtype=torch.float64)
        idx = torch.randint(K, (50,), generator=generator)
        N, m, e = ema_codebook_update(N, m, z, idx, gamma, 0.0)
        S = torch.zeros(K, 2, dtype=torch.float64).index_add_(0, idx, z)
        n = torch.bincount(idx, minlength=K).double()
        num, den = gamma * num + (1 - gamma) * S, gamma * den + (1 - gamma) * n
    assert torch.allclose(e, num / den.unsqueeze(1), atol=1e-12)


def test_dead_codes_are_restarted_at_encoder_outputs(generator):
    vq = VectorQuantizer(codebook_size=5, code_dim=2, update="loss", dead_after=3)
    before = vq.codebook.detach().clone()
    z = torch.randn(40, 2, generator=generator)
    idx = torch.zeros(40, dtype=torch.long)  # only code 0 is ever used
    assert restart_dead_codes(vq, z, idx, 3, generator) == 0
    assert restart_dead_codes(vq, z, idx, 3, generator) == 0
    assert restart_dead_codes(vq, z, idx, 3, generator) == 4  # codes 1..4, unused for 3 steps
    assert torch.equal(vq.codebook[0], before[0])
    for k in range(1, 5):
        assert (vq.codebook[k] == z).all(1).any()  # sits on one of the batch's encoder outputs
        assert torch.equal(vq.embed_sum[k], vq.codebook[k]) and vq.cluster_size[k] == 1
    assert len({tuple(r.tolist()) for r in vq.codebook[1:]}) == 4  # on four different outputs
    assert vq.unused_steps.tolist() == [0, 0, 0, 0, 0]
    assert restart_dead_codes(vq, z, idx, 0, generator) == 0  # dead_after = 0 never restarts


def test_perplexity_of_uniform_and_single_code_histograms():
    assert perplexity(torch.full((64,), 7)) == pytest.approx(64)
    assert perplexity(torch.tensor([0, 12, 0])) == pytest.approx(1)
    assert perplexity(torch.tensor([1, 1, 2])) == pytest.approx(math.exp(1.5 * math.log(2)))
    with pytest.raises(ValueError):
        perplexity(torch.zeros(3))


# -- the prior ----------------------------------------------------------------------------------------

def test_prior_is_causal(generator):
    torch.manual_seed(0)
    prior = CodePrior(CodePriorConfig(width=32, layers=2, heads=4), codebook_size=8, length=49).eval()
    codes = torch.randint(8, (2, 49), generator=generator)
    with torch.no_grad():
        base = prior(codes)
        for i in (0, 17, 48):
            changed = codes.clone()
            changed[:, i] = (changed[:, i] + 1) % 8
            logits = prior(changed)
            assert torch.allclose(logits[:, : i + 1], base[:, : i + 1], atol=1e-6)  # positions <= i unchanged
            if i < 48:
                assert not torch.allclose(logits[:, i + 1], base[:, i + 1])


def test_prior_is_a_normalized_distribution():
    torch.manual_seed(0)
    prior = CodePrior(CodePriorConfig(width=8, layers=1, heads=2), codebook_size=3, length=3).double().eval()
    every = torch.tensor(list(itertools.product(range(3), repeat=3)))
    with torch.no_grad():
        assert prior.log_prob(every).exp().sum().item() == pytest.approx(1.0, abs=1e-12)


def test_prior_sampling_and_bad_codes(generator):
    model = tiny().eval()
    a = model.prior.sample(5, torch.Generator().manual_seed(3))
    b = model.prior.sample(5, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (5, 49) and 0 <= a.min() and a.max() < 6
    with pytest.raises(ValueError, match="lie in"):
        model.prior(torch.full((1, 49), 6))
    with pytest.raises(ValueError, match="temperature"):
        model.prior.sample(2, generator, temperature=0.0)


# -- the model ----------------------------------------------------------------------------------------

def test_shapes_and_wrong_inputs_raise_clear_errors(generator):
    model = tiny().eval()
    x = binarize(mnist("test")[0][:4], generator)
    out = model(x)
    assert out["z_e"].shape == (4, 7, 7, 3) and out["indices"].shape == (4, 7, 7)
    assert out["logits"].shape == (4, 1, 28, 28)
    assert torch.equal(model.codes(x), out["indices"])
    for bad in (torch.zeros(4, 28, 28), torch.zeros(4, 1, 32, 32), torch.zeros(4, 3, 28, 28)):
        with pytest.raises(ValueError, match=r"shape \[N, 1, 28, 28\]"):
            model(bad)
    with pytest.raises(ValueError, match="long tensor"):
        model.decode_codes(torch.zeros(2, 49, dtype=torch.long))
    with pytest.raises(ValueError, match="prior must be"):
        model.sample(2, generator, prior="gaussian")
    with pytest.raises(ValueError, match="codebook_update"):
        tiny(codebook_update="kmeans")
    samples = model.sample(3, generator, prior="uniform")
    assert samples.shape == (3, 1, 28, 28) and 0 <= samples.min() and samples.max() <= 1


def test_training_overfits_one_batch_and_uses_the_codebook():
    model = tiny(channels=16, codebook_size=16, code_dim=4)
    x = binarize(mnist("test")[0][:16], torch.Generator().manual_seed(0))
    params = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("prior.")]
    opt = torch.optim.Adam(params, lr=3e-3)
    first = None
    for _ in range(150):
        total, terms = loss(model, x)
        opt.zero_grad()
        total.backward()
        opt.step()
        model.quantizer.update(terms["z_e"].reshape(-1, 4), terms["indices"].flatten())
        first = first or terms["distortion"].mean().item()
    assert terms["distortion"].mean().item() < 0.6 * first
    assert len(terms["indices"].unique()) > 1


def test_decoder_nll_is_the_bernoulli_nll_of_the_decoder_reading_a_channels_last_grid(generator):
    model = tiny().eval()
    x = binarize(mnist("test")[0][:4], generator)
    z = torch.randn(4, 7, 7, 3, generator=generator)  # (B, 7, 7, D), a grid that is not the encoder's
    with torch.no_grad():
        nll = decoder_nll(model, z, x)
        probs = torch.sigmoid(model.decoder(z.permute(0, 3, 1, 2)))  # the decoder reads channels first
        ref = -(x * probs.log() + (1 - x) * (1 - probs).log()).sum((1, 2, 3))
        assert nll.shape == (4,) and torch.allclose(nll, ref, rtol=1e-5)
        # at z = z_e + sg[z_q - z_e] it is the distortion term of the loss
        _, terms = loss(model, x)
        z_e = model.encode(x)
        z_q, _ = quantize(z_e, model.quantizer.codebook)
        assert torch.allclose(decoder_nll(model, straight_through(z_e, z_q), x), terms["distortion"], rtol=1e-6)


def test_gray_target_is_the_expected_nll_of_a_fresh_binarization(generator):
    model = tiny().eval()
    gray = mnist("test")[0][:3]
    pairs = training_pairs(gray, 3, "gray", generator)
    x, target = next(pairs)
    assert set(x.unique().tolist()) <= {0.0, 1.0}
    assert all(any(torch.equal(t, g) for g in gray) for t in target)  # the gray images themselves, shuffled
    assert ((x == 1) <= (target > 0)).all()  # ink only where the gray image has some
    with torch.no_grad():
        _, terms = loss(model, x, target)
        logits = model(x)["logits"]
        draws = torch.stack([torch.nn.functional.binary_cross_entropy_with_logits(
            logits, torch.bernoulli(target, generator=generator), reduction="none").sum((1, 2, 3))
            for _ in range(3000)])
    se = draws.std(0) / math.sqrt(len(draws))
    assert ((draws.mean(0) - terms["distortion"]).abs() < 4 * se).all()
    x, target = next(training_pairs(gray, 3, "binary", generator))
    assert torch.equal(x, target)
    with pytest.raises(ValueError, match="target"):
        tiny(target="noisy")


# -- the command line -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("vqvae")
    assert main(["train", "vq-vae", "--smoke", "--out-dir", str(d)]) == 0
    return d


def test_train_smoke_and_sample(smoke_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("AGM_CHECKPOINTS", str(smoke_dir))
    manifest = checkpoint.read_manifest("vq-vae", smoke_dir)
    m = manifest.metrics
    assert m["test_nll_bound_nats"] == pytest.approx(m["test_distortion_nats"] + m["test_prior_rate_nats"])
    assert 1 <= m["codebook_perplexity"] <= m["codes_used"] <= manifest.config["codebook_size"]
    assert {"fid", "inception_score", "precision", "recall", "class_coverage"} <= set(m)
    assert {"autoencoder", "prior"} <= set(manifest.training)
    out = tmp_path / "v.pt"
    assert main(["sample", "vq-vae", "--n", "16", "--seed", "0", "--out", str(out)]) == 0
    images = torch.load(out, weights_only=True)["images"]
    assert images.shape == (16, 1, 28, 28) and 0 <= images.min() and images.max() <= 1
    assert main(["sample", "vq-vae", "--n", "4", "--prior", "uniform", "--binary", "--out", str(out)]) == 0
    assert set(torch.load(out, weights_only=True)["images"].unique().tolist()) <= {0.0, 1.0}


def test_sample_rejects_a_bad_temperature(smoke_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("AGM_CHECKPOINTS", str(smoke_dir))
    assert main(["sample", "vq-vae", "--n", "2", "--temperature", "0", "--out", str(tmp_path / "x.pt")]) == 2
