"""What a skeptical user tries (issue 13): damaged files, kills, two commands at once, odd options. Every case
either repairs itself or stops with one clear line and a non-zero exit; nothing written is lost or adopted."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import python, wait_for
from typer.testing import CliRunner

from fracgen.cli import app
from fracgen.dataset import Settings, render_dataset

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--classes", "6", "--size", "64", "--points", "3000", "--shard-size", "2", "--workers", "1"]
TINY = ["--img-size", "32", "--patch-size", "8", "--depth", "2", "--batch", "16", "--log-every", "1"]


def fracgen(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_error(output: str, exit_code: int, match: str) -> None:
    assert exit_code == 1, output
    lines = [line for line in output.strip().splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error:"), output
    assert match in " ".join(lines), output
    assert "Traceback" not in output


def run(*args, timeout=240, **kw) -> subprocess.CompletedProcess:
    return python(*args, timeout=timeout, **kw)


def cli_error(result: subprocess.CompletedProcess, match: str) -> None:
    one_line_error(result.stderr, result.returncode, match)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def hashes(folder: Path) -> dict[str, str]:
    return {p.name: sha(p) for p in sorted(folder.glob("*.tar"))}


@pytest.fixture
def rendered(tmp_path) -> Path:
    out = tmp_path / "ds"
    assert fracgen("render", "--out", out, *SMALL).exit_code == 0
    return out


# 1. --resume trusts a shard only when its size and sha256 match the record

def test_resume_repairs_an_edited_shard_of_a_finished_dataset(rendered):
    before, manifest = hashes(rendered), (rendered / "manifest.json").read_text()
    shard = rendered / "1p-frac-000001.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = fracgen("render", "--out", rendered, *SMALL, "--resume")
    assert result.exit_code == 0, result.output
    assert "1p-frac-000001.tar" in result.output and "re-rendered" in result.output
    assert hashes(rendered) == before and (rendered / "manifest.json").read_text() == manifest
    assert fracgen("verify", rendered).exit_code == 0


def test_resume_repairs_a_truncated_shard_and_keeps_the_finished_manifest(rendered):
    before, manifest = hashes(rendered), (rendered / "manifest.json").read_text()
    shard = rendered / "1p-frac-000002.tar"
    shard.write_bytes(shard.read_bytes()[:1000])
    result = fracgen("render", "--out", rendered, *SMALL, "--resume")
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert hashes(rendered) == before and (rendered / "manifest.json").read_text() == manifest


def test_resume_of_an_interrupted_render_never_adopts_a_shard_it_did_not_record(tmp_path):
    settings = Settings(classes=6, size=64, points=3000, shard_size=1)
    reference = tmp_path / "reference"
    render_dataset(reference, settings, workers=1)
    out = tmp_path / "ds"

    def stop_after_three(phase, done, total):
        if phase == "shards" and done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        render_dataset(out, settings, workers=1, progress=stop_after_three)
    assert not json.loads((out / "manifest.json").read_text())["complete"]
    finished = sorted(out.glob("*.tar"))
    assert len(finished) == 3
    finished[0].write_bytes(finished[0].read_bytes()[:-512] + bytes(512))  # damaged after it was recorded
    (out / "1p-frac-000005.tar").write_bytes(b"not written by this run")  # a file nothing recorded
    render_dataset(out, settings, workers=1, resume=True)
    assert hashes(out) == hashes(reference)
    assert fracgen("verify", out).exit_code == 0


# 2. a resumed pre-training never trains past --steps

@pytest.mark.slow  # kept out of `make test` (10-minute budget); `make test-slow` runs it
def test_pretrain_resume_below_the_checkpoint_step_is_refused(tmp_path):
    shards = tmp_path / "shards"
    render_dataset(shards, Settings(classes=8, size=64, points=3000, shard_size=4), workers=1)
    out = tmp_path / "run"
    first = run("-m", "train.pretrain", "--shards", shards, "--out", out, "--steps", "4", *TINY, "--eval-every", "0")
    assert first.returncode == 0, first.stderr
    cli_error(run("-m", "train.pretrain", "--shards", shards, "--out", out, "--resume", "--steps", "2"),
              "checkpoint is at step 4, past --steps 2")
    again = run("-m", "train.pretrain", "--shards", shards, "--out", out, "--resume")
    assert again.returncode == 0 and "already finished" in again.stdout, again.stderr


@pytest.mark.slow  # kept out of `make test` (10-minute budget); `make test-slow` runs it
def test_metrics_after_a_resume_hold_each_step_once(tmp_path):
    shards = tmp_path / "shards"
    render_dataset(shards, Settings(classes=8, size=64, points=3000, shard_size=4), workers=1)
    out = tmp_path / "run"
    args = ["-m", "train.pretrain", "--shards", shards, "--out", out, "--steps", "6", *TINY, "--eval-every", "0",
            "--ckpt-every", "2"]
    assert run(*args, "--stop-after", "3").returncode == 0  # checkpoint at 2 (ckpt-every) and at 3 (the stop)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first_loss = lines[0]["loss"]
    (out / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines)
                                       + json.dumps({"step": 4, "loss": 1.0, "lr": 0, "samples_per_s": 1}) + "\n")
    resumed = run("-m", "train.pretrain", "--shards", shards, "--out", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    entries = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [e["step"] for e in entries if "loss" in e and "final" not in e]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert any(e.get("resumed_from") == 3 for e in entries)
    assert json.loads((out / "summary.json").read_text())["first_loss"] == first_loss


# 3. one output folder, one writer

def _render_cmd(out: Path, seed: int, classes: int = 3000, workers: int = 1) -> list[str]:
    """A render that takes several seconds (~2 ms per image)."""
    return ["-m", "fracgen", "render", "--out", str(out), "--classes", str(classes), "--size", "512",
            "--points", "300000", "--per-class", "2", "--shard-size", "50", "--seed", str(seed), "--workers",
            str(workers)]


def _sigint_as_a_terminal_gives_it() -> None:
    """In a child before exec: SIGINT at its default, as a shell gives a command it starts in the foreground. A test
    run started in the background by a non-interactive shell inherits SIGINT ignored, and Python then leaves it
    ignored: the render went on to its end after "Ctrl-C" (the slow suite's failure of 2026-12-08)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _popen(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=_sigint_as_a_terminal_gives_it)


@pytest.mark.slow  # kept out of `make test` (10-minute budget); `make test-slow` runs it
def test_a_second_render_into_a_busy_folder_is_refused_and_touches_nothing(tmp_path):
    out = tmp_path / "ds"
    first = _popen(_render_cmd(out, seed=0, classes=3000))
    try:
        assert wait_for(lambda: (out / ".fracgen.lock").exists() and (out / ".fracgen.lock").stat().st_size, 60)
        second = run(*_render_cmd(out, seed=1, classes=3000), "--overwrite")
        cli_error(second, f"pid {first.pid}")
    finally:
        _, err = first.communicate(timeout=180)
    assert first.returncode == 0, err
    assert fracgen("verify", out).exit_code == 0
    assert json.loads((out / "manifest.json").read_text())["settings"]["seed"] == 0


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    out = tmp_path / "ds"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / ".fracgen.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": 0,
                                                   "command": "fracgen render"}))
    result = fracgen("render", "--out", out, *SMALL)
    assert result.exit_code == 0, result.output
    assert f"pid {dead.pid}" in result.output and "no longer running" in result.output


