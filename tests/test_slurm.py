"""docs/slurm/pretrain.sbatch, run as SLURM would run it (issue 40): stub `srun` and `scontrol` on PATH, the
variables sbatch sets, the real torchrun and trainer on the CPU. SIGUSR1 to the batch shell (what
`--signal=B:USR1@N` sends) must end in a checkpoint and a requeue, and the same script, started again, continues
the run to its end."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fracgen.dataset import render_dataset

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "docs" / "slurm" / "pretrain.sbatch"

SRUN = """#!/bin/bash
echo "srun $*" >> "$STUB_LOG"
if [ "$1" != "--cpus-per-task=$SLURM_CPUS_PER_TASK" ]; then
    echo "srun stub: the first option must be --cpus-per-task=$SLURM_CPUS_PER_TASK, got $1" >&2
    exit 2
fi
shift
exec "$@"
"""
SCONTROL = """#!/bin/bash
echo "scontrol $*" >> "$STUB_LOG"
"""


def _stubs(folder: Path) -> Path:
    folder.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    return folder


def _job(tmp_path: Path, shards: Path, steps: int) -> tuple[list[str], dict]:
    """The batch script's command line and the environment sbatch would give it, stubs first on PATH."""
    stubs = tmp_path / "bin"
    if not stubs.exists():
        _stubs(stubs)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PATH": f"{stubs}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "STUB_LOG": str(tmp_path / "stubs.log"), "SLURM_JOB_ID": "4242", "SLURM_CPUS_PER_TASK": "2",
           "OUT": str(tmp_path / "run"), "SHARDS": str(shards), "PRESET": "cpu", "NPROC": "1"}
    args = ["bash", str(SCRIPT), "--steps", str(steps), "--img-size", "32", "--patch-size", "8", "--depth", "2",
            "--batch", "16", "--eval-every", "0", "--log-every", "1", "--ckpt-every", "5"]
    return args, env


def test_the_script_asks_for_what_the_docs_say():
    text = SCRIPT.read_text()
    for line in ("#SBATCH --signal=B:USR1@120", "#SBATCH --requeue", 'srun --cpus-per-task="$SLURM_CPUS_PER_TASK"',
                 "-m fracgen_train.pretrain", "trap stop_and_requeue USR1"):
        assert line in text, line
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0  # it parses


@pytest.mark.slow  # two torchrun starts
def test_sigusr1_to_the_batch_shell_checkpoints_requeues_and_the_same_script_finishes_the_run(tmp_path):
    shards = tmp_path / "shards"
    render_dataset(shards, classes=8, size=32, points=3000, shard_size=8, seed=0, workers=1)
    args, env = _job(tmp_path, shards, steps=120)
    job = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    lines = []
    deadline = time.time() + 240
    for line in job.stdout:
        lines.append(line)
        if re.match(r"step 10/", line) or time.time() > deadline:
            break
    job.send_signal(signal.SIGUSR1)  # to the batch shell only, as --signal=B: sends it
    rest, _ = job.communicate(timeout=120)
    log = "".join(lines) + rest
    assert job.returncode == 0, log
    assert "stopped by SIGTERM at step" in log and "requeueing job 4242" in log, log
    assert (tmp_path / "stubs.log").read_text().splitlines()[-1] == "scontrol requeue 4242"
    assert not (tmp_path / "run" / "model.safetensors").exists()  # not finished: continued by the next start

    again = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resumed from step" in again.stdout, again.stdout
    assert (tmp_path / "run" / "model.safetensors").exists()
    calls = (tmp_path / "stubs.log").read_text().splitlines()
    assert [c for c in calls if c.startswith("scontrol")] == ["scontrol requeue 4242"]  # finished: no requeue
    assert all(c.startswith("srun --cpus-per-task=2 torchrun ") for c in calls if c.startswith("srun"))
