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


class TwoPoints:
    """The exact DDIM / probability-flow ODE of a uniform mixture of two points x1, x2, written
    without dsd.ode or the prior's denoiser. In x̄ = x/√ᾱ with σ² = (1−ᾱ)/ᾱ, split x̄ − m = u·e + w
    (m = (x1+x2)/2, d = (x1−x2)/2 = L·e): the posterior is logistic in u alone,
    p(x1) − p(x2) = tanh(u·L/σ²), so E[x0|x̄] = m + tanh(u·L/σ²)·d and ε̂ = (x̄ − E[x0|x̄])/σ.
    The part of ε̂ off the line through x1, x2 is w/σ, so w ∝ σ exactly, and u follows
    du/dσ = (u − L·tanh(u·L/σ²))/σ."""

    def __init__(self, refs, alphas_cumprod, eps_star):
        x1, x2 = refs.flatten(1).double()
        self.m, self.d = (x1 + x2) / 2, (x1 - x2) / 2
        self.L = self.d.norm()
        self.e, self.a = self.d / self.L, alphas_cumprod
        xbar = eps_star.flatten(1) / self.a[999].sqrt() - self.m  # x(T−1) = ε*
        self.u0 = xbar @ self.e
        self.w0 = xbar - self.u0[:, None] * self.e

    def sigma(self, t):
        return ((1 - self.a[t]) / self.a[t]).sqrt()

    def state(self, t, u):
        """x(t) = √ᾱ·x̄ from the coordinate u at t. (B, D)"""
        return self.a[t].sqrt() * (self.m + u[:, None] * self.e + self.w0 * self.sigma(t) / self.sigma(999))

    def ddim(self, grid):
        """Euler steps in σ on `grid` (x̄' = x̄ + (σ' − σ)·ε̂): the states x(g_j), the posterior
        differences p(x1) − p(x2) there, and x0 = E[x0|x̄] at the last point."""
        u, states, posteriors = self.u0, [], []
        for t, t_next in zip(grid, [*grid[1:], None]):
            states.append(self.state(t, u))
            posteriors.append(torch.tanh(u * self.L / self.sigma(t) ** 2))
            pulled = self.L * posteriors[-1]  # the u-coordinate of E[x0|x̄]
            if t_next is not None:
                u = pulled + self.sigma(t_next) * (u - pulled) / self.sigma(t)
        return states, posteriors, self.m + posteriors[-1][:, None] * self.d

    def ode(self, t_end, substeps=400):
        """u(t_end) of the continuous ODE from T−1: RK4 in log σ (du/dlogσ = u − L·tanh(u·L/σ²))."""
        f = lambda u, log_s: u - self.L * torch.tanh(u * self.L / torch.exp(2 * log_s))  # noqa: E731
        log_s = torch.linspace(float(self.sigma(999).log()), float(self.sigma(t_end).log()), substeps + 1,
                               dtype=torch.float64)
        u = self.u0
        for lo, hi in zip(log_s[:-1], log_s[1:]):
            h, mid = hi - lo, (lo + hi) / 2
            k1 = f(u, lo)
            k2 = f(u + h / 2 * k1, mid)
            k3 = f(u + h / 2 * k2, mid)
            k4 = f(u + h * k3, hi)
            u = u + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        return u


