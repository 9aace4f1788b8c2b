"""Preemption and failure: stop signals checkpoint at a step boundary and resume bit for bit, the
run dir lock, divergence, damaged or foreign checkpoints, failed writes, orphaned temporaries."""

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from dsd.errors import UserError
from dsd.outputs import load_result, load_views
from dsd.run import run

IMAGE = ("prior.image_size=16", "prompt=a teapot", "seeds=[0,1]", "trainer.steps=8", "trainer.checkpoint_every=0")
FAST_3D = ("prior.image_size=16", "prompt=a teapot", "seeds=[0,1]", "camera.video_frames=0", "camera.eval_views=2",
           "trainer.checkpoint_every=0", "camera.quantize_deg=30")
GAUSSIANS = (*FAST_3D, "representation=gaussians", "representation.num_points=150", "trainer.steps=6")
NERF = (*FAST_3D, "representation=nerf", "representation.num_samples=16", "representation.resolutions=[]",
        "representation.lambda_orient=0", "representation.mesh_resolution=32", "representation.eval_resolution=16",
        "trainer.steps=4")


@pytest.fixture
def signal_inside_guidance(monkeypatch):
    """signal_inside_guidance(sig, step, seed=None): the next runs send `sig` to this process from
    inside the guidance at `step` (of the batch holding `seed`), after the guidance drew that
    step's random numbers: where a Ctrl-C used to be saved as a half-finished step."""
    from dsd import trainer as trainer_module

    original = trainer_module.Trainer.__init__

    def arm(sig, at=None, seed=None):
        def init(self, *args, **kwargs):
            original(self, *args, **kwargs)
            grad = self.guidance.grad

            def grad_then_signal(x, ctx):
                out = grad(x, ctx)
                if ctx.step == at and (seed is None or seed in ctx.seeds):
                    os.kill(os.getpid(), sig)
                return out

            self.guidance.grad = grad_then_signal

        monkeypatch.setattr(trainer_module.Trainer, "__init__", original if sig is None else init)

    return arm


@pytest.fixture
def outer_handlers():
    """Handlers for SIGTERM/SIGUSR1/SIGUSR2 that only record (as submitit's would act): a run must
    chain to them after checkpointing, and without the run's own handling the signal cannot kill
    the test process."""
    calls = []
    sigs = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
    before = {sig: signal.signal(sig, lambda signum, frame: calls.append(signum)) for sig in sigs}
    yield calls
    for sig, handler in before.items():
        signal.signal(sig, handler)


def checkpoint_step(run_dir, seed, name="checkpoint.pt"):
    return torch.load(run_dir / f"seed_{seed}" / name, weights_only=False)["step"]


def assert_same_results(a, b, seeds):
    for seed in seeds:
        assert np.array_equal(load_result(a / f"seed_{seed}/result.npz"), load_result(b / f"seed_{seed}/result.npz"))
        assert np.array_equal(load_views(a / f"seed_{seed}/views.npz"), load_views(b / f"seed_{seed}/views.npz"))


@pytest.mark.parametrize(
    "overrides, sig, at",
    [
        (IMAGE, signal.SIGINT, 3),
        (IMAGE, signal.SIGTERM, 5),
        (GAUSSIANS, signal.SIGINT, 3),
        (GAUSSIANS, signal.SIGUSR1, 2),
        (NERF, signal.SIGTERM, 1),
    ],
    ids=["image-ctrl-c", "image-sigterm", "gaussians-ctrl-c", "gaussians-sigusr1", "nerf-sigterm"],
)
def test_a_signal_mid_step_checkpoints_the_step_boundary_and_resumes_bit_for_bit(
    compose, tmp_path, signal_inside_guidance, outer_handlers, overrides, sig, at
):
    run(compose(*overrides), tmp_path / "straight")
    signal_inside_guidance(sig, at)
    with pytest.raises(KeyboardInterrupt) as stopped:
        run(compose(*overrides), tmp_path / "resumed")
    signal_inside_guidance(None)
    # the step in progress finished; every seed of the batch is saved after it, nothing else written
    assert [checkpoint_step(tmp_path / "resumed", seed) for seed in (0, 1)] == [at + 1, at + 1]
    assert not (tmp_path / "resumed/seed_0/result.npz").exists()
    assert stopped.value.exit_code == 128 + sig
    assert f"checkpoints saved at step {at + 1} for seeds [0, 1]" in str(stopped.value)
    # a handler installed before the run's (submitit's requeue) still runs, after the checkpoints
    assert outer_handlers == ([] if sig == signal.SIGINT else [sig])
    run(compose(*overrides, "trainer.resume=true"), tmp_path / "resumed")
    assert_same_results(tmp_path / "straight", tmp_path / "resumed", (0, 1))


