"""SDS's x0-reconstruction form with std rescale (MVDream-threestudio) and t-range annealing."""

import math

import torch

from dsd.guidance.base import GuidanceContext
from dsd.guidance.sds import SDS, SDSConfig
from dsd.priors.analytic import AnalyticPrior, AnalyticPriorConfig
from dsd.priors.base import classifier_free_guidance


def multiview_prior():
    return AnalyticPrior(AnalyticPriorConfig(image_size=8, num_references=3, pool=["a cat"], mode="multiview"))


def cameras(objects=2):
    from dsd.cameras import orbit_cameras

    az = torch.cat([o * 20.0 + torch.arange(4, dtype=torch.float64) * 90 for o in range(objects)])
    full = lambda v: torch.full((len(az),), float(v), dtype=torch.float64)  # noqa: E731
    return orbit_cameras(full(15), az, full(2.0), full(50), 8, 8)


def context(prior, step=0, steps=10, objects=2):
    per_object = [torch.Generator().manual_seed(10 + o) for o in range(objects)]
    gens = [g for g in per_object for _ in range(4)]  # a seed's rows share its generator, as in the trainer
    rows = 4 * objects
    return GuidanceContext(prior=prior, cond=prior.condition("a cat", rows, cameras(objects)),
                           seeds=[o for o in range(objects) for _ in range(4)],
                           eps_star=torch.zeros(rows, 3, 8, 8), generators=gens, step=step, steps=steps)


def reference_draws(objects, t_lo, t_hi, shape):
    """t per object then noise per row, from fresh copies of the objects' generators."""
    gens = [torch.Generator().manual_seed(10 + o) for o in range(objects)]
    t = [int(torch.randint(t_lo, t_hi + 1, (), generator=g)) for g in gens]
    noise = torch.stack([torch.randn(shape, generator=gens[o]) for o in range(objects) for _ in range(4)])
    return torch.tensor(t).repeat_interleave(4), noise


def guided_and_conditional(prior, x_t, t, cond, scale):
    """ε̂ guided and conditional, from the raw predictions (independent of Prior.eps's batching)."""
    n = len(x_t)
    e_c = prior.predict_eps(x_t, t, cond, torch.zeros(n, dtype=torch.bool))
    e_u = prior.predict_eps(x_t, t, cond, torch.ones(n, dtype=torch.bool))
    return classifier_free_guidance(e_u, e_c, torch.full((n,), scale, dtype=torch.float64)), e_c


def test_x0_recon_with_std_rescale_matches_the_formula_per_object():
    prior = multiview_prior()
    x = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    cfg = SDSConfig(cfg_scale=50.0, t_min=0.3, t_max=0.7, form="x0_recon", recon_std_rescale=0.5)
    grad, _ = SDS(cfg, prior).grad(x, context(prior))
    t, noise = reference_draws(2, 300, 700, (3, 8, 8))
    a = prior.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    x_t = (a.sqrt() * x + (1 - a).sqrt() * noise).float()
    e_g, e_c = guided_and_conditional(prior, x_t, t, prior.condition("a cat", 8, cameras()), 50.0)
    x0_g = (x_t - (1 - a).sqrt() * e_g) / a.sqrt()
    x0_c = (x_t - (1 - a).sqrt() * e_c) / a.sqrt()
    want = torch.empty_like(x0_g)
    for o in (slice(0, 4), slice(4, 8)):  # std over the object's 4 views together
        factor = (x0_c[o].std() + 1e-8) / (x0_g[o].std() + 1e-8)
        want[o] = 0.5 * x0_g[o] * factor + 0.5 * x0_g[o]
    assert torch.allclose(grad.double(), (x - want).double(), atol=1e-4)


def test_x0_recon_without_rescale_is_x_minus_the_guided_reconstruction():
    prior = multiview_prior()
    x = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    grad, _ = SDS(SDSConfig(cfg_scale=7.5, t_min=0.2, t_max=0.9, form="x0_recon"), prior).grad(x, context(prior))
    t, noise = reference_draws(2, 200, 900, (3, 8, 8))
    a = prior.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    x_t = (a.sqrt() * x + (1 - a).sqrt() * noise).float()
    e_g, _ = guided_and_conditional(prior, x_t, t, prior.condition("a cat", 8, cameras()), 7.5)
    assert torch.allclose(grad.double(), (x - (x_t - (1 - a).sqrt() * e_g) / a.sqrt()).double(), atol=1e-4)


def test_t_range_anneals_linearly_then_stays():
    prior = multiview_prior()
    cfg = SDSConfig(t_min=0.98, t_max=0.98, t_min_final=0.02, t_max_final=0.5, anneal_until=0.8)
    sds = SDS(cfg, prior)
    x = torch.zeros(8, 3, 8, 8)
    for step, (lo, hi) in {0: (980, 980), 40: (int(1000 * (0.98 - 0.96 / 2)), int(1000 * (0.98 - 0.48 / 2))),
                           80: (20, 500), 99: (20, 500)}.items():
        _, info = sds.grad(x, context(prior, step=step, steps=100))
        t, _ = reference_draws(2, lo, hi, (3, 8, 8))
        assert math.isclose(info["t"], float(t.float().mean()))


def test_mvdream_sds_preset_is_mvdream_threestudio(compose):
    cfg = compose("guidance=mvdream_sds")
    g = cfg.guidance
    assert (g.name, g.cfg_scale, g.form, g.recon_std_rescale) == ("sds", 50.0, "x0_recon", 0.5)
    assert (g.t_min, g.t_max, g.t_min_final, g.t_max_final, g.anneal_until) == (0.98, 0.98, 0.02, 0.5, 0.8)
