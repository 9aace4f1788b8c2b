import os

# Tests never reach the network: hub offline, W&B off unless a test turns it on.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

import pytest  # noqa: E402


@pytest.fixture
def compose():
    from dsd.compose import compose_config

    def _compose(*overrides: str):
        return compose_config(["wandb.mode=disabled", "device=cpu", *overrides])

    return _compose
