"""train.checkpoint's records, in process and without training (issue 39: the mutants of checkpoint.py that every
run-level test let through). What a marker entry must be to count, the bounds hit exactly, what each skipped entry
is called in its note, what a write leaves and removes, and the defaults a caller relies on."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from train.checkpoint import (
    LATEST,
    MARKER,
    MAX_CHECKPOINT_BYTES,
    MAX_MARKER_BYTES,
    Checkpoints,
    _well_formed,
    file_name,
)
from train.runtime import TrainError


def state(step: int, resume: bool = True) -> dict:
    base = {"model_name": "vit_tiny_patch16_224", "model_args": {}, "num_classes": 2,
            "model": {"w": torch.full((2,), float(step))}, "step": step, "config": {}}
    return {**base, "optimizer": {}, "scheduler": {}, "scaler": {}, "rng": []} if resume else base


def written(tmp_path, *steps: int, keep: int = 5) -> Checkpoints:
    checkpoints = Checkpoints(tmp_path, keep=keep)
    for step in steps:
        checkpoints.save(state(step), step, wait=True)
    return checkpoints


def entry(step: int, **over) -> dict:
    return {"step": step, "file": file_name(step), "bytes": 10, "sha256": "0" * 64, **over}


# --- what an entry must be ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("step", [0, 1, 100, 10**8 - 1])
def test_every_step_an_eight_digit_name_can_hold_is_well_formed(step):
    assert _well_formed(entry(step))


@pytest.mark.parametrize("step", [-1, 10**8, 10**9, True, 2.0])
def test_steps_beyond_the_names_or_not_integers_are_not(step):
    assert not _well_formed({**entry(5), "step": step, "file": f"ckpt-{step}.pt"})
    assert not _well_formed(entry(step) if isinstance(step, int) and step >= 0 else {**entry(5), "step": step})


@pytest.mark.parametrize(("size", "ok"), [(1, True), (MAX_CHECKPOINT_BYTES, True), (0, False),
                                           (MAX_CHECKPOINT_BYTES + 1, False), (-5, False)])
def test_the_recorded_size_is_bounded_both_ways_exactly(size, ok):
    assert _well_formed(entry(3, bytes=size)) is ok


def test_an_entry_names_its_own_steps_file_and_a_sha256():
    assert not _well_formed(entry(3, file=file_name(4)))
    assert not _well_formed(entry(3, sha256="0" * 63))
    assert not _well_formed(entry(3, sha256="G" * 64))
    assert not _well_formed([3])


# --- the marker as a whole ----------------------------------------------------------------------------------------

def _marker(tmp_path, text: str) -> None:
    (tmp_path / MARKER).write_text(text)


def test_a_marker_of_exactly_the_bound_is_read_and_one_byte_more_is_not(tmp_path):
    checkpoints = written(tmp_path, 2)
    raw = (tmp_path / MARKER).read_text().rstrip()
    _marker(tmp_path, raw + " " * (MAX_MARKER_BYTES - len(raw)))
    assert [e["step"] for e in checkpoints.entries()] == [2]
    _marker(tmp_path, raw + " " * (MAX_MARKER_BYTES + 1 - len(raw)))
    assert checkpoints.entries() == []


def test_a_marker_of_another_format_or_shape_lists_nothing_and_notes_nothing(tmp_path):
    checkpoints = written(tmp_path, 2)
    good = json.loads((tmp_path / MARKER).read_text())
    notes = []
    for other in ({**good, "format": 2}, {"checkpoints": good["checkpoints"]},
                  {"format": 1, "checkpoints": {"a": good["checkpoints"][0]}}):
        _marker(tmp_path, json.dumps(other))
        assert checkpoints.entries() == [] and checkpoints.ignored == []
        with pytest.raises(TrainError, match="no checkpoint"):
            checkpoints.load_latest(note=notes.append)
    assert notes == []


def test_each_skipped_entry_is_named_in_its_note(tmp_path):
    checkpoints = written(tmp_path, 2)
    good = json.loads((tmp_path / MARKER).read_text())
    odd = {"step": 7, "file": "x" * 300}
    _marker(tmp_path, json.dumps({"format": 1, "checkpoints": [*good["checkpoints"], odd]}))
    notes = []
    assert checkpoints.load_latest(note=notes.append)[0]["step"] == 2
    text = json.dumps(odd)
    assert len(notes) == 1 and f"lists {text[:120]}, which is not a checkpoint record" in notes[0]


# --- why a listed file is passed over -----------------------------------------------------------------------------

def _why(tmp_path, damage) -> str:
    checkpoints = written(tmp_path, 2, 4)
    damage(tmp_path / file_name(4))
    notes = []
    checkpoint, path = checkpoints.load_latest(note=notes.append)
    assert checkpoint["step"] == 2 and path.name == file_name(2) and len(notes) == 1
    assert str(tmp_path / file_name(4)) in notes[0] and "trying the one before it" in notes[0]
    return notes[0]


def test_a_missing_file_is_called_missing(tmp_path):
    assert "(it is missing)" in _why(tmp_path, lambda p: p.unlink())


def test_a_link_is_called_a_link_and_not_followed(tmp_path):
    def link(p):
        target = p.with_name("elsewhere.pt")
        p.rename(target)
        p.symlink_to(target)  # the same bytes, through a link

    assert "(it is a link)" in _why(tmp_path, link)


def test_a_fifo_is_not_a_regular_file(tmp_path):
    def fifo(p):
        p.unlink()
        os.mkfifo(p)

    assert "(it is not a regular file)" in _why(tmp_path, fifo)


def test_another_size_is_said_before_a_byte_is_read(tmp_path):
    def grow(p):
        with open(p, "ab") as f:
            f.write(b"x")

    note = _why(tmp_path, grow)
    size = (tmp_path / file_name(2)).stat().st_size  # both checkpoints hold the same shapes
    assert f"(it has {size + 1:,} bytes, the record {size:,})" in note


def test_other_bytes_of_the_same_size_fail_the_sha256(tmp_path):
    def flip(p):
        raw = bytearray(p.read_bytes())
        raw[-30] ^= 1
        p.write_bytes(bytes(raw))

    assert "(its sha256 is not the recorded one)" in _why(tmp_path, flip)


def test_a_checkpoint_holding_another_step_than_its_entry_is_passed_over(tmp_path):
    def swap(p):
        torch.save(state(3), p)
        marker = json.loads((tmp_path / MARKER).read_text())
        raw = p.read_bytes()
        import hashlib

        marker["checkpoints"][-1].update(bytes=len(raw), sha256=hashlib.sha256(raw).hexdigest())
        (tmp_path / MARKER).write_text(json.dumps(marker))

    assert "(it holds step 3, not 4)" in _why(tmp_path, swap)


def test_resuming_needs_the_optimizer_state_and_loading_for_weights_does_not(tmp_path):
    checkpoints = Checkpoints(tmp_path)
    checkpoints.save(state(2, resume=False), 2, wait=True)
    assert checkpoints.load_latest(resume=False)[0]["step"] == 2
    with pytest.raises(TrainError, match=rf"{tmp_path / file_name(2)} is not a fracgen-train pretrain checkpoint "
                                         r"\('optimizer'"):
        checkpoints.load_latest()  # resume is the default


def test_an_intact_file_that_is_no_checkpoint_is_named(tmp_path):
    import hashlib

    checkpoints = written(tmp_path, 2)
    path = tmp_path / file_name(2)
    path.write_bytes(b"not a checkpoint")
    marker = json.loads((tmp_path / MARKER).read_text())
    marker["checkpoints"][0].update(bytes=16, sha256=hashlib.sha256(b"not a checkpoint").hexdigest())
    (tmp_path / MARKER).write_text(json.dumps(marker))
    with pytest.raises(TrainError, match=rf"^{path} is not a fracgen-train pretrain checkpoint"):
        checkpoints.load_latest()


# --- a folder from before the marker --------------------------------------------------------------------------------

def test_an_older_runs_ckpt_pt_is_named_when_damaged_and_refused_as_a_link(tmp_path):
    (tmp_path / LATEST).write_bytes(b"junk")
    with pytest.raises(TrainError, match=rf"^{tmp_path / LATEST} is not a fracgen-train pretrain checkpoint"):
        Checkpoints(tmp_path).load_latest()
    (tmp_path / LATEST).unlink()
    torch.save(state(5), tmp_path / "real.pt")
    (tmp_path / LATEST).symlink_to(tmp_path / "real.pt")
    with pytest.raises(TrainError, match=rf"^{tmp_path / LATEST} is a link"):
        Checkpoints(tmp_path).load_latest()


# --- what writing leaves ------------------------------------------------------------------------------------------

def test_the_defaults_keep_one_checkpoint_and_no_clock(tmp_path):
    now = [0.0]
    checkpoints = Checkpoints(tmp_path, clock=lambda: now[0])
    now[0] = 1e9  # years later
    assert not checkpoints.due_by_time() and not checkpoints.due_by_steps(500)
    for step in (1, 2, 3):
        checkpoints.save(state(step), step, wait=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([LATEST, MARKER, file_name(3)])
    assert [e["step"] for e in checkpoints.entries()] == [3]


def test_a_save_reports_what_it_waited_and_what_the_write_took(tmp_path):
    checkpoints = Checkpoints(tmp_path)
    t0 = time.perf_counter()
    blocked = checkpoints.save(state(1), 1, wait=True)
    elapsed = time.perf_counter() - t0
    assert 0 <= blocked <= elapsed and 0 < checkpoints.last_seconds <= elapsed


def test_temporaries_go_and_nothing_else_does(tmp_path):
    ours = [f"{file_name(4)}.tmp", "ckpt.pt.tmp", "checkpoints.json.tmp", "model.safetensors.tmp",
            ".model.safetensors.k2j4.tmp", f".{LATEST}.link.tmp"]
    theirs = ["notes.tmp", ".fracgen.lock", ".hidden", "config.json", "model.tmp.bak"]
    for name in ours + theirs:
        (tmp_path / name).write_text("x")
    (tmp_path / ".folder.tmp").mkdir()
    Checkpoints(tmp_path).remove_temporaries()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(theirs + [".folder.tmp"])


def test_a_full_disk_during_a_write_is_reported_by_the_next_wait_with_the_free_space(tmp_path, monkeypatch):
    import errno

    real = os.fsync

    def full(fd):
        if file_name(2) in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    monkeypatch.setattr(os, "fsync", full)
    checkpoints = written(tmp_path, 1)
    checkpoints.save(state(2), 2)
    with pytest.raises(TrainError, match=rf"^writing a checkpoint in {tmp_path} failed: cannot write "
                                         rf"{tmp_path / file_name(2)}: No space left on device \(the disk is full: "
                                         r"[\d,]+ MiB free in"):
        checkpoints.wait()
    assert [e["step"] for e in checkpoints.entries()] == [1] and not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


# --- train/runtime.py (issue 39): the command line's one-line convention, DDP set-up, random streams --------------

def _cli(monkeypatch, body, argv=("cmd",)):
    import typer

    from train.runtime import run_cli

    app = typer.Typer()
    app.command()(body)
    monkeypatch.setattr("sys.argv", list(argv))
    with pytest.raises(SystemExit) as exit_:
        run_cli(app)
    return exit_.value.code


def test_run_cli_turns_every_user_error_into_one_line_and_its_exit_code(monkeypatch, capsys):
    import signal

    import click

    from train.preempt import Interrupted

    def fails():
        raise TrainError("bad --out https://user:pw@host/x")

    assert _cli(monkeypatch, fails) == 1
    assert capsys.readouterr().err == "error: bad --out https://***@host/x\n"  # no password shown

    def usage():
        raise click.UsageError("no such option: --nope")

    assert _cli(monkeypatch, usage) == 2 and capsys.readouterr().err == "error: no such option: --nope\n"

    def not_usage():
        raise click.ClickException("a file click could not open")

    assert _cli(monkeypatch, not_usage) == 1 and capsys.readouterr().err == "error: a file click could not open\n"

    def aborts():
        raise click.exceptions.Abort()

    assert _cli(monkeypatch, aborts) == 1 and capsys.readouterr().err == "error: aborted\n"

    def signalled():
        raise Interrupted(signal.SIGTERM)

    assert _cli(monkeypatch, signalled) == 128 + signal.SIGTERM
    assert capsys.readouterr().err == "stopped by SIGTERM before the first training step: nothing to keep\n"

    def fine():
        return None

    def three():
        return 3

    assert _cli(monkeypatch, fine) == 0 and _cli(monkeypatch, three) == 3


def test_an_error_a_loader_worker_raised_is_its_own_line():
    from train.runtime import _own_line

    worker = ("Caught TrainError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
              "  File \"x.py\", line 1\ntrain.runtime.TrainError: shard-0.tar is not in the manifest\n")
    assert _own_line(worker) == "shard-0.tar is not in the manifest"
    assert _own_line("plain message") == "plain message"
    assert _own_line("Original Traceback\nValueError: x") == "Original Traceback\nValueError: x"


def test_a_crop_scale_is_two_fractions_in_order():
    import typer

    from train.runtime import parse_float_pair

    assert parse_float_pair("0.08,1") == (0.08, 1.0) and parse_float_pair("1,1") == (1.0, 1.0)
    for text, says in (("a,b", "is not two comma-separated numbers like 0.08,1"),
                       ("0.1,0.2,0.3", "is not two comma-separated"),
                       ("0,1", "crop area fractions need 0 < min <= max <= 1"),
                       ("0.5,0.4", "need 0 < min <= max"), ("0.5,1.01", "need 0 < min <= max <= 1")):
        with pytest.raises(typer.BadParameter) as refused:
            parse_float_pair(text)
        assert str(refused.value) == f"{text!r}" + (": " if "need" in says else " ") + (
            "crop area fractions need 0 < min <= max <= 1" if "need" in says else
            "is not two comma-separated numbers like 0.08,1")


def test_seeding_and_saved_streams_give_the_same_draws_again():
    import random

    import numpy as np

    from train.runtime import rng_states, seed_everything, set_rng_states

    def draws():
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    seed_everything(2**32 + 5)
    big = draws()
    seed_everything(5)
    assert draws()[1:2] == big[1:2]  # numpy's seed is the seed mod 2**32
    seed_everything(7)
    assert draws()[1] != big[1]
    seed_everything(7)
    first = draws()
    seed_everything(7)
    states = rng_states()
    assert set(states) == {"python", "torch", "numpy"} and states["numpy"]["keys"].dtype == torch.int64
    assert draws() == first
    set_rng_states(states)
    assert draws() == first
    saved = states["numpy"]  # checkpoints before the dict form held numpy's own tuple
    legacy = dict(states, numpy=(saved["name"], saved["keys"].numpy().astype(np.uint32), saved["pos"],
                                 saved["has_gauss"], saved["cached_gaussian"]))
    seed_everything(8)
    set_rng_states(legacy)
    assert draws() == first


def _two_ranks_set_up(rank: int, port: int, attempt: str | None, results) -> None:
    import torch.distributed as dist

    from train.runtime import setup_distributed

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    if attempt is not None:
        os.environ["TORCHELASTIC_RESTART_COUNT"] = attempt
    try:
        rank_, local, world, device = setup_distributed()
        total = torch.tensor([rank + 1])
        dist.all_reduce(total)
        results.put((rank, (rank_, local, world, str(device), dist.get_backend(), int(total))))
        dist.destroy_process_group()
    except BaseException as e:  # the parent waits on the queue: say what went wrong
        results.put((rank, repr(e)))


@pytest.mark.parametrize("attempt", [None, "1"])
def test_torchruns_environment_sets_up_gloo_ranks_on_the_cpu(attempt, monkeypatch):
    import multiprocessing
    import socket

    import torch.distributed as dist

    from train.runtime import _init_process_group, setup_distributed

    assert "WORLD_SIZE" not in os.environ and setup_distributed() == (0, 0, 1, torch.device("cpu"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # a group of one in this process first: a mutation pass runs this test for _init_process_group only if it sees
    # the call here (it sees none a forked child makes)
    with monkeypatch.context() as env:
        for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(port), "TORCHELASTIC_RESTART_COUNT": attempt}.items():
            if value is None:
                env.delenv(key, raising=False)
            else:
                env.setenv(key, value)
        _init_process_group("gloo")
        assert dist.get_world_size() == 1
        dist.destroy_process_group()
    context = multiprocessing.get_context("fork")  # forked: a mutation pass's code goes with them
    results = context.Queue()
    ranks = [context.Process(target=_two_ranks_set_up, args=(r, port, attempt, results)) for r in (0, 1)]
    for r in ranks:
        r.start()
    seen = dict(results.get(timeout=60) for _ in ranks)
    for r in ranks:
        r.join(timeout=30)
    assert seen == {r: (r, r, 2, "cpu", "gloo", 3) for r in (0, 1)}


def test_a_pickle_with_an_opcode_weights_only_refuses_names_it_and_runs_nothing(tmp_path):
    from train.runtime import load_checkpoint

    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"\x80\x02(iabc\ndef\n.")  # INST: builds an object by name
    with pytest.raises(TrainError) as refused:
        load_checkpoint(path)
    assert str(refused.value) == (f"{path} is not a fracgen-train pretrain checkpoint (unreadable: not tensors and "
                                  "plain values: Unsupported operand 105; nothing of it was run)")


def test_a_gpu_runs_random_states_continue_on_a_cpu():
    from train.runtime import rng_states, set_rng_states

    states = rng_states()
    first = torch.rand(3)
    set_rng_states({**states, "cuda": [torch.zeros(16, dtype=torch.uint8)]})  # saved on a GPU; none here
    assert torch.equal(torch.rand(3), first)


def test_json_records_are_written_indented_with_a_final_newline(tmp_path):
    from train.runtime import atomic_write_json

    atomic_write_json({"b": [1], "a": 2}, tmp_path / "r.json")
    assert (tmp_path / "r.json").read_text() == '{\n  "b": [\n    1\n  ],\n  "a": 2\n}\n'
