"""Build a typed Config from override strings without the CLI (tests, benchmarks, notebooks)."""

from __future__ import annotations

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from dsd.cli import CONFIG_PATH
from dsd.config import Config, register_configs


def compose_config(overrides: list[str] | tuple[str, ...] = ()) -> Config:
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    return OmegaConf.to_object(cfg)
