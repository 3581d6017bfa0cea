"""Rendering on a Dask cluster (issue 12): a LocalCluster of worker processes on loopback must give the local
run's bytes, survive a worker killed mid-run, resume, and cope with workers that do not see the output folder."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fracgen.cli import app
from fracgen.dataset import Settings, render_dataset, verify_dataset

distributed = pytest.importorskip("distributed", reason="dask.distributed is not installed (pip install fracgen[dask])")

ROOT = Path(__file__).resolve().parents[1]
SMALL = Settings(classes=64, size=64, points=3000, shard_size=4)
# Shard jobs that take a while (~0.2 s: 8 images of 4M points), so a kill lands mid-job.
SLOW = Settings(classes=16, per_class=6, size=64, points=4_000_000, shard_size=8)


def hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.tar"))}


def leftovers(folder: Path) -> list[str]:
    """Temporaries and probe files a finished render must not leave behind."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and p.name != ".fracgen.lock")


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1, host="127.0.0.1",
                                  dashboard_address=None) as c, distributed.Client(c, set_as_default=False) as client:
        client.wait_for_workers(2, timeout=60)
        yield c, client


@pytest.fixture(scope="module")
def local(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local") / "ds"
    render_dataset(out, SMALL, workers=1)
    return out


def test_a_cluster_renders_the_local_bytes(cluster, local, tmp_path):
    notes = []
    manifest = render_dataset(tmp_path / "ds", SMALL, scheduler=cluster[0].scheduler_address, note=notes.append)
    assert hashes(tmp_path / "ds") == hashes(local) and len(manifest["shards"]) == 16
    assert (tmp_path / "ds" / "manifest.json").read_bytes() == (local / "manifest.json").read_bytes()
    assert verify_dataset(tmp_path / "ds") == [] and leftovers(tmp_path / "ds") == []
    assert any("2 worker(s)" in n and "all see" in n for n in notes), notes


def test_resume_through_the_cluster_finishes_an_interrupted_render_and_repairs_a_finished_one(cluster, local,
                                                                                             tmp_path):
    out, address = tmp_path / "ds", cluster[0].scheduler_address

    def stop_after_three(phase, done, total):
        if phase == "shards" and done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        render_dataset(out, SMALL, scheduler=address, progress=stop_after_three)
    assert not json.loads((out / "manifest.json").read_text())["complete"]
    stats = {}
    render_dataset(out, SMALL, scheduler=address, resume=True, stats=stats)
    assert stats["rendered"] == 16 - 3 and hashes(out) == hashes(local) and leftovers(out) == []

    (out / "1p-frac-000007.tar").unlink()
    args = ["render", "--out", str(out), "--classes", "64", "--size", "64", "--points", "3000", "--shard-size", "4",
            "--scheduler", address, "--resume"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "1p-frac-000007.tar" in result.output and "re-rendered" in result.output
    assert hashes(out) == hashes(local) and verify_dataset(out) == []


def test_workers_that_do_not_see_the_folder_send_their_shards_back(cluster, local, tmp_path):
    """A worker in its own mount namespace, with an empty tmpfs over the test's folder, is a worker on another
    machine with a folder of the same name: its jobs must return bytes, the others' write into the folder."""
    hide = 'mount -t tmpfs none "$0"'
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "sh", "-c", hide, str(tmp_path)],
                                                         capture_output=True).returncode != 0:
        pytest.skip("needs unprivileged user and mount namespaces (unshare -rm) to hide the folder from a worker")
    address, client = cluster[0].scheduler_address, cluster[1]
    script = hide + ' && exec "$1" -m distributed.cli.dask_worker "$2" --nthreads 1 --no-dashboard'
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / "worker.log", "wb")  # a file, not a pipe: a full pipe would stall the worker
    blind = subprocess.Popen(["unshare", "-rm", "sh", "-c", script, str(tmp_path), sys.executable, address],
                             cwd=ROOT, env=env, stdout=log, stderr=log)
    try:
        deadline = time.time() + 60
        while len(client.scheduler_info()["workers"]) < 3:
            assert blind.poll() is None and time.time() < deadline, (tmp_path / "worker.log").read_text()[-2000:]
            time.sleep(0.2)
        notes = []
        render_dataset(tmp_path / "ds", SMALL, scheduler=address, note=notes.append)
        assert any("1 do not see" in n and "as bytes" in n for n in notes), notes
        assert hashes(tmp_path / "ds") == hashes(local) and leftovers(tmp_path / "ds") == []
    finally:
        blind.terminate()
        blind.wait(timeout=30)
        log.close()
    deadline = time.time() + 30
    while len(client.scheduler_info()["workers"]) > 2 and time.time() < deadline:
        time.sleep(0.2)


