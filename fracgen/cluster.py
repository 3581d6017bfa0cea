"""Rendering on a Dask cluster (`fracgen render --scheduler tcp://HOST:8786`): the class search and the shard jobs
run on the cluster's workers; this process keeps the records, as it does for a local render.

We use dask.distributed directly (`Client.submit` per job, `as_completed`), not joblib's dask backend: it lets the
render ask every worker, before any job, which fracgen it runs and whether it sees --out, give each job retries
of its own, and hand each result over as it arrives, to the same loop that renames and journals local shards.

- **Output folder**: the render writes a probe file with a fresh token into --out. A job on a worker that reads
  that token there (the folder is shared, e.g. NFS) writes its shard under a temporary name beside the final one;
  a job on a worker that does not (another machine's disk, another mount path) sends the shard's bytes back and
  this process writes them. Checked per job, so a worker that joins mid-run is safe too; `attach` reports both.
- **Lost workers**: the scheduler runs a lost worker's jobs again elsewhere (up to its `allowed-failures`), and a
  job that raises is retried `RETRIES` times. A job run twice is harmless: temporaries have unique names, this
  process renames only the one result it receives, and stale temporaries are removed at the end.
- **Same bytes**: every worker must run this fracgen (version, renderer, PNG encoder), or the render stops at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import isal

from fracgen.errors import FracgenError
from fracgen.render import RENDERER
from fracgen.version import __version__
from fracgen.workers import PROBE_PREFIX, Probe, sees_folder

CONNECT_TIMEOUT = 10.0  # seconds to reach the scheduler and to find a worker there
MAX_HANDSHAKE = 1 << 16  # bytes of a Dask scheduler's first message (~200); more is some other protocol
RETRIES = 2  # extra tries for a job that raises (a lost worker's jobs are rescheduled by the scheduler itself)


def _facts() -> dict:
    """What must be equal on the client and every worker for the shards to be the same bytes."""
    return {"fracgen": __version__, "renderer": RENDERER, "isal": isal.__version__}


def _worker_facts(out: str, probe: Probe) -> dict:
    return {**_facts(), "host": socket.gethostname(), "sees": sees_folder(Path(out), probe)}


def connect(scheduler: object = None) -> DaskPool:
    """A pool on the cluster at `scheduler` (address, `distributed.Client`, or None: DASK_SCHEDULER_ADDRESS)."""
    try:
        import dask
        from distributed import Client
    except ImportError:
        raise FracgenError("--backend dask needs dask and distributed: pip install fracgen[dask]") from None
    if isinstance(scheduler, Client):
        return DaskPool(scheduler, own=False)
    address = scheduler or os.environ.get("DASK_SCHEDULER_ADDRESS") or dask.config.get("scheduler-address", None)
    if not address:
        raise FracgenError("--backend dask needs a scheduler: --scheduler tcp://HOST:8786, or its address in "
                           "DASK_SCHEDULER_ADDRESS")
    deadline = time.monotonic() + CONNECT_TIMEOUT
    _probe(str(address), deadline)
    with _held_logs() as held:
        try:
            client = Client(address, timeout=max(1.0, deadline - time.monotonic()), set_as_default=False)
        except Exception as e:  # dask's errors are many types (a peer that is not Dask gave a MemoryError)
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            _abandon(e, Client)
            held.clear()  # what dask logged of it (a CRITICAL traceback for junk msgpack): our line says it
            raise FracgenError(f"cannot reach the Dask scheduler at {address} within {CONNECT_TIMEOUT:g} s: "
                               f"{why[:200]}") from None
    try:
        client.wait_for_workers(1, timeout=CONNECT_TIMEOUT)
    except (TimeoutError, OSError):
        client.close()
        raise FracgenError(f"the Dask scheduler at {address} has no workers (none joined within "
                           f"{CONNECT_TIMEOUT:g} s): start some with `dask worker {address}`") from None
    return DaskPool(client, own=True)


@contextlib.contextmanager
def _held_logs():
    """distributed's log records held back while a Client connects, then passed on to its handlers as they were (a
    caller's `clear()` drops them): junk from a peer made dask log a CRITICAL traceback and a warning on stderr
    before our one line. Every logger of the hierarchy that prints (dask gives several their own handler) holds."""
    records: list[logging.LogRecord] = []

    class Hold(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    loggers = [logging.getLogger("distributed")] + [
        logger for name, logger in list(logging.root.manager.loggerDict.items())
        if name.startswith("distributed.") and isinstance(logger, logging.Logger) and logger.handlers]
    saved = [(logger, logger.handlers[:], logger.propagate) for logger in loggers]
    hold = Hold()
    for logger in loggers:
        logger.handlers[:], logger.propagate = [hold], False
    try:
        yield records
    finally:
        for logger, handlers, propagate in saved:
            logger.handlers[:], logger.propagate = handlers, propagate
        for record in records:
            logging.getLogger(record.name).handle(record)


def _abandon(error: BaseException, client_type) -> None:
    """A Client whose constructor failed lives on in the error's traceback, and its __del__ closes it at exit:
    waiting twice its timeout, then printing an 11-line 'Exception ignored'. Close it now, briefly and quietly."""
    tb = error.__traceback__
    while tb is not None:
        client = tb.tb_frame.f_locals.get("self")
        if isinstance(client, client_type):
            with contextlib.suppress(Exception):
                client.close(timeout=1)
            client.status = "closed"  # what __del__ checks: nothing left to do
        tb = tb.tb_next
    error.__traceback__ = None


def _probe(address: str, deadline: float) -> None:
    """Is a Dask scheduler listening at `address` (tcp)? One FracgenError line by `deadline` if not. dask's own
    connect waits for the peer's first message with no deadline (a silent peer hung it) and allocates whatever size
    that message claims (another protocol's bytes made it ask for 3 EiB); a scheduler sends its handshake at once,
    framed by an 8-byte length, so we read that much ourselves first."""
    from distributed.comm.addressing import parse_address, parse_host_port

    try:
        scheme, location = parse_address(address)
        host, port = parse_host_port(location, 8786)  # Dask's default port
    except (ValueError, TypeError) as e:
        raise FracgenError(f"--scheduler {address!r} is not a Dask address like tcp://HOST:8786 ({e})") from None
    if scheme != "tcp":
        return  # tls://, ucx://: dask's connect (and the catch-all around it) decide

    def fail(why: str):
        raise FracgenError(f"cannot reach the Dask scheduler at {address} within {CONNECT_TIMEOUT:g} s: {why}")

    found: list = []
    resolver = threading.Thread(target=lambda: found.append(_resolve(host, port)), daemon=True)
    resolver.start()
    resolver.join(max(0.0, deadline - time.monotonic()))  # a resolver can take 20 s to give up
    if not found:
        fail(f"the name {host} did not resolve")
    if isinstance(found[0], str):
        fail(found[0])
    try:
        with socket.create_connection(found[0], timeout=max(0.1, deadline - time.monotonic())) as conn:
            header = _receive(conn, 8, deadline)
            size = int.from_bytes(header, "little")
            if not 0 < size <= MAX_HANDSHAKE:
                fail("the peer sent bytes that are not Dask's protocol (is it a Dask scheduler's port?)")
            _receive(conn, size, deadline)
    except TimeoutError:
        fail("the peer accepted the connection but sent nothing (is it a Dask scheduler's port?)")
    except OSError as e:
        fail(e.strerror or str(e))


def _resolve(host: str, port: int) -> tuple | str:
    try:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][4][:2]
    except OSError as e:
        return f"the name {host} did not resolve ({e.strerror or e})"


def _receive(conn: socket.socket, n: int, deadline: float) -> bytes:
    data = b""
    while len(data) < n:
        conn.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionError("the peer closed the connection before Dask's handshake")
        data += chunk
    return data


class DaskPool:
    """Jobs on a Dask cluster's workers; the same interface as `fracgen.workers.LocalPool`."""

    def __init__(self, client, own: bool):
        self.client, self.own = client, own
        self.workers = max(1, sum(client.nthreads().values()))  # sizes the class search's chunks
        self.probe: Probe | None = None
        self.folder: Path | None = None

    def attach(self, out: Path) -> str:
        """Write the probe into --out (locked by this run) and ask every worker what it runs and sees there."""
        self.folder = Path(out).absolute()
        self.probe = (f"{PROBE_PREFIX}{secrets.token_hex(8)}", secrets.token_hex(16))
        (self.folder / self.probe[0]).write_text(self.probe[1])
        workers = self.client.run(_worker_facts, str(self.folder), self.probe)
        mine = _facts()
        for address, facts in sorted(workers.items()):
            theirs = {k: facts[k] for k in mine}
            if theirs != mine:
                raise FracgenError(f"Dask worker {address} on {facts['host']} runs {theirs}, this process {mine}: "
                                   "install the same fracgen on every worker (the shards must be the same bytes)")
        blind = sorted(a for a, f in workers.items() if not f["sees"])
        threads = sum(self.client.nthreads().values())
        where = (f"Dask cluster at {self.client.scheduler.address}: {len(workers)} worker(s), {threads} thread(s); ")
        if not blind:
            return where + f"all see {out}: they write the shards there, this process renames them"
        return where + (f"{len(blind)} do not see {out} (not a shared folder), so their shards come back here as "
                        f"bytes: {', '.join(blind[:3])}{' ...' if len(blind) > 3 else ''}")

    def map_unordered(self, fn: Callable, jobs: list[tuple]) -> Iterator:
        """fn(*args) for each args in `jobs`, on the cluster; the results in the order they finish. Closing the
        iterator (an error, Ctrl-C) cancels the jobs not yet finished."""
        from distributed import as_completed
        from distributed.scheduler import KilledWorker

        run = secrets.token_hex(4)
        futures = [self.client.submit(fn, *args, key=f"fracgen-{fn.__name__}-{run}-{i}", retries=RETRIES)
                   for i, args in enumerate(jobs)]
        try:
            for future in as_completed(futures, loop=self.client.loop):
                try:
                    result = future.result()
                except KilledWorker as e:
                    raise FracgenError(f"job {e.task} was running on each of the {e.allowed_failures + 1} Dask "
                                       "workers that died while running it; the shards finished so far are kept: "
                                       "`--resume` renders the rest") from None
                future.release()
                yield result
        finally:
            self.client.cancel([f for f in futures if not f.done()])

    def close(self) -> None:
        if self.probe is not None and self.folder is not None:
            (self.folder / self.probe[0]).unlink(missing_ok=True)
            self.probe = None
        if self.own:
            self.client.close()
            self.own = False
