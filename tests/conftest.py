import os

# Tests never reach the network: hub offline, W&B off unless a test turns it on.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))  # tests/tiny_sd.py

import torch  # noqa: E402

# The tests' tensors are tiny: one intra-op thread avoids OpenMP oversubscription stalls when the
# 2 CI cores are shared (measured: up to 10x slower renders with 2 threads under load).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    """A tiny random Stable Diffusion in diffusers layout, built once per session."""
    from tiny_sd import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd"), "epsilon")


@pytest.fixture
def compose():
    from dsd.compose import compose_config

    def _compose(*overrides: str):
        return compose_config(["wandb.mode=disabled", "device=cpu", *overrides])

    return _compose


@pytest.fixture
def interrupt_at_step(monkeypatch):
    """interrupt_at_step(k): the next runs raise KeyboardInterrupt (Ctrl-C) when the trainer reaches
    step k; interrupt_at_step(None) restores the trainer."""
    from dsd import trainer as trainer_module

    original = trainer_module.Trainer.step

    def arm(k):
        def step(self, states, step):
            if step == k:
                raise KeyboardInterrupt
            return original(self, states, step)

        monkeypatch.setattr(trainer_module.Trainer, "step", original if k is None else step)

    return arm
