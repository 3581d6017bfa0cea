"""A module's mutation pass (`make mutants MODULE=train/checkpoint.py`, or several: MODULE="a.py b.py"): mutmut over
those modules' functions with the tests pyproject.toml's [tool.mutmut] selects, then a row of docs/testing.md's table
per module and the survivors' names (read each with `mutmut show NAME`). Not a test: the suite never runs it."""

from __future__ import annotations

import collections
import os
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def main(modules: list[str]) -> int:
    """Each module's row (and its survivors) from one mutmut run over them all: the stats pass, which runs every
    selected test once (~7 minutes here), is paid once."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]
    wrong = [m for m in modules if m not in config["only_mutate"]] or ([] if modules else ["(none)"])
    if wrong:
        print(f"error: MODULE={' '.join(wrong)!r} is not mutated; choose from {', '.join(config['only_mutate'])}",
              file=sys.stderr)
        return 2
    prefixes = [m.removesuffix(".py").replace("/", ".") + "." for m in modules]
    mutmut = str(Path(sys.executable).with_name("mutmut"))
    # one torch thread per forked child: with OpenMP's pool started in the parent a forked child stalls
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([mutmut, "run", "--max-children", str(min(2, os.cpu_count() or 1)), *(p + "*" for p in prefixes)],
                   cwd=ROOT, env=env, check=False)
    listing = subprocess.run([mutmut, "results", "--all", "true"], cwd=ROOT, env=env, capture_output=True,
                             text=True, check=True).stdout
    for module, prefix in zip(modules, prefixes, strict=True):
        status = {}
        for line in listing.splitlines():
            name, _, state = line.strip().rpartition(": ")
            if name.startswith(prefix):
                status[name] = state
        counts = collections.Counter(status.values())
        print(f"| `{module}` | {len(status)} | {counts['killed']} | {counts['survived']} | "
              f"{sum(n for s, n in counts.items() if s not in ('killed', 'survived'))} |")
        for name, state in sorted(status.items()):
            if state != "killed":
                print(f"  {state}: {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(" ".join(sys.argv[1:]).split()))
