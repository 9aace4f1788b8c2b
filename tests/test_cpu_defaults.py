"""CPU speed defaults: trainer.num_threads reaches torch, trainer.seed_batch keeps its one default
for every representation (benchmarks/cpu_defaults.py), and a seed batch is lowered to fit
trainer.memory_budget_gb by the representation's step-memory estimate."""

import pytest
import torch

from dsd.config import TrainerConfig
from dsd.errors import UserError
from dsd.priors.analytic import AnalyticPrior, AnalyticPriorConfig
from dsd.representations.image import ImageConfig, ImageRepresentation
from dsd.trainer import Trainer, resolve_seed_batch

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def make_trainer(tmp_path, cfg: TrainerConfig) -> Trainer:
    from dsd.guidance.base import Guidance

    class NoGuidance(Guidance):
        def grad(self, x, ctx):
            return torch.zeros_like(x), {}

    prior = AnalyticPrior(AnalyticPriorConfig(image_size=8, num_references=2, pool=["a cat"]))
    make = lambda: ImageRepresentation(ImageConfig(), prior=prior)  # noqa: E731
    return Trainer(prior, NoGuidance(None, prior), "a cat", cfg, tmp_path, make, CPU)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_num_threads_reaches_torch(tmp_path, restore_threads, threads):
    torch.set_num_threads(4 if threads != 4 else 1)  # something else first, so the Trainer must set it
    make_trainer(tmp_path, TrainerConfig(num_threads=threads))
    assert torch.get_num_threads() == threads


def test_num_threads_zero_leaves_torch_alone(tmp_path, restore_threads):
    torch.set_num_threads(3)
    make_trainer(tmp_path, TrainerConfig(num_threads=0))
    assert torch.get_num_threads() == 3
    with pytest.raises(UserError, match="trainer.num_threads=-1"):
        make_trainer(tmp_path, TrainerConfig(num_threads=-1))


@pytest.mark.parametrize("representation", ["image", "gaussians", "nerf"])
def test_seed_batch_default_and_explicit_values_stand_within_the_budget(compose, representation):
    # one default for every representation (the measurement found no 3D slowdown from batching)
    cfg = compose(f"representation={representation}", "trainer.memory_budget_gb=0")
    assert cfg.trainer.seed_batch == 4 and resolve_seed_batch(cfg, CPU) == 4
    for batch in (1, 3, 7):
        cfg = compose(f"representation={representation}", f"trainer.seed_batch={batch}", "trainer.memory_budget_gb=0")
        assert resolve_seed_batch(cfg, CPU) == batch
        assert resolve_seed_batch(cfg, CUDA) == batch
    cfg.trainer.seed_batch = None  # a null from code that builds configs itself: the default
    assert resolve_seed_batch(cfg, CPU) == TrainerConfig().seed_batch


def nerf_step_gib(size: int, seeds: int, views: int = 1, samples: int = 64, features: int = 8 * 2) -> float:
    """Independent form of the NeRF estimate (defaults: 64 samples, 8 levels x 2 features): a fixed
    part per step plus, per ray sample of every seed, a part and a part per hash-grid feature."""
    from dsd.representations import nerf

    per_sample = nerf.STEP_BYTES_PER_SAMPLE + features * nerf.STEP_BYTES_PER_SAMPLE_FEATURE
    return (nerf.STEP_FIXED_BYTES + seeds * views * size * size * samples * per_sample) / 2**30


NERF_64_128 = ("representation=nerf", "representation.resolutions=[64,128]", "representation.resolution_milestones=[10]")


@pytest.mark.parametrize("fits", [1, 2, 3])
def test_memory_budget_splits_a_nerf_batch(compose, capsys, fits):
    # the largest render size of the schedule is what counts; the budget sits between fits and fits+1 seeds
    budget = (nerf_step_gib(128, fits) + nerf_step_gib(128, fits + 1)) / 2
    cfg = compose(*NERF_64_128, "trainer.seed_batch=8", f"trainer.memory_budget_gb={budget}")
    assert resolve_seed_batch(cfg, CPU) == fits
    note = capsys.readouterr().err
    assert f"trainer.seed_batch 8 -> {fits}" in note and "trainer.memory_budget_gb" in note
    roomy = compose(*NERF_64_128, "trainer.seed_batch=8", f"trainer.memory_budget_gb={nerf_step_gib(128, 8) * 1.01}")
    assert resolve_seed_batch(roomy, CPU) == 8
    assert "->" not in capsys.readouterr().err
    # four views per seed (camera.views_per_step) cost four times the samples
    views = compose(*NERF_64_128, "trainer.seed_batch=8", "camera.views_per_step=4",
                    f"trainer.memory_budget_gb={nerf_step_gib(128, 8) * 1.01}")
    assert resolve_seed_batch(views, CPU) == max(n for n in range(1, 9) if nerf_step_gib(128, n, views=4)
                                                  <= nerf_step_gib(128, 8) * 1.01)


def test_memory_budget_keeps_one_seed_and_says_it_does_not_fit(compose, capsys):
    cfg = compose("representation=nerf", "representation.resolutions=[128]", "representation.resolution_milestones=[]",
                  "trainer.seed_batch=4", "trainer.memory_budget_gb=0.001")
    assert resolve_seed_batch(cfg, CPU) == 1
    assert "even one seed exceeds it" in capsys.readouterr().err


def test_default_budget_is_half_the_memory_on_cpu_and_none_on_cuda(compose, capsys):
    import os

    half_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 / 2**30
    seeds = max([n for n in range(1, 65) if nerf_step_gib(128, n) <= half_gib], default=1)  # fits the default cap
    cfg = compose("representation=nerf", "representation.resolutions=[128]", "representation.resolution_milestones=[]",
                  "trainer.seed_batch=64")
    if not os.path.exists("/sys/fs/cgroup/memory.max"):  # a cgroup limit lowers the cap further
        assert resolve_seed_batch(cfg, CPU) == seeds
    assert resolve_seed_batch(cfg, CUDA) == 64


def test_memory_budget_ignores_representations_without_an_estimate(compose):
    cfg = compose("representation=gaussians", "trainer.seed_batch=8", "trainer.memory_budget_gb=0.000001")
    assert resolve_seed_batch(cfg, CPU) == 8


def test_negative_memory_budget_is_bad_input(compose):
    cfg = compose("representation=nerf", "trainer.memory_budget_gb=-1")
    with pytest.raises(UserError, match="trainer.memory_budget_gb=-1"):
        resolve_seed_batch(cfg, CPU)


def test_nerf_estimate_scales_with_samples_and_seeds():
    from dsd.representations.nerf import NerfConfig, step_memory_bytes

    for size, views, seeds in ((64, 1, 1), (128, 1, 2), (64, 4, 3)):
        assert step_memory_bytes(NerfConfig(), size, views, seeds) == pytest.approx(nerf_step_gib(size, seeds, views) * 2**30)
    same_samples = NerfConfig(num_samples=32, num_importance_samples=32)
    assert step_memory_bytes(same_samples, 64, 1, 2) == pytest.approx(step_memory_bytes(NerfConfig(), 64, 1, 2))
    assert step_memory_bytes(NerfConfig(num_samples=128), 64, 1) == pytest.approx(nerf_step_gib(64, 1, samples=128) * 2**30)
    wide = NerfConfig(num_levels=16, features_per_level=4)
    assert step_memory_bytes(wide, 64, 1, 2) == pytest.approx(nerf_step_gib(64, 2, features=64) * 2**30)