def test_finished_seeds_are_not_trained_again_on_resume(compose, tmp_path, signal_inside_guidance, monkeypatch):
    overrides = (*IMAGE, "seeds=[0,1,2]", "trainer.seed_batch=1")
    run(compose(*overrides), tmp_path / "straight")
    signal_inside_guidance(signal.SIGINT, 4, seed=1)
    with pytest.raises(KeyboardInterrupt) as stopped:
        run(compose(*overrides), tmp_path / "resumed")
    signal_inside_guidance(None)
    assert checkpoint_step(tmp_path / "resumed", 0) == 8 and checkpoint_step(tmp_path / "resumed", 1) == 5
    assert not (tmp_path / "resumed/seed_2").exists()
    assert "at step 5 for seeds [1]" in str(stopped.value) and "at step 8 for seeds [0]" in str(stopped.value)

    from dsd import trainer as trainer_module

    trained, step = [], trainer_module.Trainer.step
    monkeypatch.setattr(trainer_module.Trainer, "step", lambda self, states, k: trained.extend(s.seed for s in states)
                        or step(self, states, k))
    run(compose(*overrides, "trainer.resume=true"), tmp_path / "resumed")
    assert 0 not in trained and trained.count(1) == 3 and trained.count(2) == 8
    assert_same_results(tmp_path / "straight", tmp_path / "resumed", (0, 1, 2))


def test_a_second_ctrl_c_during_the_save_leaves_readable_checkpoints(compose, tmp_path, signal_inside_guidance,
                                                                     monkeypatch):
    overrides = (*IMAGE, "trainer.checkpoint_every=2")
    run(compose(*overrides), tmp_path / "straight")
    from dsd import outputs

    replace, renames = os.replace, []

    def replace_then_ctrl_c(src, dst):  # the second Ctrl-C lands between the two renames of seed 1's save
        replace(src, dst)
        renames.append(dst)
        if str(dst).endswith("seed_1/checkpoint.prev.pt") and len(renames) > 6:  # not the periodic saves
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(outputs.os, "replace", replace_then_ctrl_c)
    signal_inside_guidance(signal.SIGINT, 4)
    with pytest.raises(KeyboardInterrupt):
        run(compose(*overrides), tmp_path / "resumed")
    signal_inside_guidance(None)
    monkeypatch.setattr(outputs.os, "replace", replace)
    assert not list((tmp_path / "resumed").rglob("*.tmp"))
    assert checkpoint_step(tmp_path / "resumed", 0) == 5
    assert not (tmp_path / "resumed/seed_1/checkpoint.pt").exists()  # moved aside, the new one not written
    assert checkpoint_step(tmp_path / "resumed", 1, "checkpoint.prev.pt") == 4
    run(compose(*overrides, "trainer.resume=true"), tmp_path / "resumed")  # seed 1 from its previous checkpoint
    assert_same_results(tmp_path / "straight", tmp_path / "resumed", (0, 1))


WRAPPER = textwrap.dedent("""
    import os, signal, sys
    from dsd import trainer
    at, sig = int(os.environ["AT_STEP"]), getattr(signal, os.environ["SEND"])
    init = trainer.Trainer.__init__
    def patched(self, *args, **kwargs):
        init(self, *args, **kwargs)
        grad = self.guidance.grad
        def grad_then_signal(x, ctx):
            out = grad(x, ctx)
            if ctx.step == at:
                os.kill(os.getpid(), sig)
            return out
        self.guidance.grad = grad_then_signal
    trainer.Trainer.__init__ = patched
    from dsd.cli import run_main
    run_main()
""")


def dsd_run_signalled(tmp_path, send, at, *overrides):
    script = tmp_path / "signalled_dsd_run.py"
    script.write_text(WRAPPER)
    env = {**os.environ, "AT_STEP": str(at), "SEND": send, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(script), *overrides], env=env, capture_output=True, text=True,
                          timeout=120)


