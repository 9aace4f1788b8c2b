"""DSD*, Alg. 2 (dsd_2d) and DSD against references computed here, without dsd.ode: a plain DDIM loop
over the analytic prior's ε and the official code's formulas."""

from pathlib import Path

import pytest
import torch

from dsd.config import TrainerConfig
from dsd.guidance.base import GuidanceContext
from dsd.guidance.dsd import DSD, DSDConfig
from dsd.guidance.dsd_2d import DSD2D, DSD2DConfig, alg2_times
from dsd.guidance.dsd_sampling import DSDSampling, DSDSamplingConfig
from dsd.priors.analytic import AnalyticPrior, AnalyticPriorConfig
from dsd.representations.image import ImageConfig, ImageRepresentation
from dsd.seeding import seed_noise, step_generator
from dsd.trainer import Trainer

PROMPT = "a hamburger"


@pytest.fixture(scope="module")
def prior():
    return AnalyticPrior(AnalyticPriorConfig(image_size=16))


def ddim_states(prior, seed, times, cfg=7.5):
    """Plain deterministic DDIM from ε* of `seed` through `times` (decreasing): (x, ε) at each."""
    x, cond, out = seed_noise(seed, prior.sample_shape)[None], prior.condition(PROMPT, 1), []
    for i, t in enumerate(times):
        a = prior.alphas_cumprod[t]
        eps = prior.eps(x, torch.tensor([t]), cond, cfg)
        out.append((x, eps))
        if i + 1 < len(times):
            x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
            a_next = prior.alphas_cumprod[times[i + 1]]
            x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
    return out


def ddim_sample(prior, seed, n=10):
    """x0 at the last point of the official grid linspace(T−1, 0, n+1) (cast to int)."""
    grid = torch.linspace(prior.num_train_timesteps - 1, 0, n + 1, dtype=torch.float64).long().tolist()
    x, eps = ddim_states(prior, seed, grid)[-1]
    a = prior.alphas_cumprod[grid[-1]]
    return ((x - (1 - a).sqrt() * eps) / a.sqrt())[0].float()


def optimize(prior, guidance, seeds, steps, tmp_path: Path) -> list[torch.Tensor]:
    trainer = Trainer(prior, guidance, PROMPT, TrainerConfig(steps=steps, checkpoint_every=0), tmp_path,
                      lambda: ImageRepresentation(ImageConfig(), prior), torch.device("cpu"))
    states = [trainer.new_state(seed) for seed in seeds]
    trainer.optimize(states)
    return [s.representation.image.detach()[0] for s in states]


def nearest_reference(prior, image):
    refs = prior.encode(prior.references(PROMPT)).flatten(1)
    return int(((refs - image.flatten()[None]) ** 2).sum(1).argmin())


@pytest.mark.parametrize("steps", [7, 10, 15, 23])
def test_dsd_star_ends_on_the_ddim_sample_for_any_step_count(prior, tmp_path, steps):
    seeds = [0, 5]
    images = optimize(prior, DSDSampling(DSDSamplingConfig(ode_steps=10), prior), seeds, steps, tmp_path)
    for seed, image in zip(seeds, images):
        torch.testing.assert_close(image, ddim_sample(prior, seed), atol=1e-4, rtol=0)


def test_alg2_times_use_the_ddim_grid_point_between_t_and_t_delta():
    grid = torch.linspace(999, 0, 11, dtype=torch.float64).long()
    assert [alg2_times(i, 10, grid) for i in range(10)] == [
        (int(grid[i + 1]), int(grid[i]), i) for i in range(10)
    ]  # N = N_ddim: t and t_δ are consecutive grid points, t_ddim = t_δ
    for steps in (7, 15, 23):
        for i, (t, t_delta, k) in enumerate(alg2_times(i, steps, grid) for i in range(steps)):
            paper_t = 999 * (1 - (i + 1) / steps)  # t = T(1 − i/N), T−1 = 999 on this grid
            assert abs(t - paper_t) <= 1.5  # grid points are whole numbers
            assert abs(t_delta - min(paper_t + 99.9, 999)) <= 1.5  # t_δ = min(t + δ, T), δ = T/N_ddim
            assert t < grid[k] <= t_delta and k < 10  # t_ddim ∈ {999, 899, …, 99}


