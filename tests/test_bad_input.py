"""Bad input through the real `dsd-run` entry point (dsd.cli.run_main, in-process with sys.argv set):
every case exits with code 2, prints one paragraph naming the key, the value and what is accepted,
no traceback, and leaves no half-written run dir (no summary, checkpoint, seed dir or *.tmp).
Most cases fail in validation before a prior is built, so the table runs in seconds."""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from dsd import registry
from dsd.config import register_configs

TINY = ("seeds=1", "trainer.steps=1", "prior.image_size=8", "device=cpu", "camera.video_frames=0")


def run_dsd(argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `dsd-run *argv`, run in this process."""
    from hydra.core.hydra_config import HydraConfig

    from dsd.cli import run_main

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    old_argv, sys.argv = sys.argv, ["dsd-run", *argv]
    try:
        run_main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = old_argv
        # Hydra configured logging into this run dir; give the process its own logging back
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:], root.level = handlers, level
        HydraConfig.instance().cfg = None
    out = capsys.readouterr()
    return code, out.out, out.err


def error_paragraph(stderr: str) -> str:
    """The error report: from "error:" to the end of stderr, which must be one paragraph."""
    assert "error: " in stderr, stderr
    tail = stderr[stderr.index("error: "):].strip()
    assert "\n" not in tail, f"not one paragraph:\n{tail}"
    return tail


def half_written(run_dir: Path) -> list[str]:
    """What a run writes only once it has started: results, checkpoints, temporaries."""
    try:
        if not run_dir.is_dir():
            return []
    except OSError:  # e.g. a name too long to exist
        return []
    return [str(p) for p in run_dir.rglob("*")
            if p.name == "summary.json" or "checkpoint" in p.name or p.name.endswith(".tmp")
            or p.name.startswith("seed_") or p.name in ("grid.png", "result.npz")]


@dataclass
class Case:
    id: str
    args: tuple[str, ...]
    needles: tuple[str, ...]  # the key, the value and (a word of) what is accepted
    run_dir: str = "fresh"  # fresh | file | long | readonly | readonly_parent
    env: dict = field(default_factory=dict)  # None values unset the variable


def c(id: str, args: str | tuple[str, ...], *needles: str, **kwargs) -> Case:
    return Case(id, (args,) if isinstance(args, str) else args, needles, **kwargs)


CASES = [
    # unknown presets and keys must not run silently
    c("unknown-experiment", "experiment=foo", "experiment/foo", "demo2d"),
    c("unknown-guidance", "guidance=nope", "guidance/nope", "sds"),
    c("plus-unknown-key", "+foo=1", "foo", "not a config key", "--cfg job"),
    c("plus-unknown-nested-key", "+guidance.bar=2", "guidance.bar", "not a config key"),
    c("plusplus-unknown-key", "++trainer.nope=1", "trainer.nope", "not a config key"),
    c("unknown-key", "guidance.not_a_key=1", "guidance.not_a_key", "--cfg job"),
    c("wrong-type", "trainer.steps=abc", "trainer.steps", "abc", "Integer"),
    # trainer
    c("log-every-0", "trainer.log_every=0", "trainer.log_every", "=0", ">= 1"),
    c("log-every-negative", "trainer.log_every=-5", "trainer.log_every", "-5", ">= 1"),
    c("lr-nan", "trainer.lr=nan", "trainer.lr", "nan", "finite"),
    c("lr-inf", "trainer.lr=inf", "trainer.lr", "inf", "finite"),
    c("lr-minus-inf", "trainer.lr=-inf", "trainer.lr", "-inf", "finite"),
    c("lr-0", "trainer.lr=0", "trainer.lr", "0.0", "> 0"),
    c("lr-negative", "trainer.lr=-0.1", "trainer.lr", "-0.1", "> 0"),
    c("seed-batch-0", "trainer.seed_batch=0", "trainer.seed_batch", "=0", ">= 1"),
    c("ode-cache-0", "guidance.ode_cache_per_seed=0", "guidance.ode_cache_per_seed", "=0", ">= 1"),
    c("nonfinite-limit-negative", "trainer.max_nonfinite_steps=-1", "trainer.max_nonfinite_steps", "-1", ">= 0"),
    c("threads-negative", "trainer.num_threads=-1", "trainer.num_threads", "-1", ">= 0"),
    c("memory-budget-negative", "trainer.memory_budget_gb=-2", "trainer.memory_budget_gb", "-2", ">= 0"),
    c("steps-negative", "trainer.steps=-3", "trainer.steps", "-3", ">= 1"),
    c("checkpoint-every-negative", "trainer.checkpoint_every=-1", "trainer.checkpoint_every", "-1", ">= 0"),
    c("lambda-rgb-negative", "trainer.lambda_rgb=-1", "trainer.lambda_rgb", "-1.0", ">= 0"),
    # camera
    c("video-resolution-0", "camera.video_resolution=0", "camera.video_resolution", "=0", ">= 8"),
    c("video-resolution-odd", "camera.video_resolution=33", "camera.video_resolution", "33", "even"),
    c("resolution-0", "camera.resolution=0", "camera.resolution", "=0", ">= 8"),
    c("fovy-0", "camera.fovy_range=[0,50]", "camera.fovy_range", "0.0", "between 0 and 180"),
    c("fovy-180", "camera.fovy_range=[40,180]", "camera.fovy_range", "180.0", "between 0 and 180"),
    c("eval-fovy-negative", "camera.eval_fovy=-10", "camera.eval_fovy", "-10.0", "between 0 and 180"),
    c("elevation-above-90", "camera.elevation_range=[0,95]", "camera.elevation_range", "95.0", "[-90, 90]"),
    c("eval-elevation-above-90", "camera.eval_elevation=91", "camera.eval_elevation", "91.0", "[-90, 90]"),
    c("distance-0", "camera.distance_range=[0,2]", "camera.distance_range", "0.0", "> 0"),
    c("eval-distance-0", "camera.eval_distance=0", "camera.eval_distance", "0.0", "> 0"),
    c("azimuth-inverted", "camera.azimuth_range=[180,-180]", "camera.azimuth_range", "180.0", "low <= high"),
    c("elevation-inverted", "camera.elevation_range=[45,0]", "camera.elevation_range", "45.0", "low <= high"),
    c("eval-views-0", "camera.eval_views=0", "camera.eval_views", "=0", ">= 1"),
    c("video-frames-negative", "camera.video_frames=-1", "camera.video_frames", "-1", ">= 0"),
    c("eval-fovy-nan", "camera.eval_fovy=nan", "camera.eval_fovy", "nan", "finite"),
    c("perturb-negative", "camera.camera_perturb=-0.1", "camera.camera_perturb", "-0.1", ">= 0"),
    # prior
    c("timesteps-0", "prior.num_train_timesteps=0", "prior.num_train_timesteps", "=0", ">= 2"),
    c("image-size-0", "prior.image_size=0", "prior.image_size", "=0", ">= 1"),
    c("beta-end-inf", "prior.beta_end=inf", "prior.beta_end", "inf", "finite"),
    c("betas-inverted", ("prior.beta_start=0.02", "prior.beta_end=0.01"), "prior.beta_start", "0.02", "<="),
    # seeds
    c("seed-2-64", "seeds=[18446744073709551616]", "seeds", "18446744073709551616", "2**64"),
    c("seed-negative", "seeds=[-1]", "seeds", "-1", "list of ints"),
    c("seed-count-huge", "seeds=100000000", "seeds", "100000000", "count up to"),
    # prompt interpolation
    c("prompt-interpolation", "prompt=a ${foo} hat", "prompt", "${foo}", "\\${"),
    c("prompt-env-missing", "prompt=${oc.env:DSD_SURELY_UNSET_VARIABLE}", "prompt", "DSD_SURELY_UNSET_VARIABLE", "\\${"),
    # the run dir
    c("run-dir-is-a-file", (), "hydra.run.dir", "run_file", "not an existing file", run_dir="file"),
    c("run-dir-too-long", (), "hydra.run.dir", "File name too long", "255 bytes", run_dir="long"),
    c("run-dir-read-only", (), "hydra.run.dir", "denied", "can write", run_dir="readonly"),
    c("run-dir-in-read-only-dir", (), "hydra.run.dir", "can write", run_dir="readonly_parent"),
    # W&B online without a key: found up front, without the network
    c("wandb-online-no-key", "wandb.mode=online", "wandb.mode=online", "WANDB_API_KEY", "wandb.mode=offline",
      env={"WANDB_MODE": None, "WANDB_API_KEY": None}),
    c("guidance-t-nan", "guidance.t_min=nan", "guidance.t_min", "nan", "finite"),
    c("dsd-cfg-plus-negative", "guidance.cfg_scale_plus=-1", "guidance.cfg_scale_plus", "-1.0", ">= 0"),
    c("dsd-ode-cfg-negative", "guidance.ode_cfg_scale=-2", "guidance.ode_cfg_scale", "-2.0", ">= 0"),
]


def _guidance_fields() -> dict[str, set[str]]:
    register_configs()
    return {name: {f.name for f in dataclasses.fields(registry._REGISTRY["guidance"][name][1])}
            for name in registry.names("guidance")}


# Every guidance with such fields gets the generic rows (the checks are by key name, not per method).
for _name, _fields in _guidance_fields().items():
    g = f"guidance={_name}"
    if {"t_min", "t_max"} <= _fields:
        CASES.append(c(f"{_name}-t-min-above-t-max", (g, "guidance.t_min=0.9", "guidance.t_max=0.1"),
                       "guidance.t_min=0.9", "guidance.t_max=0.1", "<="))
        CASES.append(c(f"{_name}-t-max-above-1", (g, "guidance.t_max=1.5"), "guidance.t_max", "1.5", "[0, 1)"))
    cfg_key = next((f for f in sorted(_fields) if "cfg_scale" in f and f != "inversion_cfg_scale"), None)
    if cfg_key:
        CASES.append(c(f"{_name}-negative-{cfg_key}", (g, f"guidance.{cfg_key}=-1"), f"guidance.{cfg_key}", "-1.0", ">= 0"))
    if "ode_steps" in _fields:
        CASES.append(c(f"{_name}-ode-steps-0", (g, "guidance.ode_steps=0"), "guidance.ode_steps", "=0", ">= 1"))


def unwritable_dir(tmp_path: Path) -> Path:
    """A directory this process cannot write into: mode 0555, or where that does not bind (root),
    /sys/kernel (sysfs refuses new files even to root)."""
    ro = tmp_path / "read_only"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        (ro / "probe").touch()
    except PermissionError:
        return ro
    (ro / "probe").unlink()
    ro.chmod(0o755)
    sysfs = Path("/sys/kernel")
    try:
        (sysfs / "dsd-probe").touch()
    except OSError:
        return sysfs
    pytest.skip("no directory here refuses writes to this process")


def case_run_dir(kind: str, tmp_path: Path) -> Path:
    if kind == "fresh":
        return tmp_path / "run"
    if kind == "file":
        (tmp_path / "run_file").write_text("not a directory\n")
        return tmp_path / "run_file"
    if kind == "long":
        return tmp_path / ("x" * 300)
    if kind == "readonly":
        return unwritable_dir(tmp_path)
    if kind == "readonly_parent":
        return unwritable_dir(tmp_path) / "run"
    raise ValueError(kind)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_exits_2_with_one_paragraph(case: Case, tmp_path, capsys, monkeypatch):
    for key, value in case.env.items():
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    if case.env:
        monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a W&B key either
    run_dir = case_run_dir(case.run_dir, tmp_path)
    code, out, err = run_dsd([f"hydra.run.dir={run_dir}", *TINY, *case.args], capsys)
    assert code == 2, (code, err)
    assert "Traceback" not in err + out
    paragraph = error_paragraph(err)
    for needle in case.needles:
        assert needle in paragraph, (needle, paragraph)
    if tmp_path in run_dir.parents or run_dir == tmp_path:
        assert half_written(run_dir) == []
        assert [p for p in run_dir.parent.rglob("*") if p.name.endswith(".tmp")] == []


def test_there_are_at_least_40_cases():
    assert len(CASES) >= 40 and len({case.id for case in CASES}) == len(CASES)


def _set(obj, dotted: str, index, value):
    *parents, last = dotted.split(".")
    for name in parents:
        obj = getattr(obj, name)
    if index is None:
        setattr(obj, last, value)
    else:
        getattr(obj, last)[index] = value


def _float_leaves(cfg):
    """(key, list index or None) of every float field value and float list element."""
    leaves = []

    def walk(obj, path):
        for f in dataclasses.fields(obj):
            value, key = getattr(obj, f.name), f"{path}{f.name}"
            if dataclasses.is_dataclass(value):
                walk(value, key + ".")
            elif isinstance(value, float):
                leaves.append((key, None))
            elif isinstance(value, list):
                leaves.extend((key, i) for i, v in enumerate(value) if isinstance(v, float))

    walk(cfg, "")
    return leaves


def test_every_float_key_rejects_nan_and_inf():
    """Every float of every method's, prior's and representation's config (and of the shared
    sections), at nan and at inf, is an error naming its key."""
    from dsd.config import Config, validate
    from dsd.errors import UserError

    register_configs()
    seen = set()
    for group in ("guidance", "prior", "representation"):
        for name in registry.names(group):
            cfg = Config(prompt="a cat", seeds=[0], device="cpu", **{group: registry._REGISTRY[group][name][1]()})
            cfg.wandb.mode = "disabled"
            validate(cfg)  # the defaults are accepted
            for key, index in _float_leaves(cfg):
                if (key, index) in seen:
                    continue
                seen.add((key, index))
                for bad in (math.nan, math.inf):
                    broken = copy.deepcopy(cfg)
                    _set(broken, key, index, bad)
                    with pytest.raises(UserError) as info:
                        validate(broken)
                    assert f"{key}=" in str(info.value), (name, key, str(info.value))
    assert len(seen) > 50  # every group's floats were reached


LONG_PROMPT = ("a highly detailed photograph of a vintage red bicycle leaning against a weathered brick wall "
               "covered in ivy, golden hour light, shallow depth of field, 85mm lens, film grain, warm tones, "
               "award winning composition, trending")


def test_multirun_with_a_long_prompt_runs_every_job(tmp_path, capsys):
    assert 220 <= len(LONG_PROMPT) <= 260  # with its key, longer than a file name may be (255 bytes)
    code, out, err = run_dsd(["--multirun", f"hydra.sweep.dir={tmp_path}", *TINY, f'prompt="{LONG_PROMPT}"',
                              "trainer.lr=0.01,0.02"], capsys)
    assert code == 0, err
    summaries = sorted(tmp_path.glob("*/summary.json"))
    assert len(summaries) == 2


def test_a_failing_job_does_not_stop_the_sweep(tmp_path, capsys):
    code, out, err = run_dsd(["--multirun", f"hydra.sweep.dir={tmp_path}", *TINY, "trainer.lr=0.01,-1,0.02"], capsys)
    assert code == 2, err
    assert "Traceback" not in err + out
    jobs = {p.parent.name for p in tmp_path.glob("*/summary.json")}
    assert len(jobs) == 2  # the jobs before and after the failing one ran
    failed = [d for d in tmp_path.iterdir() if d.is_dir() and d.name not in jobs]
    assert len(failed) == 1 and half_written(failed[0]) == []
    assert "trainer.lr=-1.0" in err
    assert err.strip().splitlines()[-1].startswith("error: 1 of 3 jobs")


def test_errors_leave_the_process_as_it_was(tmp_path, capsys):
    """In-process calls (notebooks, these tests) get the environment and logging back."""
    before = os.environ.get("HYDRA_FULL_ERROR")
    code, _, _ = run_dsd([f"hydra.run.dir={tmp_path}", *TINY, "trainer.lr=nan"], capsys)
    assert code == 2 and os.environ.get("HYDRA_FULL_ERROR") == before