def two_point_setup(batch=3):
    prior = make_prior(k=2)
    cond = prior.condition("a dog", batch=batch)
    refs = prior.references("a dog").double() * 2 - 1  # the mixture's two points, in prior space
    eps_star = torch.randn(batch, *prior.sample_shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return prior, cond, eps_star, TwoPoints(refs, prior.alphas_cumprod, eps_star)


def test_ddim_of_two_points_follows_the_closed_form_steps():
    """The official 10-step grid (999, 899, …, 99, 0), CFG 1 (conditional = the two points)."""
    prior, cond, eps_star, exact = two_point_setup()
    grid = [999 - 100 * k for k in range(10)] + [0]
    states, posteriors, x0 = exact.ddim(grid)
    ode = OdeTrajectories(prior, 10, 1.0)
    for j, state in enumerate(states):
        x, _ = ode.state_at([0, 1, 2], eps_star, cond, torch.full((3,), j))
        torch.testing.assert_close(x.flatten(1), state, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(ddim_sample(prior, eps_star, cond, 10, 1.0).flatten(1), x0, atol=1e-10, rtol=1e-10)
    # not a trivial case: two distinct points, and rows still undecided between them at t = 499
    assert exact.L > 0.1 and (posteriors[5].abs() < 0.9).any()


def test_ddim_of_two_points_converges_to_the_probability_flow_ode():
    """First order in the step: 10x the steps, about 10x closer to the fine-step ODE solution."""
    prior, cond, eps_star, exact = two_point_setup()
    checks = [899, 499, 199, 99, 0]  # on both grids below
    reference = torch.stack([exact.state(t, exact.ode(t)) for t in checks])
    errors = []
    for steps in (10, 100):
        ode = OdeTrajectories(prior, steps, 1.0)
        index = [int((ode.grid == t).nonzero()) for t in checks]
        ours = torch.stack([ode.state_at([0, 1, 2], eps_star, cond, torch.full((3,), j))[0].flatten(1)
                            for j in index])
        errors.append(float((ours - reference).abs().max()))
    assert errors[1] < errors[0] / 5 and errors[1] < 0.05, errors


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


def test_cache_keeps_at_most_max_per_seed_least_recently_used_first_per_seed():
    prior = make_prior()
    cond = prior.condition("a cat", batch=1)
    eps_star = torch.randn(1, *prior.sample_shape, generator=torch.Generator().manual_seed(6))
    ode = OdeTrajectories(prior, 4, 7.5, max_per_seed=2)
    j = torch.tensor([1])
    # seed 0's "b" is its least recently used when its "c" arrives; seed 1's keys never evict seed 0's
    for key in ((0, "a"), (1, "x"), (0, "b"), (1, "y"), (0, "a"), (1, "z"), (0, "c")):
        ode.eps_at([key], eps_star, cond, j)
    assert [k for k in ode.trajectories if k[0] == 0] == [(0, "a"), (0, "c")]
    assert [k for k in ode.trajectories if k[0] == 1] == [(1, "y"), (1, "z")]
    before = prior.rows_evaluated
    ode.eps_at([(0, "a")], eps_star, cond, j)
    assert prior.rows_evaluated == before  # still cached


def test_checkpointed_trajectories_rebuild_their_states_bit_for_bit():
    """Checkpoints carry each trajectory's start and predictions only; the states come back exact."""
    prior = make_prior()
    cond = prior.condition("a cat", batch=2)
    eps_star = torch.randn(2, *prior.sample_shape, generator=torch.Generator().manual_seed(3))
    ode = OdeTrajectories(prior, 4, 7.5)
    keys = [(7, "view a"), (7, "view b")]
    ode.eps_at(keys, eps_star, cond, torch.tensor([2, 4]))  # one partial, one whole trajectory
    saved = ode.state_for(7)
    assert all(set(v) == {"start", "eps"} for v in saved.values())
    # each start is its own row, not a view of the whole batch of ε* it came in (which torch.save would write)
    assert all(v["start"].untyped_storage().nbytes() == v["start"].numel() * v["start"].element_size()
               for v in saved.values())
    restored = OdeTrajectories(prior, 4, 7.5)
    restored.load_state(saved)
    for key in keys:
        a, b = ode.trajectories[key], restored.trajectories[key]
        assert len(a.xs) == len(b.xs) and len(a.eps) == len(b.eps)
        assert all(torch.equal(x, y) for x, y in zip(a.xs, b.xs))
        assert all(torch.equal(x, y) for x, y in zip(a.eps, b.eps))
    before = prior.rows_evaluated
    restored.eps_at(keys, eps_star, cond, torch.tensor([2, 4]))
    assert prior.rows_evaluated == before  # nothing re-simulated
