"""Generic checks over the whole composed config, by key name: one table instead of one check per
method. Every number must be finite; keys that many methods share (t ranges, CFG scales, step
counts, camera angles, learning rates, ...) get one rule each, wherever they appear.

Two layers:
- `check_composed` looks at the raw DictConfig before it becomes typed dataclasses: keys that are
  not in the schema (`+foo=1`) and interpolations that cannot be resolved (a prompt with `${x}`).
- `check_values` walks the typed Config and applies `RULES` (called by dsd.config.validate).
A method with its own constraints still checks them in its constructor; this table holds only
what is true of a key name across methods.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fnmatch import translate
from functools import cache
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dsd.errors import UserError

# torch.Generator.manual_seed takes seeds in [0, 2**64); larger ones overflow.
SEED_LIMIT = 2**64
# The representation seeds are offset by the step (gaussians densification), so keep headroom.
INIT_SEED_LIMIT = 2**63


@dataclass(frozen=True)
class Rule:
    """`test` must hold for every number at a dotted key matching one of `keys` (fnmatch patterns;
    list elements are checked one by one). None values (null: "use the default") are skipped."""

    keys: tuple[str, ...]
    test: Callable[[float], bool]
    accepted: str  # completes "<key>=<value> is not accepted; use ..."
    exempt: tuple[str, ...] = ()


def _in(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> Callable[[float], bool]:
    def test(v: float) -> bool:
        return (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)

    return test


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


T_KEYS = ("guidance.t_min", "guidance.t_max", "guidance.t_min_final", "guidance.t_max_final",
          "guidance.t_next_min", "guidance.t_next_max")
# (low, high) keys that must be ordered when both are set
ORDERED_PAIRS = (
    ("guidance.t_min", "guidance.t_max"),
    ("guidance.t_min_final", "guidance.t_max_final"),
    ("guidance.t_next_min", "guidance.t_next_max"),
    ("prior.beta_start", "prior.beta_end"),
)

RULES: tuple[Rule, ...] = (
    # timesteps are fractions of T; t = T itself is outside the schedule
    Rule(T_KEYS, _in(0, 1, hi_open=True), "a fraction of the timesteps in [0, 1)"),
    # SDI's inversion runs the ODE backwards with a negative scale on purpose (its default -7.5)
    Rule(("*cfg_scale*",), _in(0, math.inf), "a guidance scale >= 0",
         exempt=("guidance.inversion_cfg_scale",)),
    Rule(("trainer.steps", "trainer.seed_batch", "trainer.log_every", "sampler.steps", "guidance.ode_steps",
          "guidance.denoising_steps", "guidance.inversion_steps", "guidance.phi_updates", "guidance.lora_rank",
          "guidance.phi_hidden", "guidance.supersample", "camera.views_per_step", "camera.eval_views",
          "prior.num_views", "prior.num_references", "prior.image_size", "representation.num_points",
          "representation.max_points", "representation.num_samples", "representation.num_levels"),
         _in(1, math.inf), "a positive integer (>= 1)"),
    Rule(("prior.num_train_timesteps",), _in(2, math.inf), "an integer >= 2"),
    Rule(("camera.resolution", "guidance.map_resolution"), _in(8, math.inf), "an integer >= 8, or null"),
    # H.264 (yuv420p) needs even frame sizes
    Rule(("camera.video_resolution",), lambda v: v >= 8 and v % 2 == 0, "an even integer >= 8"),
    Rule(("camera.video_frames", "trainer.checkpoint_every", "trainer.max_nonfinite_steps"), _in(0, math.inf),
         "an integer >= 0 (0: off)"),
    Rule(("trainer.lr", "guidance.lr", "guidance.phi_lr"), _in(0, math.inf, lo_open=True),
         "a learning rate > 0 (or null where the default is null)"),
    Rule(("representation.lr_*",), _in(0, math.inf), "a learning rate >= 0"),
    Rule(("trainer.num_threads", "trainer.memory_budget_gb"), _in(0, math.inf),
         "a value >= 0 (0: torch's default threads / no memory cap)"),
    Rule(("trainer.lambda_*", "camera.*_perturb", "camera.quantize_deg", "guidance.delta_ratio",
          "guidance.plus_ratio", "guidance.eta", "guidance.inversion_eta", "guidance.weight",
          "guidance.lambda_rgb", "representation.opacity_reg", "representation.scale_reg"),
         _in(0, math.inf), "a value >= 0 (0: off)"),
    Rule(("*_prob", "guidance.camera_dropout", "guidance.t_max_switch"), _in(0, 1), "a probability in [0, 1]"),
    Rule(("guidance.anneal_until",), _in(0, 1, lo_open=True), "a fraction of the run in (0, 1]"),
    Rule(("prior.beta_start", "prior.beta_end"), _in(0, 1, lo_open=True, hi_open=True), "a noise variance in (0, 1)"),
    # camera geometry, by name in every group (camera.*, prior.input_*, representation.view_*)
    Rule(("*fovy*",), _in(0, 180, lo_open=True, hi_open=True), "a field of view strictly between 0 and 180 degrees"),
    Rule(("*elevation*",), _in(-90, 90), "an elevation in [-90, 90] degrees"),
    Rule(("*distance*",), _in(0, math.inf, lo_open=True), "a camera distance > 0",
         exempt=("camera.relative_distance",)),
    Rule(("*_seed",), lambda v: _is_int(v) and 0 <= v < INIT_SEED_LIMIT, "an integer in [0, 2**63)"),
)


def leaves(obj: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every dataclass field and dict entry in the tree of `obj`; lists and
    scalars are values (walk lists with `_numbers`)."""
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            yield from leaves(getattr(obj, f.name), f"{path}.{f.name}" if path else f.name)
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from leaves(value, f"{path}.{key}")
    else:
        yield path, obj


