"""Issue 33: fracgen as software people install. The wheel holds no top-level `train`, carries its data files, installs
with only the base dependencies (no torch) and renders and verifies there; with the `train` extra its console script
trains from a folder that holds its own train.py. Slow: two real installs into fresh virtual environments."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list, cwd: Path, timeout: float = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": "", **(env or {})})


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    built = _run([sys.executable, "-m", "pip", "wheel", ROOT, "--no-deps", "-q", "-w", out], ROOT)
    assert built.returncode == 0, built.stderr
    (path,) = out.glob("fracgen-*.whl")
    return path


def test_the_wheel_holds_the_packages_under_the_projects_name_and_its_data(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if ".dist-info" not in n} == {"fracgen", "fracgen_train"}  # no `train`
    assert "fracgen_train/experiments/base-a.json" in names and "fracgen_train/cli.py" in names
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "fracgen = fracgen.cli:app" in entry_points and "fracgen-train = fracgen_train.cli:main" in entry_points
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    head, _, description = metadata.partition("\n\n")  # what an index shows: the fields, then the README
    assert "Description-Content-Type: text/markdown" in head and description.startswith("# fracgen")
    assert "Classifier: Topic :: Scientific/Engineering :: Artificial Intelligence" in head
    assert "Author: the fracgen authors" in head and "Keywords: " in head and "License-Expression: MIT" in head


@pytest.mark.slow
def test_the_base_install_renders_without_torch_and_the_train_extra_trains_anywhere(wheel, tmp_path):
    venv = tmp_path / "venv"
    assert _run([sys.executable, "-m", "venv", venv], tmp_path).returncode == 0
    pip, bin_ = venv / "bin" / "pip", venv / "bin"
    base = _run([pip, "install", "-q", wheel], tmp_path)
    assert base.returncode == 0, base.stderr
    work = tmp_path / "elsewhere"  # no repository on the path: the installed package alone
    work.mkdir()
    assert _run([bin_ / "python", "-c", "import torch"], work).returncode == 1
    render = _run([bin_ / "fracgen", "render", "--classes", "8", "--size", "32", "--points", "2000", "--out", "shards"],
                  work)
    assert render.returncode == 0, render.stderr
    assert _run([bin_ / "fracgen", "verify", "shards"], work).returncode == 0
    assert _run([bin_ / "fracgen", "--version"], work).stdout.startswith("fracgen 0.")
    lacking = _run([bin_ / "fracgen-train", "pretrain", "--shards", "shards", "--out", "run"], work)
    assert lacking.returncode == 1 and lacking.stderr.strip().startswith("error: the trainer needs torch")
    assert "pip install 'fracgen[train]'" in lacking.stderr and len(lacking.stderr.strip().splitlines()) == 1

    torch = _run([pip, "install", "-q", "torch==2.14.1", "torchvision==0.29.1"], tmp_path)
    assert torch.returncode == 0, torch.stderr
    extra = _run([pip, "install", "-q", f"{wheel}[train]"], tmp_path)
    assert extra.returncode == 0, extra.stderr
    (work / "train.py").write_text("raise SystemExit('a project train.py was run instead of fracgen-train')\n")
    trained = _run([bin_ / "fracgen-train", "pretrain", "--shards", "shards", "--out", "run", "--steps", "2",
                    "--img-size", "32", "--patch-size", "8", "--depth", "2", "--batch", "8", "--eval-every", "0"],
                   work, env={"OMP_NUM_THREADS": "1"})
    assert trained.returncode == 0, trained.stdout + trained.stderr
    assert (work / "run" / "model.safetensors").is_file()
    control = _run([bin_ / "python", "-c", "from fracgen_train.experiments.control import base_a; "
                    "print(len(base_a()['maps']))"], work)
    assert control.stdout.strip() == "2", control.stderr  # the package's own data, read from the installed wheel


def test_version_needs_no_command():
    from typer.testing import CliRunner

    from fracgen.cli import app
    from fracgen.version import __version__

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"fracgen {__version__}", result.output