def test_dsd_2d_with_n_ddim_steps_reproduces_the_ddim_sample(prior, tmp_path):
    seeds = [0, 5]
    images = optimize(prior, DSD2D(DSD2DConfig(ode_steps=10), prior), seeds, 10, tmp_path)
    for seed, image in zip(seeds, images):
        torch.testing.assert_close(image, ddim_sample(prior, seed), atol=1e-4, rtol=0)


def test_dsd_2d_with_other_step_counts_lands_on_the_ddim_reference_for_most_seeds(prior, tmp_path):
    seeds = list(range(8))
    images = optimize(prior, DSD2D(DSD2DConfig(ode_steps=10), prior), seeds, 7, tmp_path)
    ddim = [nearest_reference(prior, ddim_sample(prior, seed)) for seed in seeds]
    assert len(set(ddim)) >= 4  # the seeds' DDIM samples are diverse, so agreement means something
    agree = sum(nearest_reference(prior, image) == ref for image, ref in zip(images, ddim))
    assert agree >= 6


def context(prior, seeds, step, steps):
    return GuidanceContext(
        prior=prior, cond=prior.condition(PROMPT, len(seeds)), seeds=seeds,
        eps_star=torch.stack([seed_noise(s, prior.sample_shape) for s in seeds]),
        generators=[step_generator(s) for s in seeds], step=step, steps=steps,
    )  # fmt: skip


def official_timesteps(ctx, T=1000, t_min=0.32, t_max=0.98):
    """The official schedule (stable_diffusion_dsd_guidance.py:320-332, 608-628) for ctx's rows,
    drawing the same U[0, 1) per row from copies of the rows' generators."""
    progress = (ctx.step / ctx.steps) ** 0.5
    t = int(T * ((t_max - t_min) * (1 - progress) + t_min))
    t_plus = []
    for g in ctx.generators:
        u = torch.rand((), generator=torch.Generator().set_state(g.get_state()), dtype=torch.float64)
        room = min(max(0.1 * (t - int(T * t_min)), 0.0), T - t - 1)
        t_plus.append(min(max(t + int(room * float(u)), 1), T - 1))
    return t, t_plus


def official_ode_eps(prior, seed, t_plus):
    """The official ε at t+δ: DDIM through the grid points above t+δ, a partial step to t+δ, one
    more prediction there (stable_diffusion_dsd_guidance.py:335-351)."""
    grid = torch.linspace(999, 0, 11, dtype=torch.float64).long().tolist()
    return ddim_states(prior, seed, [g for g in grid if g > t_plus] + [t_plus])[-1][1]


@pytest.mark.parametrize("step", [0, 4, 9])
def test_dsd_exact_gradient_is_the_official_computation(prior, step):
    seeds, steps = [1, 6], 10
    guidance = DSD(DSDConfig(), prior)  # the defaults: ode_target=exact
    ctx = context(prior, seeds, step, steps)
    t, t_plus = official_timesteps(ctx)
    grad, info = guidance.grad(torch.zeros(2, *prior.sample_shape), ctx)
    assert info["t"] == t and info["t_plus"] == sum(t_plus) / 2
    for row, seed in enumerate(seeds):
        a, a_plus = prior.alphas_cumprod[t], prior.alphas_cumprod[t_plus[row]]
        eps_ode = official_ode_eps(prior, seed, t_plus[row])
        cond = prior.condition(PROMPT, 1)
        at_t = prior.eps((1 - a).sqrt() * eps_ode, torch.tensor([t]), cond, 7.5)  # x = 0: x̂ is the noise part
        at_plus = prior.eps((1 - a_plus).sqrt() * eps_ode, torch.tensor([t_plus[row]]), cond, 1.0)
        torch.testing.assert_close(grad[row : row + 1], (1 - a).float() * (at_t - at_plus), atol=1e-5, rtol=1e-4)


