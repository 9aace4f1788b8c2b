import math

import pytest
import torch

from dsd.priors.analytic import AnalyticPrior, AnalyticPriorConfig
from dsd.priors.base import add_noise, classifier_free_guidance
from dsd.priors.procedural import reference_images


def make_prior(**kw):
    return AnalyticPrior(
        AnalyticPriorConfig(image_size=8, num_references=4, pool=["a cat", "a dog", "a cup"], **kw)
    )


def brute_force_posterior_mean(x_t, a, refs):
    """Bayes over the mixture with torch.distributions, independent of the prior's code."""
    comps = torch.distributions.Normal(math.sqrt(a) * refs, math.sqrt(1 - a))  # (K, D) each
    log_lik = comps.log_prob(x_t[None]).sum(-1)  # uniform weights cancel
    return (torch.softmax(log_lik, 0)[:, None] * refs).sum(0)


def test_denoiser_matches_brute_force_posterior():
    prior = make_prior()
    cond = prior.condition("a dog", batch=3)
    refs = prior.encode(prior.references("a dog").double()).reshape(4, -1)
    all_refs = torch.cat([prior.encode(prior.references(p).double()).reshape(4, -1) for p in prior.prompts])
    gen = torch.Generator().manual_seed(0)
    t = torch.tensor([50, 400, 900])
    x0 = refs[torch.tensor([0, 2, 3])] + 0.3 * torch.randn(
        3, refs.shape[1], generator=gen, dtype=torch.float64
    )
    x_t = add_noise(x0, torch.randn(x0.shape, generator=gen, dtype=torch.float64), prior.alpha(t)).float()
    for unconditional, table in ((False, refs), (True, all_refs)):
        eps = prior.predict_eps(x_t.reshape(3, *prior.sample_shape), t, cond, torch.full((3,), unconditional))
        for row in range(3):
            a = float(prior.alpha(t[row : row + 1]))
            mean = brute_force_posterior_mean(x_t[row].double(), a, table)
            expected = (x_t[row].double() - math.sqrt(a) * mean) / math.sqrt(1 - a)
            torch.testing.assert_close(eps[row].flatten().double(), expected, atol=2e-5, rtol=1e-4)


def test_small_t_recovers_the_noise_and_large_noise_gives_the_mean():
    prior = make_prior()
    cond = prior.condition("a cat", batch=1)
    ref = prior.encode(prior.references("a cat")[1:2])
    noise = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([1])
    x_t = add_noise(ref, noise, prior.alpha(t))
    eps = prior.predict_eps(x_t, t, cond, torch.tensor([False]))
    torch.testing.assert_close(eps, noise, atol=1e-4, rtol=0)  # the posterior is sure of ref 1
    # ᾱ -> 0: x_t carries no information, the posterior is the uniform prior over the K refs.
    prior.alphas_cumprod = torch.full_like(prior.alphas_cumprod, 1e-16)
    weights = prior.posterior(x_t, t, cond, torch.tensor([False]))
    own = weights[0][weights[0] > 0]
    torch.testing.assert_close(own, torch.full_like(own, 0.25), atol=1e-6, rtol=0)
    assert len(own) == 4


def test_classifier_free_guidance_is_one_batched_call_and_exact():
    prior = make_prior()
    cond = prior.condition("a cup", batch=2)
    x = torch.randn(2, *prior.sample_shape, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([300, 600])
    eps_c = prior.predict_eps(x, t, cond, torch.tensor([False, False]))
    eps_u = prior.predict_eps(x, t, cond, torch.tensor([True, True]))
    before = prior.rows_evaluated
    guided = prior.eps(x, t, cond, torch.tensor([7.5, 1.0]))
    assert prior.rows_evaluated - before == 3  # 2 conditional rows + 1 unconditional (g != 1 only)
    torch.testing.assert_close(guided[0], eps_u[0] + 7.5 * (eps_c[0] - eps_u[0]))
    torch.testing.assert_close(guided[1], eps_c[1])
    torch.testing.assert_close(
        classifier_free_guidance(eps_u, eps_c, torch.tensor([0.0, 1.0])), torch.stack([eps_u[0], eps_c[1]])
    )
    assert not torch.allclose(eps_c, eps_u)  # the unconditional distribution really differs


@pytest.mark.parametrize("data", ["colourways", "separated"])
def test_references_are_deterministic_per_prompt_and_distinct(data):
    a1, a2 = reference_images("a teapot", 8, 16, data), reference_images("A teapot ", 8, 16, data)
    assert torch.equal(a1, a2)
    b = reference_images("a corgi", 8, 16, data)
    assert not torch.allclose(a1, b)
    assert a1.min() >= 0 and a1.max() <= 1
    d = torch.cdist(a1.reshape(8, -1), a1.reshape(8, -1)) + torch.eye(8) * 1e9
    assert d.min() > 0.5  # no two references coincide


def test_default_data_decides_gradually_and_separated_data_at_t_max():
    """The default references are not decided by the noise at t = T (so a diversity figure measures
    the guidance, not the start): few seeds are decided at g_0 and not all at 0.7T; the old
    `separated` data is decided by g_1 for every seed."""
    from dsd.metrics.decision import decision_curve

    seeds = list(range(32))
    prior = AnalyticPrior(AnalyticPriorConfig())
    grid, decided = decision_curve(prior, "a hamburger", seeds)
    assert decided[0] <= 0.5
    assert decided[grid.tolist().index(699)] < 1.0
    assert decided[-1] == 1.0
    old = AnalyticPrior(AnalyticPriorConfig(data="separated"))
    _, decided_old = decision_curve(old, "a hamburger", seeds)
    assert decided_old[0] >= 0.75 and decided_old[1] == 1.0


def test_reach_threshold_makes_the_reached_reference_unambiguous():
    from dsd.metrics.reference import nearest_reference, reach_threshold_db, summarize_references

    refs = reference_images("a teapot", 8, 16).permute(0, 2, 3, 1)
    threshold = reach_threshold_db(refs)
    flat = refs.reshape(8, -1).double()
    mse = torch.cdist(flat, flat).pow(2) / flat.shape[1] + torch.eye(8)
    assert abs(threshold - max(25.0, -10 * math.log10(float(mse.min())) + 6.0206)) < 1e-3
    # a point exactly at the threshold from its reference is still nearest to it
    a, b = torch.unravel_index(mse.argmin(), mse.shape)
    halfway = refs[a] + 0.5 * (refs[b] - refs[a]) * 0.99
    k, db = nearest_reference(halfway, refs)
    assert k == int(a) and db >= threshold - 0.1
    summary = summarize_references([0, 1, 1, 2], [60.0, 50.0, threshold - 1, 12.0], threshold)
    assert summary["distinct_references"] == 2 and summary["reached_seeds"] == 2
    assert summary["median_psnr_to_reference"] == (50.0 + threshold - 1) / 2
