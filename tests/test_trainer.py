"""The trainer's loss: each seed's guidance term is normalized by its number of views (official)."""

import torch

from dsd.cameras import orbit_cameras
from dsd.config import TrainerConfig
from dsd.guidance.base import Guidance
from dsd.priors.analytic import AnalyticPrior, AnalyticPriorConfig
from dsd.representations.gaussians import GaussiansConfig, GaussiansRepresentation
from dsd.trainer import Trainer


class PullToGray(Guidance):
    """A deterministic guidance: ∂L/∂x = x − 0.2 for every row (no randomness, no prior calls)."""

    def grad(self, x, ctx):
        return x - 0.2, {}


def parameter_gradients(tmp_path, views: int) -> dict[str, torch.Tensor]:
    prior = AnalyticPrior(AnalyticPriorConfig(image_size=16, num_references=2, pool=["a cat"]))
    trainer = Trainer(prior, PullToGray(None, prior), "a cat", TrainerConfig(steps=1, checkpoint_every=0), tmp_path,
                      lambda: GaussiansRepresentation(GaussiansConfig(num_points=60, backend="torch"), prior),
                      torch.device("cpu"))
    full = lambda v: torch.full((views,), float(v), dtype=torch.float64)  # noqa: E731
    same_view = orbit_cameras(full(20), full(30), full(2.0), full(50), 16, 16)  # `views` copies of one camera
    trainer.training_cameras = lambda states, step: [same_view for _ in states]
    state = trainer.new_state(0)
    trainer.step([state], 0)
    return {name: p.grad.clone() for name, p in state.representation.named_parameters()}


def test_a_seed_with_v_identical_views_gets_the_gradient_of_one_view(tmp_path):
    one = parameter_gradients(tmp_path / "one", views=1)
    three = parameter_gradients(tmp_path / "three", views=3)
    assert one["color_logits"].abs().max() > 0  # the pull reaches the parameters
    for name, grad in one.items():
        torch.testing.assert_close(three[name], grad, rtol=1e-3, atol=1e-4)  # float32 sums; V× would be 200%


class PullWithBetas(PullToGray):
    def adam_betas(self):
        return (0.0, 0.99)


def test_guidance_adam_betas_reach_every_parameter_group_and_survive_resume(tmp_path):
    prior = AnalyticPrior(AnalyticPriorConfig(image_size=16, num_references=2, pool=["a cat"]))
    make = lambda: GaussiansRepresentation(GaussiansConfig(num_points=60, backend="torch"), prior)  # noqa: E731
    trainer = Trainer(prior, PullWithBetas(None, prior), "a cat", TrainerConfig(steps=1, checkpoint_every=0),
                      tmp_path, make, torch.device("cpu"))
    state = trainer.new_state(0)
    assert len(state.optimizer.param_groups) > 1
    assert all(tuple(g["betas"]) == (0.0, 0.99) for g in state.optimizer.param_groups)
    trainer.save(state)
    resumed = trainer.load_or_new(0, resume=True)
    assert all(tuple(g["betas"]) == (0.0, 0.99) for g in resumed.optimizer.param_groups)
    plain = Trainer(prior, PullToGray(None, prior), "a cat", TrainerConfig(steps=1), tmp_path / "p", make,
                    torch.device("cpu")).new_state(0)
    assert all(tuple(g["betas"]) == (0.9, 0.99) for g in plain.optimizer.param_groups)
