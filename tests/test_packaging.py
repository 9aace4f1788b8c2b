"""A non-editable install works: the wheel carries the Hydra config tree (dsd/conf) and the
installed dsd-run runs from it, away from the repository."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent


def pip(*args: str, cwd: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", *args, "--no-deps", "--no-index", "--quiet"],
                          cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_wheel_install_runs_without_the_repository(tmp_path):
    # Build from a copy: setuptools writes build/ and *.egg-info next to the sources.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "dsd", src / "dsd", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    pip("wheel", "--no-build-isolation", "-w", str(tmp_path / "wheels"), "./src", cwd=tmp_path)
    (wheel,) = (tmp_path / "wheels").glob("dsd-*.whl")
    site = tmp_path / "site"
    pip("install", "--target", str(site), str(wheel), cwd=tmp_path)

    elsewhere = tmp_path / "elsewhere"  # not the repo: its dsd/ must not be importable
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    imported = subprocess.run([sys.executable, "-c", "import dsd; print(dsd.__file__)"],
                              cwd=elsewhere, env=env, capture_output=True, text=True, timeout=60)
    assert Path(imported.stdout.strip()).is_relative_to(site), imported.stdout + imported.stderr

    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [str(site / "bin" / "dsd-run"), "prior.image_size=8", "trainer.steps=2", "seeds=1",
         "wandb.mode=disabled", f"hydra.run.dir={run_dir}"],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads((run_dir / "summary.json").read_text())["seeds"][0]["steps"] == 2
    sources = yaml.safe_load((run_dir / ".hydra" / "hydra.yaml").read_text())["hydra"]["runtime"]["config_sources"]
    main = next(s for s in sources if s["provider"] == "main")
    assert Path(main["path"]).is_relative_to(site), main  # the config tree came from the wheel


BLOCK_NERFSTUDIO = """
import sys
class _Block:  # as if nerfstudio were not installed
    def find_spec(self, name, path=None, target=None):
        if name == "nerfstudio" or name.startswith("nerfstudio."):
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, _Block())
sys.argv = ["dsd-run", *sys.argv[1:]]
from dsd.cli import run_main
run_main()
"""


@pytest.mark.parametrize("representation", ["image", "nerf"])
def test_runs_without_nerfstudio_and_nerf_says_what_to_install(tmp_path, representation):
    proc = subprocess.run(
        [sys.executable, "-c", BLOCK_NERFSTUDIO, f"representation={representation}", "seeds=1", "trainer.steps=2",
         "prior.image_size=16", "camera.video_frames=0", f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"},
    )
    if representation == "image":
        assert proc.returncode == 0, proc.stderr
        assert (tmp_path / "run" / "summary.json").exists()
    else:
        assert proc.returncode == 2, proc.stderr
        assert "nerfstudio" in proc.stderr and "Traceback" not in proc.stderr
