import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests import the slow reference implementations

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs a worker per core: one torch thread each, set before
    os.environ["OMP_NUM_THREADS"] = "1"   # torch is imported (two threads per worker on 2 cores spin, 2-10x slower)

from fracgen.dataset import Settings  # noqa: E402

# Small but real: 12 classes of 64 px images in 3 shards, fast enough for every test to render.
SMALL = Settings(classes=12, per_class=1, points=4000, size=64, shard_size=5, seed=3)


@pytest.fixture
def small_settings():
    return SMALL


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under FRACGEN_NO_SKIP=1 (CI, where every extra is installed) a test skipped for a missing package fails: a
    check that did not run must not look like one that passed. (A skip for a missing OS feature stays a skip.)"""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("FRACGEN_NO_SKIP") == "1" and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if "could not import" not in reason and "is not installed" not in reason:
            return
        report.outcome = "failed"
        report.longrepr = f"skipped, but FRACGEN_NO_SKIP=1 (every extra is installed here): {reason}"


if "MUTANT_UNDER_TEST" in os.environ:  # under mutmut (pyproject.toml [tool.mutmut]), whose trampolines run in-process
    import subprocess

    _popen_init = subprocess.Popen.__init__

    def _no_new_python(self, args, *a, **kw):
        program = str(args[0] if isinstance(args, (list, tuple)) else args)
        if "python" in Path(program).name or program == sys.executable:
            pytest.skip("starts a Python process, which mutmut's trampolines cannot follow")
        _popen_init(self, args, *a, **kw)

    subprocess.Popen.__init__ = _no_new_python

    import joblib

    _parallel_init = joblib.Parallel.__init__

    def _in_process(self, *a, **kw):  # joblib's worker processes run the code in this one, where mutmut sees it
        _parallel_init(self, *a, **{**kw, "n_jobs": 1})

    joblib.Parallel.__init__ = _in_process

    import torch

    def _no_compile(*a, **kw):  # dynamo cannot trace the trampolines (sys._getframe): a compiled graph guards nothing
        pytest.skip("compiles with torch.compile, which cannot trace mutmut's trampolines")

    torch.compile = _no_compile

    # A mutant's tests run up to this many seconds each (their stats-pass durations): a survivor runs every test
    # that covers its function, and the trainer runs (4-13 s each, ~100 of them) made one survivor of
    # train/model.py cost five minutes. A mutant only those longer tests reach ends "no tests" (exit 5), counted
    # as not killed in docs/testing.md. FRACGEN_MUTANT_BUDGET=inf runs them all.
    MUTANT_BUDGET_S = float(os.environ.get("FRACGEN_MUTANT_BUDGET", "3"))

    def pytest_collection_modifyitems(config, items):
        """A mutant's tests fastest first (mutmut's durations, from its stats pass): with -x the first failure ends
        the run, so a mutant a unit test kills costs that test, not the trainer runs that also cover the code."""
        import json

        try:
            durations = json.loads(Path("mutmut-stats.json").read_text())["duration_by_test"]
        except (OSError, ValueError, KeyError):  # the stats pass itself: nothing known yet
            return
        items.sort(key=lambda item: durations.get(item.nodeid, 0.0))
        if "__mutmut_" in os.environ.get("MUTANT_UNDER_TEST", ""):
            kept, dropped = [], []
            for item in items:
                (dropped if durations.get(item.nodeid, 0.0) > MUTANT_BUDGET_S else kept).append(item)
            if dropped:
                items[:] = kept
                config.hook.pytest_deselected(items=dropped)
