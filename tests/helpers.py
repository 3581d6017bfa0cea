"""Small helpers the tests share: polling, and a folder served over HTTP on loopback."""

import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def wait_for(predicate, seconds: float) -> bool:
    """Poll `predicate` every 50 ms until it holds (True) or `seconds` pass (False)."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


class Server:
    """A folder over HTTP on a free loopback port (ThreadingHTTPServer), recording each request's path and headers.
    `delay` slows every shard; `fail_once` answers 503 the first time a path is asked for; `commit` is sent as the
    hub's X-Repo-Commit header."""

    def __init__(self, root: Path, delay: float = 0.0, fail_once: tuple[str, ...] = (), commit: str | None = None,
                 query: str | None = None, routes: dict | None = None):
        """`query`: every request must carry exactly this query string (a folder-wide signature), else 403;
        `routes`: {path: fn(handler)} answers those paths itself (a redirect, an endless body)."""
        self.delay, self.fail_once, self.commit = delay, set(fail_once), commit
        self.query, self.routes = query, routes or {}
        self.requests: list[str] = []
        self.headers: list[dict] = []
        self.in_flight = self.most_in_flight = 0  # shard requests being answered at once, and the most seen
        self._counting = threading.Lock()
        owner = self

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self):
                path, _, query = self.path.partition("?")
                owner.requests.append(path)
                owner.headers.append(dict(self.headers))
                if owner.query is not None and query != owner.query:
                    self.send_error(403, "bad signature")
                    return
                self.path = path
                if path in owner.routes:
                    owner.routes[path](self)
                    return
                if self.path in owner.fail_once:
                    owner.fail_once.discard(self.path)
                    self.send_error(503, "busy")
                    return
                if not self.path.endswith(".tar"):
                    super().do_GET()
                    return
                with owner._counting:
                    owner.in_flight += 1
                    owner.most_in_flight = max(owner.most_in_flight, owner.in_flight)
                try:
                    if owner.delay:
                        time.sleep(owner.delay)
                    super().do_GET()
                finally:
                    with owner._counting:
                        owner.in_flight -= 1

            def end_headers(self):
                if owner.commit:
                    self.send_header("X-Repo-Commit", owner.commit)
                super().end_headers()

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"

    def tars(self) -> list[str]:
        return [p.lstrip("/") for p in self.requests if p.endswith(".tar")]

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def train_cli(app, args, capsys) -> tuple[int, str, str]:
    """A train.* command line run in this process (no second torch import): (exit code, stdout, stderr)."""
    import sys

    from train.runtime import run_cli

    argv, sys.argv = sys.argv, ["train", *map(str, args)]
    try:
        run_cli(app)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = argv
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def python_m(module: str, *args, env: dict | None = None):
    """`python -m MODULE ARGS` run in this process (its Typer app through train.runtime.run_cli, stdout and stderr
    captured, the exit code from SystemExit), as a subprocess.CompletedProcess: a second Python would pay ~4 s of
    torch import per command. Tests that need a process of their own (a kill, torchrun, workers dying with their
    parent, a fresh import) use subprocess directly. `env`: variables set for the call."""
    import contextlib
    import importlib
    import io
    import os
    import subprocess
    import sys

    from train.runtime import run_cli

    found = importlib.import_module(module)
    app = getattr(found, "app", None) or importlib.import_module(f"{module}.__main__").app  # a package's __main__
    out, err = io.StringIO(), io.StringIO()
    argv, saved = sys.argv, {k: os.environ.get(k) for k in (env or {})}
    sys.argv = [module, *map(str, args)]
    os.environ.update(env or {})
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            run_cli(app)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return subprocess.CompletedProcess([module, *map(str, args)], code, out.getvalue(), err.getvalue())


def python(*args, timeout: float = 240, **kw):
    """`python ARGS` for the tests: `-m train.*` in this process (python_m), anything else in a subprocess with one
    torch thread and the repository on the path."""
    import os
    import subprocess
    import sys

    args = [str(a) for a in args]
    if len(args) > 1 and args[0] == "-m" and args[1].startswith("train.") and not kw:
        return python_m(args[1], *args[2:])
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    return subprocess.run([sys.executable, *args], cwd=root, env=env, capture_output=True, text=True,
                          timeout=timeout, **kw)