def test_dsd_default_is_the_exact_target_and_the_presets_inherit_it(compose):
    assert DSDConfig().ode_target == "exact"
    for preset in ("dsd", "dsd_ode_init"):
        assert compose(f"guidance={preset}").guidance.ode_target == "exact"


def test_annealed_t_is_the_official_integer_at_every_step(prior):
    guidance, steps = DSD(DSDConfig(), prior), 500
    for step in range(steps):
        ctx = context(prior, [0], step, steps)
        assert int(guidance.timesteps(ctx)[0]) == official_timesteps(ctx)[0]


def test_exact_target_costs_one_guided_call_per_row_and_step_more_than_grid(prior):
    rows = {}
    for target in ("grid", "exact"):
        guidance = DSD(DSDConfig(ode_target=target), prior)
        before = prior.rows_evaluated
        for step in range(20):
            guidance.grad(torch.zeros(2, *prior.sample_shape), context(prior, [0, 1], step, 20))
        rows[target] = prior.rows_evaluated - before
    assert rows["exact"] - rows["grid"] == 20 * 2 * 2  # 20 steps x 2 rows x (conditional + unconditional)


def test_snapped_ode_cameras_share_one_trajectory_that_is_the_snapped_cameras_ddim():
    """guidance.ode_camera_deg: rows whose cameras round to the same grid point follow ONE ODE, the
    plain DDIM of ε* under the condition of the unperturbed orbit camera at that grid point."""
    from dsd.cameras import orbit_cameras

    prior = AnalyticPrior(AnalyticPriorConfig(image_size=16, num_references=4, pool=["a cat", "a cup"]))
    full = lambda n, v: torch.full((n,), float(v), dtype=torch.float64)  # noqa: E731
    cameras = orbit_cameras(torch.tensor([20.0, 25.0, 33.0]), torch.tensor([50.0, 65.0, 100.0]),
                            full(3, 2.0), full(3, 50), 16, 16)
    seed, grid_deg = 3, 30.0
    eps_star = seed_noise(seed, prior.sample_shape)
    ctx = GuidanceContext(
        prior=prior, cond=prior.condition("a cat", 3, cameras=cameras), seeds=[seed] * 3,
        eps_star=eps_star.expand(3, *prior.sample_shape), generators=[step_generator(seed) for _ in range(3)],
        step=0, steps=10, cameras=cameras,
        condition_for=lambda cams: prior.condition("a cat", len(cams), cameras=cams),
    )  # fmt: skip
    guidance = DSD(DSDConfig(ode_target="grid", ode_camera_deg=grid_deg), prior)
    keys, cond = guidance.ode_condition(ctx)
    assert keys[0] == keys[1] != keys[2]  # (20, 50) and (25, 65) both round to (30, 60); (33, 100) to (30, 90)

    grid = torch.linspace(999, 0, 11, dtype=torch.float64).long().tolist()[:4]
    for row, (elev, azim) in enumerate([(30.0, 60.0), (30.0, 60.0), (30.0, 90.0)]):
        stand_in = orbit_cameras(torch.tensor([elev]), torch.tensor([azim]), full(1, 2.0), full(1, 50), 16, 16)
        stand_in_cond = prior.condition("a cat", 1, cameras=stand_in)
        x = eps_star[None]
        for i, t in enumerate(grid):  # DDIM written out, independent of dsd.ode
            eps = prior.eps(x, torch.tensor([t]), stand_in_cond, 7.5)
            if i + 1 < len(grid):
                a, a_next = prior.alphas_cumprod[t], prior.alphas_cumprod[grid[i + 1]]
                x = a_next.sqrt() * (x - (1 - a).sqrt() * eps) / a.sqrt() + (1 - a_next).sqrt() * eps
        got = guidance.ode.eps_at(keys, ctx.eps_star, cond, torch.tensor([3, 3, 3]))[row]
        torch.testing.assert_close(got, eps[0], atol=1e-5, rtol=1e-4)
    assert len(guidance.ode.trajectories) == 2
    off = DSD(DSDConfig(ode_target="grid"), prior).ode_condition(ctx)[0]
    assert len(set(off)) == 3  # without snapping every camera is its own ODE