def _numbers(value: Any) -> list[Any]:
    """The numbers in a value: itself, or the elements of a (nested) list."""
    if isinstance(value, (list, tuple)):
        return [n for element in value for n in _numbers(element)]
    return [value] if _is_number(value) else []


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _reject(key: str, value: Any, accepted: str) -> UserError:
    return UserError(f"{key}={value!r} is not accepted; use {accepted}.")


@cache
def _matcher(patterns: tuple[str, ...]) -> re.Pattern:
    return re.compile("|".join(translate(p) for p in patterns))


def check_values(cfg: Any) -> None:
    """Apply the finite check and `RULES` to every number of the typed config `cfg`."""
    values = {key: value for key, value in leaves(cfg) if _numbers(value)}
    for key, value in values.items():
        if any(isinstance(n, float) and not math.isfinite(n) for n in _numbers(value)):
            raise _reject(key, value, "finite numbers (nan and inf mean nothing here)")
    for rule in RULES:
        for key, value in values.items():
            if key in rule.exempt or not _matcher(rule.keys).match(key):
                continue
            if not all(rule.test(n) for n in _numbers(value)):
                raise _reject(key, value, rule.accepted)
    for low, high in ORDERED_PAIRS:
        lo, hi = values.get(low), values.get(high)
        if _is_number(lo) and _is_number(hi) and lo > hi:
            raise UserError(f"{low}={lo} and {high}={hi} are not accepted; use {low} <= {high}.")


def check_seed_values(seeds: list[int]) -> None:
    for seed in seeds:
        if not 0 <= seed < SEED_LIMIT:
            raise UserError(f"seeds contains {seed}, which is not accepted; use seeds in [0, 2**64).")


def unknown_keys(node: DictConfig, path: str = "") -> Iterator[str]:
    """Dotted keys of `node` that its schema (dataclass) does not have: `+key=value` adds them
    past the schema, and nothing would read them."""
    schema = OmegaConf.get_type(node)
    fields = {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
    for key in node.keys():
        full = f"{path}.{key}" if path else str(key)
        if fields is not None and key not in fields:
            yield full
            continue
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none() and not child._is_missing():
            yield from unknown_keys(child, full)


def _raw_value(node: Any) -> Any:
    return node._value() if hasattr(node, "_value") else node


def check_resolvable(node: DictConfig | ListConfig, path: str = "") -> None:
    """Resolve every interpolation (`${...}`) now, so a bad one is an input error naming its key."""
    keys = node.keys() if isinstance(node, DictConfig) else range(len(node))
    for key in keys:
        full = f"{path}.{key}" if path and isinstance(node, DictConfig) else (f"{path}[{key}]" if path else str(key))
        child = node._get_node(key)
        if isinstance(child, (DictConfig, ListConfig)) and not child._is_interpolation():
            check_resolvable(child, full)
            continue
        try:
            node[key]
        except OmegaConfBaseException as err:
            reason = str(err).splitlines()[0]
            raise UserError(
                f"{full}={_raw_value(child)!r} has an interpolation that cannot be resolved ({reason}); "
                "write \\${ for a literal ${ in a value (e.g. a prompt), or fix the ${...} reference."
            ) from None


def check_composed(cfg: DictConfig) -> None:
    """Input errors visible on the composed (untyped) config; see the module docstring."""
    unknown = list(unknown_keys(cfg))
    if unknown:
        raise UserError(
            f"{', '.join(unknown)}: not a config key (an override with + adds a key the config does not "
            "have, and nothing reads it); check the spelling against `dsd-run --cfg job`, which lists "
            "every accepted key."
        )
    check_resolvable(cfg)