def test_sigterm_through_dsd_run_checkpoints_and_exits_nonzero_without_a_traceback(tmp_path):
    proc = dsd_run_signalled(tmp_path, "SIGTERM", 2, *IMAGE, f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode not in (0, 1, 2, -signal.SIGTERM), proc.stderr  # not done, not a crash, not killed
    assert "interrupted by SIGTERM: checkpoints saved at step 3 for seeds [0, 1]" in proc.stderr
    assert "trainer.resume=true" in proc.stderr and "Traceback" not in proc.stderr
    assert [checkpoint_step(tmp_path / "run", seed) for seed in (0, 1)] == [3, 3]


def test_a_run_dir_in_use_is_refused_and_a_dead_holders_lock_is_taken_over(compose, tmp_path):
    (tmp_path / "run").mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from dsd.outputs import RunDirLock; RunDirLock(sys.argv[1]).__enter__();"
         " print('locked', flush=True); time.sleep(120)", str(tmp_path / "run")],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=f"in use by another dsd-run .*pid {holder.pid}"):
            run(compose(*IMAGE, "trainer.steps=2"), tmp_path / "run")
        assert not (tmp_path / "run/seed_0").exists()
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / "run/.dsd-run.lock").exists()  # the dead holder's file remains; its lock does not
    run(compose(*IMAGE, "trainer.steps=2"), tmp_path / "run")
    assert (tmp_path / "run/summary.json").exists()


def test_a_diverging_seed_is_stopped_and_reported_while_the_others_go_on(compose, tmp_path, monkeypatch):
    from dsd import trainer as trainer_module

    original = trainer_module.Trainer.__init__

    def init(self, *args, **kwargs):  # seed 1's gradient turns non-finite from step 2 on
        original(self, *args, **kwargs)
        grad = self.guidance.grad

        def poisoned(x, ctx):
            out, info = grad(x, ctx)
            bad = torch.tensor([s == 1 and ctx.step >= 2 for s in ctx.seeds])
            return torch.where(bad.reshape(-1, 1, 1, 1), torch.full_like(out, float("nan")), out), info

        self.guidance.grad = poisoned

    monkeypatch.setattr(trainer_module.Trainer, "__init__", init)
    run(compose(*IMAGE, "trainer.max_nonfinite_steps=3"), tmp_path)
    seeds = json.loads((tmp_path / "summary.json").read_text())["seeds"]
    assert [(e["diverged"], e["steps"], e["skipped_steps"]) for e in seeds] == [(False, 8, 0), (True, 5, 3)]
    assert seeds[1]["final_loss"] is None and seeds[0]["final_loss"] > 0


def test_a_huge_learning_rate_diverges_honestly(compose, tmp_path, capsys):
    run(compose(*IMAGE, "trainer.steps=30", "trainer.optimizer=sgd", "trainer.lr=1e20",
                "trainer.max_nonfinite_steps=4"), tmp_path)
    text = (tmp_path / "summary.json").read_text()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON
    for entry in json.loads(text)["seeds"]:
        assert entry["diverged"] and entry["steps"] < 30 and entry["skipped_steps"] >= 4
        assert entry["final_loss"] is None  # not the 0.0 of a zeroed gradient
    assert "diverged" in capsys.readouterr().err


def test_resume_on_an_empty_run_dir_is_an_error_and_auto_resume_starts(compose, tmp_path):
    with pytest.raises(UserError, match=f"trainer.resume=true but {tmp_path / 'run'} holds no"):
        run(compose(*IMAGE, "trainer.resume=true"), tmp_path / "run")
    assert not (tmp_path / "run/seed_0").exists()
    run(compose(*IMAGE, "trainer.auto_resume=true"), tmp_path / "run")
    run(compose(*IMAGE), tmp_path / "straight")
    assert_same_results(tmp_path / "straight", tmp_path / "run", (0, 1))


def interrupted_run(compose, run_dir, interrupt_at_step, *overrides):
    interrupt_at_step(5)
    with pytest.raises(KeyboardInterrupt):
        run(compose(*IMAGE, "trainer.checkpoint_every=2", *overrides), run_dir)
    interrupt_at_step(None)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_checkpoint_falls_back_to_the_previous_one_or_names_the_file(compose, tmp_path, interrupt_at_step,
                                                                             damage):
    run(compose(*IMAGE, "trainer.checkpoint_every=2"), tmp_path / "straight")
    interrupted_run(compose, tmp_path / "run", interrupt_at_step)
    ckpt = tmp_path / "run/seed_1/checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:300] if damage == "truncated" else b"\x00garbage" * 50)
    run(compose(*IMAGE, "trainer.checkpoint_every=2", "trainer.resume=true"), tmp_path / "run")
    assert_same_results(tmp_path / "straight", tmp_path / "run", (0, 1))  # seed 1 resumed from step 4

    interrupted_run(compose, tmp_path / "bare", interrupt_at_step, "trainer.checkpoint_every=0")
    (tmp_path / "bare/seed_1/checkpoint.pt").write_bytes(b"garbage")
    with pytest.raises(UserError, match=f"{tmp_path / 'bare/seed_1/checkpoint.pt'} cannot be read"):
        run(compose(*IMAGE, "trainer.resume=true"), tmp_path / "bare")