def test_a_pretraining_run_folder_has_one_writer(tmp_path):
    from fracgen.lock import FolderLock

    shards = tmp_path / "shards"
    render_dataset(shards, Settings(classes=8, size=64, points=3000, shard_size=4), workers=1)
    out = tmp_path / "run"
    out.mkdir()
    with FolderLock(out, "test"):
        cli_error(run("-m", "train.pretrain", "--shards", shards, "--out", out, "--steps", "2", *TINY),
                  f"pid {os.getpid()}")


# 4. the workers die with their parent, and nothing they write afterwards looks finished

def _children(pid: int) -> set[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return {int(p) for p in out.split()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


@pytest.mark.slow  # kept out of `make test` (10-minute budget); `make test-slow` runs it
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT])
def test_workers_stop_when_the_render_is_killed(tmp_path, how):
    out = tmp_path / "ds"
    proc = _popen(_render_cmd(out, seed=0, classes=3000, workers=2))
    try:
        assert wait_for(lambda: len(list(out.glob("*.tar"))) >= 2, 120), proc.stderr
        workers = _children(proc.pid) - {proc.pid}
        assert workers
        proc.send_signal(how)
        finished_at_kill = set(out.glob("*.tar"))
        proc.wait(timeout=30)
        assert wait_for(lambda: not any(_alive(w) for w in workers), 10), "workers outlived their parent"
        time.sleep(0.5)
        assert set(out.glob("*.tar")) <= finished_at_kill  # no shard was renamed into place after the kill
    finally:
        if proc.poll() is None:
            proc.kill()
    if how == signal.SIGINT:
        assert proc.returncode == 130
    resumed = run(*_render_cmd(out, seed=0, classes=3000, workers=2), "--resume", timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert fracgen("verify", out).exit_code == 0


@pytest.fixture
def pythons_sigint():
    """Python's own SIGINT handler for the test (pytest-xdist's workers, and runs a shell started in the background,
    ignore SIGINT), the previous one back after it."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_a_ctrl_c_something_swallowed_still_stops_the_render(tmp_path, pythons_sigint):
    """Python drops a KeyboardInterrupt raised inside a finalizer ("Exception ignored in ..."), and joblib's run in
    the render's main thread: a Ctrl-C that lands there must still stop the render. Here a progress callback
    swallows it the same way; the render still stops before the next rename."""
    out, swallowed = tmp_path / "ds", []

    def progress(stage, done, total):
        if stage == "shards" and done == 1 and not swallowed:
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(10)  # the handler raises here
            except KeyboardInterrupt:
                swallowed.append(done)

    with pytest.raises(KeyboardInterrupt):
        render_dataset(out, Settings(classes=4, size=32, points=2000, shard_size=2), workers=1, progress=progress)
    assert swallowed == [1]
    assert len(list(out.glob("*.tar"))) == 1  # the one finished before the Ctrl-C; none after it
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Python's own handler is back
    render_dataset(out, Settings(classes=4, size=32, points=2000, shard_size=2), workers=1, resume=True)
    assert fracgen("verify", out).exit_code == 0


def test_the_ctrl_c_record_is_only_taken_where_python_handles_sigint(pythons_sigint):
    from fracgen import interrupt

    with interrupt.recorded():
        assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
        interrupt.check()  # nothing pending
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a program that ignores Ctrl-C keeps doing so
    try:
        with interrupt.recorded():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
    seen = []

    def elsewhere():  # signal.signal() may only be called from the main thread: a render in a thread still runs
        with interrupt.recorded():
            seen.append(signal.getsignal(signal.SIGINT) is signal.default_int_handler)

    thread = threading.Thread(target=elsewhere)
    thread.start()
    thread.join()
    assert seen == [True]


# 5. tracebacks where a line is due

@pytest.fixture(scope="module")
def shards16(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards16")
    render_dataset(out, Settings(classes=16, size=64, points=3000, shard_size=8), workers=1)
    return out


@pytest.mark.slow  # kept out of `make test` (10-minute budget); `make test-slow` runs it
def test_damaged_checkpoints_are_one_line(tmp_path, shards16):
    out = tmp_path / "run"
    ok = run("-m", "train.pretrain", "--shards", shards16, "--out", out, "--steps", "2", *TINY, "--eval-every", "0")
    assert ok.returncode == 0, ok.stderr
    ckpt = out / "ckpt.pt"  # a hard link to the one checkpoint checkpoints.json lists: damaging one damages both
    whole = ckpt.read_bytes()
    legacy = tmp_path / "legacy"  # a run folder from before the marker: ckpt.pt alone
    legacy.mkdir()
    for damaged in (b"", os.urandom(3000), whole[:5000]):  # empty, random bytes, truncated
        ckpt.write_bytes(damaged)
        cli_error(run("-m", "train.pretrain", "--shards", shards16, "--out", out, "--resume"),
                  "no checkpoint " + str(out / "checkpoints.json") + " lists is intact")
        (legacy / "ckpt.pt").write_bytes(damaged)
        cli_error(run("-m", "train.pretrain", "--shards", shards16, "--out", legacy, "--resume"),
                  f"{legacy / 'ckpt.pt'} is not a fracgen-train pretrain checkpoint")
    cli_error(run("-m", "train.finetune", "--checkpoint", ckpt, "--steps", "2"),
              f"{ckpt} is not a fracgen-train pretrain checkpoint")


@pytest.mark.slow  # kept out of `make test` (10-minute budget); `make test-slow` runs it
def test_pretrain_bad_paths_and_mismatches_are_one_line(tmp_path, shards16):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cli_error(run("-m", "train.pretrain", "--shards", shards16, "--out", a_file, "--steps", "2", *TINY),
              "is not a folder")
    out = tmp_path / "run"
    assert run("-m", "train.pretrain", "--shards", shards16, "--out", out, "--steps", "2", *TINY).returncode == 0
    other = tmp_path / "other"
    render_dataset(other, Settings(classes=8, size=64, points=3000, shard_size=8), workers=1)
    cli_error(run("-m", "train.pretrain", "--shards", other, "--out", out, "--resume", "--steps", "4"),
              "8 classes, the checkpoint was trained on 16")
    not_ckpt = tmp_path / "weights.txt"
    not_ckpt.write_text("hello")
    cli_error(run("-m", "train.finetune", "--checkpoint", not_ckpt), "is not a fracgen-train pretrain checkpoint")


def test_a_truncated_shard_is_named_before_training(tmp_path):
    shards = tmp_path / "shards"
    render_dataset(shards, Settings(classes=16, size=64, points=3000, shard_size=4), workers=1)
    shard = shards / "1p-frac-000002.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    for cache in ("off", "on"):
        cli_error(run("-m", "train.pretrain", "--shards", shards, "--out", tmp_path / f"run-{cache}", "--steps", "8",
                      *TINY, "--cache", cache), "1p-frac-000002.tar")


@pytest.mark.parametrize("mutate", [
    lambda m: m.pop("settings"),
    lambda m: m.update(shards=[{"file": "x.tar"}]),
    lambda m: m.update(num_classes="16"),
    lambda m: m.update(shards=[{"file": "../../etc/passwd", "samples": 1, "bytes": 1, "sha256": "0" * 64}]),
    lambda m: m["base"].update(ifs=3),
    lambda m: m["shards"][0].update(file="n" * 300 + ".tar"),  # was "cannot write the run folder" in pretrain
])
def test_manifests_of_the_wrong_shape_are_one_line_everywhere(rendered, tmp_path, mutate):
    manifest = json.loads((rendered / "manifest.json").read_text())
    mutate(manifest)
    (rendered / "manifest.json").write_text(json.dumps(manifest))
    for args in (["verify", rendered], ["info", rendered], ["preview", rendered, "--out", tmp_path / "p.png"]):
        result = fracgen(*args)
        one_line_error(result.output, result.exit_code, "manifest.json")
    cli_error(run("-m", "train.pretrain", "--shards", rendered, "--out", tmp_path / "run", "--steps", "1", *TINY),
              "manifest.json")


def test_preview_of_a_truncated_first_shard_is_one_line(rendered, tmp_path):
    shard = rendered / "1p-frac-000000.tar"
    shard.write_bytes(shard.read_bytes()[:1200])
    result = fracgen("preview", rendered, "--out", tmp_path / "p.png")
    one_line_error(result.output, result.exit_code, "1p-frac-000000.tar")


@pytest.mark.parametrize(("base", "match"), [
    ({"maps": [{"a": 0.5, "b": 0, "c": 0, "d": 0.5, "e": 0, "f": 0}] * 2, "probabilities": "0.5,0.5"},
     "probabilities"),
    ({"maps": [{"a": 1e308, "b": 1e308, "c": 0, "d": 0.5, "e": 0, "f": 0}] * 2}, "within"),
    ({"maps": [{"a": "x", "b": 0, "c": 0, "d": 0.5, "e": 0, "f": 0}]}, "malformed IFS"),
])
def test_bad_base_files_are_one_line(tmp_path, base, match):
    path = tmp_path / "base.json"
    path.write_text(json.dumps(base))
    result = fracgen("render", "--out", tmp_path / "ds", *SMALL, "--base", path)
    one_line_error(result.output, result.exit_code, match)
    assert not (tmp_path / "ds").exists()  # the failed render leaves no folder behind


# 6, 7. misleading results and odd options

@pytest.mark.parametrize(("args", "match"), [
    (["--classes", "10000000"], "--classes"),
    (["--name", "n" * 300], "--name"),
    (["--seed", str(2**64)], "--seed"),
    (["--maps", "1000"], "--maps must be in 1..256"),  # bounds a sample's .json, so a shard's size
])
def test_odd_render_options_are_one_line_and_leave_nothing(tmp_path, args, match):
    out = tmp_path / "ds"
    result = fracgen("render", "--out", out, *SMALL, *args)
    one_line_error(result.output, result.exit_code, match)
    assert not out.exists()


@pytest.mark.slow  # kept out of `make test` (10-minute budget); `make test-slow` runs it
def test_finetune_refuses_one_class_and_names_a_missing_folder(tmp_path):
    from PIL import Image

    folder = tmp_path / "one" / "only"
    folder.mkdir(parents=True)
    for i in range(4):
        Image.fromarray(np.full((8, 8), i * 40, np.uint8)).save(folder / f"{i}.png")
    cli_error(run("-m", "train.finetune", "--checkpoint", "none", "--dataset", tmp_path / "one", "--steps", "2"),
              "at least two classes")
    cli_error(run("-m", "train.finetune", "--checkpoint", "none", "--dataset", tmp_path / "missing"), "not found")


# 8. the patch lands where the reference generator pastes it

def test_patches_land_one_pixel_right_of_and_above_the_point_as_in_the_reference():
    """The reference pastes each 3x3 patch at (x + 1, y + 1) before the vertical flip: the leftmost ink is in
    column pad + 1 and, after the flip, the lowest ink is in row size - 1 - (pad + 1)."""
    from fracgen.ifs import IFS
    from fracgen.render import RENDERER, render

    assert RENDERER == 3
    size, pad = 64, 6
    corners = [(0, 0), (0.5, 0), (0, 0.5), (0.5, 0.5)]  # four half-size copies: the points fill the unit square
    system = IFS.from_json({"maps": [{"a": 0.5, "b": 0, "c": 0, "d": 0.5, "e": e, "f": f} for e, f in corners]})
    image, _ = render(system, 1, points=20000, size=size, pad=pad)
    rows, cols = np.nonzero(image)
    assert cols.min() == pad + 1 and cols.max() == size - pad + 3
    assert rows.max() == size - 1 - (pad + 1) and rows.min() == size - 1 - (size - pad + 3)


# Issue 20: reliability and security, round 2 (the fracgen side)

def test_a_symlinked_lock_is_refused_and_its_target_left_whole(rendered, tmp_path):
    """Render, pull, publish and pretrain all take the folder's lock; none may write through a link."""
    target = tmp_path / "precious.json"
    target.write_text('{"keep": true}\n')
    shards = tmp_path / "shards"
    shutil.copytree(rendered, shards)
    for folder in (tmp_path / "new", tmp_path / "pulled", shards, tmp_path / "run"):
        folder.mkdir(exist_ok=True)
        (folder / ".fracgen.lock").unlink(missing_ok=True)
        (folder / ".fracgen.lock").symlink_to(target)
    for args in (["render", "--out", tmp_path / "new", *SMALL], ["pull", rendered, tmp_path / "pulled"],
                 ["publish", shards]):
        result = fracgen(*args)
        one_line_error(result.output, result.exit_code, "symbolic link")
    cli_error(run("-m", "train.pretrain", "--shards", rendered, "--out", tmp_path / "run", "--steps", "1", *TINY),
              "symbolic link")
    assert target.read_text() == '{"keep": true}\n'
    fifo = tmp_path / "fifo"
    fifo.mkdir()
    os.mkfifo(fifo / ".fracgen.lock")
    result = fracgen("pull", rendered, fifo)
    one_line_error(result.output, result.exit_code, "not a regular file")


def test_errors_of_commands_that_show_progress_come_without_a_blank_line(tmp_path):
    result = run("-m", "fracgen", "verify", tmp_path / "missing", timeout=60)
    assert result.returncode == 1 and result.stderr == f"error: {tmp_path / 'missing'} is not a directory\n"


def _edit_manifest(folder: Path, mutate) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    mutate(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(("mutate", "match"), [
    (lambda m: m.update(num_samples=10**18), "num_samples"),
    (lambda m: m["settings"].update(seed="3"), "'seed' is str"),
    (lambda m: m["settings"].update(per_class="1"), "'per_class' is str"),
    (lambda m: m["settings"].update(size=10**6), "size must be at most"),
    (lambda m: m["settings"].update(seed=10**30), "--seed must be in"),
    (lambda m: m.update(shards=m["shards"] * 5000), "shards; its settings make 3"),
    (lambda m: m["shards"][0].update(samples=3), "lists 3 samples"),
    (lambda m: m["shards"][0].update(bytes=10**15), "take at most"),
    (lambda m: m["classes"][0].update(fill="high"), "'fill' is str"),
])
def test_a_manifest_that_contradicts_itself_is_one_line_everywhere(rendered, tmp_path, mutate, match):
    _edit_manifest(rendered, mutate)
    for args in (["verify", rendered], ["info", rendered], ["pull", rendered, tmp_path / "pulled"]):
        result = fracgen(*args)
        one_line_error(result.output, result.exit_code, match)


def test_pretrain_render_refuses_settings_fracgen_would_not_render(rendered, tmp_path):
    from train import data, onthefly
    from train.runtime import TrainError

    _edit_manifest(rendered, lambda m: m["settings"].update(per_class="2"))
    for read in (onthefly.read_manifest, data.read_manifest):  # --render and --shards
        with pytest.raises(TrainError, match="'per_class' is str"):
            read(rendered)
    _edit_manifest(rendered, lambda m: m["settings"].update(per_class=1, seed=10**30))
    cli_error(run("-m", "train.pretrain", "--render", rendered, "--out", tmp_path / "run", "--steps", "1", *TINY),
              "--seed must be in")


def _rewrite_shard(folder: Path, index: int, edit) -> None:
    """Rewrite shard `index` with edit(key, parts) applied to each sample, and record its new size and sha256 in
    the manifest: the folder then agrees with its manifest byte for byte, whatever its samples say."""
    from fracgen.shards import Sample, iter_samples, write_shard_unfinished

    manifest = json.loads((folder / "manifest.json").read_text())
    path = folder / manifest["shards"][index]["file"]
    samples = []
    for key, parts in iter_samples(path):
        key, parts = edit(key, dict(parts))
        samples.append(Sample(key, parts["png"], int(parts["cls"]), json.loads(parts["json"])))
    tmp, entry = write_shard_unfinished(path, samples)
    os.replace(tmp, path)
    manifest["shards"][index].update(bytes=entry["bytes"], sha256=entry["sha256"])
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _deflate_bomb(size: int, extra: int) -> bytes:
    """A PNG whose header says size x size but whose data inflate to `extra` more bytes (zeros: ~1000:1)."""
    import struct
    import zlib

    from fracgen.png import SIGNATURE, _chunk

    idat = zlib.compress(bytes(size * (size + 1) + extra), 9)
    return (SIGNATURE + _chunk(b"IHDR", struct.pack(">IIBBBBB", size, size, 8, 0, 0, 0, 0)) + _chunk(b"IDAT", idat)
            + _chunk(b"IEND", b""))


def test_a_deflate_bomb_is_refused_before_it_is_inflated(rendered, tmp_path):
    from fracgen import png

    bomb = _deflate_bomb(64, 4 << 20)
    assert len(bomb) < 6_000
    with pytest.raises(png.PNGError, match="deflate bomb"):
        png.decode(bomb)
    with pytest.raises(png.PNGError, match="not 32x32"):
        png.decode(png.encode(np.zeros((64, 64), np.uint8)), 32)
    _rewrite_shard(rendered, 1, lambda key, parts: (key, {**parts, "png": bomb}))
    for args in (["verify", rendered], ["pull", rendered, tmp_path / "pulled"]):
        result = fracgen(*args)
        one_line_error(result.output, result.exit_code, "deflate bomb")
    assert not (tmp_path / "pulled" / "1p-frac-000001.tar").exists()


@pytest.mark.parametrize(("edit", "match"), [
    (lambda key, parts: (key, {**parts, "cls": b"1"}), "has class 1 in its .cls"),
    (lambda key, parts: ("c000000-i000009", parts), "not the sample the manifest puts there"),
])
def test_shards_whose_samples_contradict_the_manifest_are_not_pulled_or_verified(rendered, tmp_path, edit, match):
    """A manifest can list the size and sha256 of any bytes: pull and verify check what the samples say too."""
    _rewrite_shard(rendered, 2, edit)
    for args in (["verify", rendered], ["pull", rendered, tmp_path / "pulled"]):
        result = fracgen(*args)
        one_line_error(result.output, result.exit_code, match)
    assert not (tmp_path / "pulled" / "manifest.json").exists()


def test_deeply_nested_json_is_one_line(rendered, tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / "base.json").write_text(deep)
    result = fracgen("render", "--out", tmp_path / "ds", *SMALL, "--base", tmp_path / "base.json")
    one_line_error(result.output, result.exit_code, "nested too deeply")
    _edit_manifest(rendered, lambda m: None)
    text = (rendered / "manifest.json").read_text()
    (rendered / "manifest.json").write_text(text.replace('"command": ', f'"command": {deep}, "x": ', 1))
    for args in (["verify", rendered], ["info", rendered], ["pull", rendered, tmp_path / "pulled"]):
        result = fracgen(*args)
        one_line_error(result.output, result.exit_code, "nested too deeply")


def test_odd_arguments_elsewhere_are_one_short_line(rendered, tmp_path):
    import resource

    def cap_memory():  # without the bound, a 100000 px tile asks for 10^10 bytes a tile
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    cli_error(run("-m", "fracgen", "preview", rendered, "--out", tmp_path / "p.png", "--tile", "100000", timeout=60,
                  preexec_fn=cap_memory), "--tile in 32..1024")
    result = fracgen("render", "--out", tmp_path / ("n" * 5000), *SMALL)
    one_line_error(result.output, result.exit_code, "File name too long")
    assert len(result.output) < 500, len(result.output)
    from train.experiments.__main__ import app as experiments_app
    from train.runtime import TrainError

    (tmp_path / "file").write_text("")
    result = CliRunner().invoke(experiments_app, ["compare", "--root", str(tmp_path / "file"), "--finished-only",
                                                  "--results", str(tmp_path / "results")])
    assert isinstance(result.exception, TrainError) and "--root" in str(result.exception), result.output
    assert "is a file, not a folder" in str(result.exception)


def test_a_full_disk_names_the_file_it_could_not_write(tmp_path, monkeypatch):
    import errno

    calls, fsync = [], os.fsync

    def full(fd):  # the disk fills after the lock is taken
        calls.append(fd)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", full)
    result = fracgen("render", "--out", tmp_path / "ds", *SMALL)
    one_line_error(result.output, result.exit_code, f"cannot write {tmp_path / 'ds' / 'manifest.json'}: No space")
