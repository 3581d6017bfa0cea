"""Issue 28: pre-training that survives a cluster. One command starts or continues a run; SIGTERM / SIGUSR1 / SIGINT
stop it with a checkpoint; checkpoints are written atomically with a marker, the last K kept, due by steps or
minutes; torchrun's restarts continue from the newest complete checkpoint, bit for bit."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import train_cli

from fracgen.dataset import render_dataset
from train import pretrain as pretrain_cli
from train.checkpoint import LATEST, MARKER, Checkpoints, file_name, snapshot
from train.pretrain import Config, pretrain
from train.runtime import TrainError
from train.step import TrainStep

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(img_size=32, patch_size=8, depth=2, batch=16, log_every=1, eval_every=0, eval_samples=8)
AUGMENTED = dict(randaug="rand-m9-mstd0.5-inc1", reprob=0.5, cutmix=1.0, drop_path=0.1)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("preempt") / "shards"
    render_dataset(out, classes=8, size=32, points=3000, shard_size=8, seed=0, workers=1)
    return out


def _weights(out: Path) -> dict:
    return torch.load(out / "model.pth", weights_only=True)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def straight(shards, tmp_path_factory) -> dict:
    """The uninterrupted run every interrupted one must equal."""
    out = tmp_path_factory.mktemp("straight") / "run"
    pretrain(Config(shards=str(shards), out=str(out), steps=8, ckpt_every=3, **TINY, **AUGMENTED))
    return _weights(out)


# --- the checkpoint manager ------------------------------------------------------------------------------------

def test_checkpoints_are_kept_marked_and_the_newest_intact_one_is_loaded(tmp_path):
    state = {"model_name": "m", "model_args": {}, "num_classes": 2, "model": {"w": torch.ones(3)}, "step": 0,
             "config": {}}
    notes = []
    ckpts = Checkpoints(tmp_path, keep=2)
    for step in (1, 2, 3):
        ckpts.save(snapshot({**state, "step": step, "model": {"w": torch.full((3,), float(step))}}), step)
    ckpts.wait()
    marker = json.loads((tmp_path / MARKER).read_text())["checkpoints"]
    assert [e["step"] for e in marker] == [2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([LATEST, MARKER, file_name(2), file_name(3)])
    assert os.path.samefile(tmp_path / LATEST, tmp_path / file_name(3))  # ckpt.pt is the newest, not a copy
    loaded, path = ckpts.load_latest(resume=False, note=notes.append)
    assert loaded["step"] == 3 and path.name == file_name(3)
    raw = bytearray((tmp_path / file_name(3)).read_bytes())
    raw[len(raw) // 2] ^= 1  # damaged after it was written: the one before it is loaded, with a note
    (tmp_path / file_name(3)).unlink()
    (tmp_path / file_name(3)).write_bytes(bytes(raw))
    loaded, path = ckpts.load_latest(resume=False, note=notes.append)
    assert loaded["step"] == 2 and len(notes) == 1 and "does not match" in notes[0]
    (tmp_path / file_name(2)).write_bytes(b"truncated")
    with pytest.raises(TrainError, match="is intact"):
        ckpts.load_latest(resume=False, note=notes.append)


def test_a_folder_from_before_the_marker_loads_its_ckpt_pt(tmp_path):
    torch.save({"model_name": "m", "model_args": {}, "num_classes": 2, "model": {}, "step": 5, "config": {}},
               tmp_path / LATEST)
    ckpts = Checkpoints(tmp_path)
    assert ckpts.exists() and ckpts.load_latest(resume=False)[0]["step"] == 5


def test_a_write_killed_part_way_leaves_the_last_checkpoint_and_its_temporaries_go(tmp_path):
    ckpts = Checkpoints(tmp_path)
    ckpts.save({"model_name": "m", "model_args": {}, "num_classes": 2, "model": {}, "step": 1, "config": {}}, 1,
               wait=True)
    (tmp_path / (file_name(2) + ".tmp")).write_bytes(b"half a checkpoint")  # what a kill mid-write leaves
    (tmp_path / (LATEST + ".tmp")).write_bytes(b"")
    assert ckpts.load_latest(resume=False)[0]["step"] == 1
    ckpts.remove_temporaries()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([LATEST, MARKER, file_name(1)])


def test_checkpoints_fall_due_by_steps_and_by_minutes(tmp_path):
    now = [0.0]
    ckpts = Checkpoints(tmp_path, every_steps=5, every_minutes=2, clock=lambda: now[0])
    assert [s for s in range(1, 12) if ckpts.due_by_steps(s)] == [5, 10]
    assert not ckpts.due_by_time()
    now[0] = 119.0
    assert not ckpts.due_by_time()
    now[0] = 120.0
    assert ckpts.due_by_time()
    assert not Checkpoints(tmp_path).due_by_time() and not Checkpoints(tmp_path).due_by_steps(5)


# --- one command starts or continues ----------------------------------------------------------------------------

def _stop_at(monkeypatch, step_to_stop: int, signum=signal.SIGTERM):
    """The process signals itself once it has run step `step_to_stop` (0-based), as a scheduler would."""
    call = TrainStep.__call__

    def step(self, step, batches):
        call(self, step, batches)
        if step == step_to_stop:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(TrainStep, "__call__", step)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_a_signal_stops_with_a_checkpoint_and_the_same_run_continues_it_bit_for_bit(shards, straight, tmp_path,
                                                                                   monkeypatch, capsys, signum):
    cfg = Config(shards=str(shards), out=str(tmp_path / "run"), steps=8, ckpt_every=3, **TINY, **AUGMENTED)
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    with monkeypatch.context() as m:
        _stop_at(m, 4, signum)
        summary = pretrain(cfg)
    assert {sig: signal.getsignal(sig) for sig in before} == before  # the handlers are put back
    out = capsys.readouterr().out
    name = signal.Signals(signum).name
    assert summary == {"step": 5, "stopped_by": name, "signal": signum}
    assert f"stopped by {name} at step 5 of 8: checkpoint {tmp_path / 'run' / 'ckpt.pt'} written; the same " \
           "command continues the run" in out
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)["step"] == 5
    pretrain(cfg)  # the same call: continues from step 5
    assert "resumed from step 5" in capsys.readouterr().out
    assert _same(_weights(tmp_path / "run"), straight)


def test_the_command_line_starts_continues_or_refuses_in_one_line(shards, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["--shards", shards, "--out", out, "--steps", "4", "--img-size", "32", "--patch-size", "8",
            "--depth", "2", "--batch", "16", "--eval-every", "0", "--stop-after", "2"]
    code, stdout, err = train_cli(pretrain_cli.app, base, capsys)
    assert code == 0 and "stopped at step 2 of 4" in stdout, err
    code, stdout, err = train_cli(pretrain_cli.app, ["--no-resume", *base], capsys)
    assert code == 1 and err.strip() == f"error: {out} holds a checkpoint of a run: the same command without " \
                                        "--no-resume continues it; or choose another --out"
    code, stdout, err = train_cli(pretrain_cli.app, [*base, "--depth", "3"], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "holds another run" in err and "depth=2" in err
    code, stdout, err = train_cli(pretrain_cli.app, base, capsys)  # the same command again: continues
    assert code == 0 and "resumed from step 2" in stdout and "at step 4" in stdout, err
    code, stdout, err = train_cli(pretrain_cli.app, base, capsys)
    assert code == 0 and "already finished all 4 steps" in stdout
    code, stdout, err = train_cli(pretrain_cli.app, ["--resume", *base[:2], "--out", tmp_path / "new"], capsys)
    assert code == 1 and "--resume: no checkpoint" in err


def test_other_data_in_a_folder_of_a_run_is_refused(shards, tmp_path):
    other = tmp_path / "other"
    render_dataset(other, classes=8, size=32, points=3000, shard_size=8, seed=1, workers=1)
    args = dict(out=str(tmp_path / "run"), steps=4, stop_after=2, **TINY)
    pretrain(Config(shards=str(shards), **args))
    with pytest.raises(TrainError, match="is not the data the checkpoint was trained on"):
        pretrain(Config(shards=str(other), **args))


# --- real signals, real processes (slow) ---------------------------------------------------------------------------

def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _args(shards: Path, out: Path, steps: int) -> list[str]:
    return ["--shards", str(shards), "--out", str(out), "--steps", str(steps), "--img-size", "32", "--patch-size",
            "8", "--depth", "2", "--batch", "16", "--eval-every", "0", "--log-every", "1", "--ckpt-every", "3",
            "--randaug", "rand-m9-mstd0.5-inc1", "--reprob", "0.5", "--cutmix", "1.0", "--drop-path", "0.1"]


def _wait_for_step(proc, lines: list, step: int, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    for line in proc.stdout:
        lines.append(line)
        if re.match(rf"step {step}/", line) or time.time() > deadline:
            return


@pytest.mark.slow
def test_sigterm_to_a_real_run_exits_in_time_and_the_same_command_finishes_it(shards, tmp_path):
    steps = 60
    straight = subprocess.run([sys.executable, "-m", "train.pretrain", *_args(shards, tmp_path / "a", steps)],
                              cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr
    cmd = [sys.executable, "-m", "train.pretrain", *_args(shards, tmp_path / "b", steps)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    _wait_for_step(proc, lines, 10)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    rest, err = proc.communicate(timeout=60)
    assert time.time() - t0 < 30 and proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM at step" in rest and "the same command continues the run" in rest
    again = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "resumed from step" in again.stdout, again.stderr
    assert _same(_weights(tmp_path / "a"), _weights(tmp_path / "b"))


@pytest.mark.slow
def test_torchrun_restarts_a_killed_worker_and_ends_with_the_uninterrupted_weights(shards, tmp_path):
    """2 ranks on gloo. A worker killed with -9 mid-run: torchrun (--max-restarts 1) restarts the group with the same
    arguments, the workers continue from the newest complete checkpoint, and the weights equal those of a run that
    was never interrupted."""
    steps = 30

    def torchrun(out: Path, restarts: int) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               f"--max-restarts={restarts}", "-m", "train.pretrain", *_args(shards, out, steps)]
        return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)

    straight = torchrun(tmp_path / "a", 0)
    out_a, _ = straight.communicate(timeout=600)
    assert straight.returncode == 0, out_a
    proc = torchrun(tmp_path / "b", 1)
    lines: list[str] = []
    _wait_for_step(proc, lines, 8)  # past the checkpoint at step 6
    workers = subprocess.run(["pgrep", "-f", "-P", str(proc.pid), "train.pretrain"], capture_output=True, text=True)
    victim = int(workers.stdout.split()[-1])
    os.kill(victim, signal.SIGKILL)
    rest, _ = proc.communicate(timeout=600)
    log = "".join(lines) + rest
    assert proc.returncode == 0, log
    assert "resumed from step" in log
    assert _same(_weights(tmp_path / "a"), _weights(tmp_path / "b"))


# --- what the mutation run found unguarded (docs/testing.md) --------------------------------------------------

def test_a_snapshot_is_a_copy_later_steps_cannot_change():
    live = {"w": torch.zeros(3), "nested": [torch.ones(2)], "step": 4}
    copy = snapshot(live)
    live["w"].add_(1)
    live["nested"][0].mul_(5)
    assert torch.equal(copy["w"], torch.zeros(3)) and torch.equal(copy["nested"][0], torch.ones(2))
    assert copy["step"] == 4


def test_time_cadence_restarts_at_each_checkpoint(tmp_path):
    now = [1000.0]
    ckpts = Checkpoints(tmp_path, every_minutes=1, clock=lambda: now[0])
    now[0] = 1059.0
    assert not ckpts.due_by_time()
    now[0] = 1060.0
    assert ckpts.due_by_time()
    ckpts.save({"model": {}, "step": 1}, 1, wait=True)
    assert not ckpts.due_by_time()
    now[0] = 1120.0
    assert ckpts.due_by_time()


def test_a_failed_write_is_reported_by_the_next_wait(tmp_path):
    folder = tmp_path / "gone"
    folder.mkdir()
    ckpts = Checkpoints(folder)
    folder.rmdir()  # the run folder vanished under the writer
    ckpts.save({"model": {}, "step": 1}, 1)
    with pytest.raises(TrainError, match=f"writing a checkpoint in {folder} failed"):
        ckpts.wait()
    ckpts.wait()  # reported once


def test_the_marker_lists_only_checkpoints_that_are_there(tmp_path):
    ckpts = Checkpoints(tmp_path, keep=3)
    for step in (1, 2):
        ckpts.save({"model": {}, "step": step}, step, wait=True)
    (tmp_path / file_name(1)).unlink()  # removed by hand
    ckpts.save({"model": {}, "step": 3}, 3, wait=True)
    assert [e["step"] for e in ckpts.entries()] == [2, 3]
    (tmp_path / file_name(3)).unlink()
    notes = []
    state = {"model_name": "m", "model_args": {}, "num_classes": 2, "model": {}, "step": 2, "config": {}}
    ckpts.save(state, 2, wait=True)
    (tmp_path / file_name(3)).write_bytes(b"")  # listed, but empty
    assert ckpts.load_latest(resume=False, note=notes.append)[0]["step"] == 2 and len(notes) <= 1


def test_continuing_needs_the_optimizer_state_even_from_an_old_ckpt_pt(tmp_path):
    torch.save({"model_name": "m", "model_args": {}, "num_classes": 2, "model": {}, "step": 5, "config": {}},
               tmp_path / LATEST)  # a folder from before the marker, written without the optimizer
    with pytest.raises(TrainError, match="'optimizer' is missing"):
        Checkpoints(tmp_path).load_latest(resume=True)
    assert Checkpoints(tmp_path).load_latest(resume=False)[0]["step"] == 5


def test_without_hard_links_ckpt_pt_is_a_whole_copy(tmp_path, monkeypatch):
    import train.checkpoint as checkpoint_lib

    def no_links(src, dst):
        raise OSError("this file system has no hard links")

    monkeypatch.setattr(checkpoint_lib.os, "link", no_links)
    ckpts = Checkpoints(tmp_path)
    state = {"model": {"w": torch.arange(5000.0)}, "step": 1}
    ckpts.save(snapshot(state), 1, wait=True)
    assert not os.path.samefile(tmp_path / LATEST, tmp_path / file_name(1))
    assert (tmp_path / LATEST).read_bytes() == (tmp_path / file_name(1)).read_bytes()
    assert not (tmp_path / (LATEST + ".tmp")).exists()


# --- train/preempt.py in this process (issue 39): the subprocess tests above are invisible to a mutation pass ---

from train.preempt import Agreement, Interrupted, Preemption  # noqa: E402


def test_a_signal_before_the_loop_raises_its_own_name_at_once_and_again_at_defer():
    previous = signal.getsignal(signal.SIGUSR1)
    with Preemption() as p:
        assert signal.getsignal(signal.SIGUSR1) == p._handle
        with pytest.raises(Interrupted) as caught:
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(1)  # the handler runs at the next bytecode; never reached
        assert (caught.value.signum, caught.value.name, str(caught.value)) == (signal.SIGUSR1, "SIGUSR1", "SIGUSR1")
        assert (p.received, p.name) == (signal.SIGUSR1, "SIGUSR1")
        with pytest.raises(Interrupted) as again:  # the loop begins after a signal it was not there to see
            p.defer()
        assert again.value.signum == signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) == previous  # close() put the old handler back


def test_after_defer_the_first_signal_is_recorded_and_nothing_raises():
    with Preemption() as p:
        assert p.name == "" and p.received is None
        p.defer()
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGUSR1)  # a second signal while the checkpoint is written changes nothing
        assert (p.received, p.name) == (signal.SIGTERM, "SIGTERM")
    assert p._previous == {}


def test_a_forked_loader_worker_records_a_signal_and_leaves_the_decision_to_the_main_process():
    with Preemption() as p:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker: Ctrl-C reaches the whole process group
            try:
                os.kill(os.getpid(), signal.SIGINT)
                os.write(write, str(p.received).encode())
            except BaseException:
                os.write(write, b"raised")
            os._exit(0)
        os.close(write)
        os.waitpid(pid, 0)
        assert os.read(read, 64).decode() == str(int(signal.SIGINT))
        os.close(read)
        assert p.received is None


def _two_ranks(rank: int, store: str, results) -> None:
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        a = Agreement(2, poll=3)
        seen = {"group": a.group is dist.group.WORLD,
                "asks": [a.asks(step) for step in range(8)],
                # a signal reached rank 1 only; a checkpoint is due by rank 0's clock only
                "decide": [a.decide(stop=rank == 1, save=False), a.decide(stop=False, save=rank == 0),
                           a.decide(stop=False, save=False), a.decide(stop=True, save=True)]}
        results.put((rank, seen))
    finally:
        dist.destroy_process_group()


def test_ranks_agree_to_stop_or_save_when_only_one_of_them_sees_the_reason(tmp_path):
    import multiprocessing

    # One process asks every step, with no collective. (Called here, in the test's own process, these methods are
    # also what tells a mutation pass to run this test for them: it sees no call a forked child makes.)
    one = Agreement(1, poll=3)
    assert one.group is None and all(one.asks(step) for step in range(7))
    assert [one.decide(s, v) for s in (False, True) for v in (False, True)] == [(False, False), (False, True),
                                                                                 (True, False), (True, True)]
    context = multiprocessing.get_context("fork")  # forked: a mutation pass's code goes with them
    results = context.Queue()
    ranks = [context.Process(target=_two_ranks, args=(r, str(tmp_path / "store"), results)) for r in (0, 1)]
    for r in ranks:
        r.start()
    seen = dict(results.get(timeout=60) for _ in ranks)
    for r in ranks:
        r.join(timeout=30)
    expected = {"group": True,  # on a gloo world the agreement needs no group of its own
                "asks": [True, False, False, True, False, False, True, False],
                "decide": [(True, False), (False, True), (False, False), (True, True)]}
    assert seen == {0: expected, 1: expected}