@pytest.mark.parametrize("changed", ["prompt=a kettle", "guidance=sds", "trainer.lr=0.01"])
def test_a_checkpoint_of_another_config_is_refused_naming_the_file(compose, tmp_path, interrupt_at_step, changed):
    interrupted_run(compose, tmp_path / "run", interrupt_at_step)
    before = (tmp_path / "run/seed_0/checkpoint.pt").read_bytes()
    with pytest.raises(UserError, match=f"{tmp_path / 'run/seed_0/checkpoint.pt'} was written by another run config"
                                        f" \\({changed.split('=')[0]}"):
        run(compose(*IMAGE, "trainer.checkpoint_every=2", "trainer.resume=true", changed), tmp_path / "run")
    assert (tmp_path / "run/seed_0/checkpoint.pt").read_bytes() == before


def test_output_only_and_budget_keys_may_change_on_resume(compose, tmp_path, interrupt_at_step):
    """A requeued job on a smaller machine, or a resume that skips the video, is not another run."""
    interrupted_run(compose, tmp_path / "run", interrupt_at_step)
    run(compose(*IMAGE, "trainer.checkpoint_every=2", "trainer.resume=true", "trainer.memory_budget_gb=4",
                "camera.video_frames=0", "camera.video_resolution=32"), tmp_path / "run")
    assert (tmp_path / "run" / "summary.json").exists()


def test_a_full_disk_is_a_user_error_naming_the_file(compose, tmp_path, monkeypatch):
    from dsd import outputs

    class FullDisk:  # the file a write goes to when the disk is full
        def __init__(self, fd):
            self.fd = fd

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            os.close(self.fd)

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(outputs.os, "fdopen", lambda fd, mode: FullDisk(fd))
    with pytest.raises(UserError, match=r"could not write .*seed_0/checkpoint\.pt: No space left on device"):
        run(compose(*IMAGE, "trainer.checkpoint_every=2"), tmp_path)
    assert not list(tmp_path.rglob("*.tmp"))


def test_orphaned_temporaries_of_a_killed_run_are_removed_on_the_next_start(compose, tmp_path):
    orphans = [tmp_path / "seed_0/.checkpoint.pt.0a1b2c3d.tmp", tmp_path / ".summary.json.deadbeef.tmp",
               tmp_path / "seed_1/.turntable.tmp.mp4"]
    kept = tmp_path / "seed_0/.my notes.tmp.txt"
    for path in (*orphans, kept):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
    run(compose(*IMAGE, "trainer.steps=2"), tmp_path)
    assert not any(path.exists() for path in orphans) and kept.exists()


def test_the_slurm_launcher_requeues_and_a_requeued_job_resumes(compose, tmp_path, interrupt_at_step, monkeypatch):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from dsd.cli import CONFIG_PATH
    from dsd.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        launcher = hydra_compose("config", overrides=["hydra/launcher=slurm"], return_hydra_config=True).hydra.launcher
    assert launcher.max_num_timeout > 0 and launcher.signal_delay_s > 0
    run(compose(*IMAGE, "trainer.checkpoint_every=2"), tmp_path / "straight")
    interrupted_run(compose, tmp_path / "run", interrupt_at_step)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # what Slurm sets in a requeued job; no resume flag given
    from dsd import trainer as trainer_module

    steps, step = [], trainer_module.Trainer.step
    monkeypatch.setattr(trainer_module.Trainer, "step", lambda self, states, k: steps.append(k) or step(self, states, k))
    run(compose(*IMAGE, "trainer.checkpoint_every=2"), tmp_path / "run")
    assert steps == [5, 6, 7]  # continued, not restarted
    assert_same_results(tmp_path / "straight", tmp_path / "run", (0, 1))
