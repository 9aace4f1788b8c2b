import torch

from dsd.ode import OdeTrajectories, ddim_sample, ddim_step, ddim_timesteps
from dsd.priors.analytic import AnalyticPrior, AnalyticPriorConfig
from dsd.priors.base import x0_from_eps


def make_prior(k=4):
    return AnalyticPrior(AnalyticPriorConfig(image_size=8, num_references=k, pool=["a cat", "a dog"]))


def test_grid_matches_the_official_ddim_grid():
    assert ddim_timesteps(1000, 10).tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99, 0]


def test_ddim_step_is_eq1():
    x, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    a_t, a_n = torch.tensor([0.2, 0.3]), torch.tensor([0.5, 0.9])
    out = ddim_step(x, eps, a_t, a_n)
    for i in range(2):  # Eq. 1: x'/√ᾱ' = x/√ᾱ + (σ' − σ)·ε
        s_t, s_n = ((1 - a_t[i]) / a_t[i]).sqrt(), ((1 - a_n[i]) / a_n[i]).sqrt()
        torch.testing.assert_close(out[i] / a_n[i].sqrt(), x[i] / a_t[i].sqrt() + (s_n - s_t) * eps[i])


def test_single_reference_ddim_lands_exactly_on_it():
    prior = make_prior(k=1)
    cond = prior.condition("a dog", batch=3)
    eps_star = torch.randn(3, *prior.sample_shape, generator=torch.Generator().manual_seed(0))
    out = ddim_sample(prior, eps_star, cond, steps=5, cfg_scale=1.0)
    ref = prior.encode(prior.references("a dog"))
    torch.testing.assert_close(out, ref.expand_as(out), atol=1e-5, rtol=0)


def test_cache_gives_the_same_eps_as_resimulation_with_fewer_rows():
    prior = make_prior()
    cond = prior.condition("a cat", batch=2)
    eps_star = torch.randn(2, *prior.sample_shape, generator=torch.Generator().manual_seed(3))
    keys = [(0, "c"), (1, "c")]
    cached, fresh = (
        OdeTrajectories(prior, 10, 7.5, enabled=True),
        OdeTrajectories(prior, 10, 7.5, enabled=False),
    )
    queries = [torch.tensor([1, 2]), torch.tensor([3, 3]), torch.tensor([5, 4]), torch.tensor([10, 9])]
    rows_cached = rows_fresh = 0
    for j in queries:
        before = prior.rows_evaluated
        a = cached.eps_at(keys, eps_star, cond, j)
        rows_cached += prior.rows_evaluated - before
        before = prior.rows_evaluated
        b = fresh.eps_at(keys, eps_star, cond, j)
        rows_fresh += prior.rows_evaluated - before
        torch.testing.assert_close(a, b)
    assert rows_cached == 2 * (
        11 + 10
    )  # each grid point once per seed, cond + uncond rows (seed 1 stops at g_9)
    assert rows_fresh > rows_cached


def test_x0_at_is_eq3_of_the_trajectory_state():
    prior = make_prior()
    cond = prior.condition("a cat", batch=1)
    eps_star = torch.randn(1, *prior.sample_shape, generator=torch.Generator().manual_seed(4))
    ode = OdeTrajectories(prior, 4, 3.0)
    j = torch.tensor([2])
    x0 = ode.x0_at([(0,)], eps_star, cond, j)
    traj = ode.trajectories[(0,)]
    torch.testing.assert_close(
        x0[0], x0_from_eps(traj.xs[2][None], traj.eps[2][None], prior.alpha(ode.grid[j]))[0]
    )


def test_eps_exactly_at_steps_from_the_grid_point_and_matches_it_on_the_grid():
    prior = make_prior()
    cond = prior.condition("a dog", batch=2)
    eps_star = torch.randn(2, *prior.sample_shape, generator=torch.Generator().manual_seed(5))
    ode = OdeTrajectories(prior, 10, 7.5)
    keys = [(0,), (1,)]
    on_grid = ode.eps_exactly_at(keys, eps_star, cond, torch.tensor([799, 499]))
    torch.testing.assert_close(on_grid, ode.eps_at(keys, eps_star, cond, torch.tensor([2, 5])), atol=1e-6, rtol=0)
    t = torch.tensor([750, 333])
    off_grid = ode.eps_exactly_at(keys, eps_star, cond, t)
    for row, (j, tt) in enumerate(((2, 750), (6, 333))):  # independent: state at g_j, DDIM step, ε there
        x_j, e_j = ode.trajectories[keys[row]].xs[j], ode.trajectories[keys[row]].eps[j]
        a_j, a_t = prior.alpha(ode.grid[j : j + 1]), prior.alpha(torch.tensor([tt]))
        x_t = ddim_step(x_j[None], e_j[None], a_j, a_t)
        expected = prior.eps(x_t, torch.tensor([tt]), cond.rows([row]), 7.5)
        torch.testing.assert_close(off_grid[row : row + 1], expected)
    assert not torch.allclose(off_grid, ode.eps_at(keys, eps_star, cond, torch.tensor([2, 6])), atol=1e-3)


def test_cache_keeps_at_most_max_trajectories_least_recently_used_first():
    prior = make_prior()
    cond = prior.condition("a cat", batch=1)
    eps_star = torch.randn(1, *prior.sample_shape, generator=torch.Generator().manual_seed(6))
    ode = OdeTrajectories(prior, 4, 7.5, max_trajectories=2)
    j = torch.tensor([1])
    for key in ("a", "b", "a", "c"):  # "b" is the least recently used when "c" arrives
        ode.eps_at([key], eps_star, cond, j)
    assert list(ode.trajectories) == ["a", "c"]
    before = prior.rows_evaluated
    ode.eps_at(["a"], eps_star, cond, j)
    assert prior.rows_evaluated == before  # still cached