def _executing(dask_worker) -> list[str]:
    return [str(ts.key) for ts in dask_worker.state.executing]


def test_a_worker_killed_mid_run_loses_and_duplicates_no_shard(cluster, tmp_path):
    """Runs last of the cluster tests: the killed worker's nanny starts a new one."""
    c, client = cluster
    client.wait_for_workers(2, timeout=60)
    reference = tmp_path / "reference"
    render_dataset(reference, SLOW, workers=1)
    killed = {}

    def kill_a_busy_worker(phase, done, total):
        if phase == "shards" and done >= 1 and not killed:
            busy = {w: running for w, running in client.run(_executing).items() if running}
            if busy:
                address = sorted(busy)[0]
                pid = client.run(os.getpid, workers=[address])[address]
                os.kill(pid, signal.SIGKILL)
                killed.update(address=address, running=busy[address], done=done)

    stats = {}
    manifest = render_dataset(tmp_path / "ds", SLOW, scheduler=c.scheduler_address, progress=kill_a_busy_worker,
                              stats=stats)
    assert killed and "_write_shard" in killed["running"][0], killed  # killed while it wrote a shard
    assert killed["address"] not in client.scheduler_info()["workers"]
    assert stats["rendered"] == SLOW.num_shards and len(manifest["shards"]) == SLOW.num_shards
    assert hashes(tmp_path / "ds") == hashes(reference)
    assert verify_dataset(tmp_path / "ds") == [] and leftovers(tmp_path / "ds") == []


def _one_line(result, match: str) -> None:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("error:") and match in " ".join(lines), result.output
    assert "Traceback" not in result.output


def test_cluster_mistakes_are_one_line_and_leave_nothing(tmp_path, monkeypatch):
    from fracgen import cluster as fracgen_cluster

    out = tmp_path / "ds"
    args = ["render", "--out", str(out), "--classes", "8", "--size", "64", "--points", "3000"]
    monkeypatch.setattr(fracgen_cluster, "CONNECT_TIMEOUT", 1.0)
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    _one_line(CliRunner().invoke(app, [*args, "--scheduler", "tcp://127.0.0.1:9"]), "cannot reach the Dask scheduler")
    _one_line(CliRunner().invoke(app, [*args, "--backend", "dask"]), "DASK_SCHEDULER_ADDRESS")
    _one_line(CliRunner().invoke(app, [*args, "--backend", "local", "--scheduler", "tcp://x:1"]), "--backend dask")
    _one_line(CliRunner().invoke(app, [*args, "--scheduler", "tcp://x:1", "--workers", "2"]), "--workers")
    _one_line(CliRunner().invoke(app, [*args, "--backend", "spark"]), "local or dask")
    monkeypatch.setitem(sys.modules, "distributed", None)  # as if fracgen[dask] were not installed
    _one_line(CliRunner().invoke(app, [*args, "--scheduler", "tcp://127.0.0.1:9"]), "pip install fracgen[dask]")
    assert not out.exists()


class Peer:
    """A loopback TCP server that is not a Dask scheduler: it sends `greeting` to each connection (b"": nothing),
    then keeps it open until the test ends."""

    def __init__(self, greeting: bytes):
        import socket
        import threading

        self.greeting, self.stop = greeting, threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"tcp://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.sendall(self.greeting)
            self.stop.wait()
            conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.sock.close()


@pytest.mark.parametrize(("greeting", "address", "match"), [
    (b"HTTP/1.1 200 OK\r\nServer: not dask\r\n\r\n" * 4, None, "not Dask's protocol"),
    (b"", None, "sent nothing"),
    (b"", "notanaddress", "did not resolve"),
])
def test_a_scheduler_address_that_is_not_dask_is_one_line_in_time(tmp_path, monkeypatch, greeting, address, match):
    import threading

    from fracgen import cluster as fracgen_cluster

    monkeypatch.setattr(fracgen_cluster, "CONNECT_TIMEOUT", 1.0)
    out = tmp_path / "ds"
    with Peer(greeting) as peer:
        box = {}
        args = ["render", "--out", str(out), "--classes", "8", "--size", "64", "--scheduler", address or peer.address]
        thread = threading.Thread(target=lambda: box.update(result=CliRunner().invoke(app, args)), daemon=True)
        t0 = time.monotonic()
        thread.start()
        thread.join(8)
        assert not thread.is_alive(), "still connecting after 8 s"
    _one_line(box["result"], match)
    assert len(box["result"].output.strip().splitlines()) == 1 and time.monotonic() - t0 < 4
    assert not out.exists()
