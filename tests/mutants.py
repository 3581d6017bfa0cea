"""A module's mutation pass (`make mutants MODULE=train/checkpoint.py`, or several: MODULE="a.py b.py"): mutmut over
those modules' functions with the tests pyproject.toml's [tool.mutmut] selects, then a row of docs/testing.md's table
per module and the survivors' names (read each with `mutmut show NAME`). `--survivors` (make mutants ...
SURVIVORS=1) runs again only the mutants the last pass did not kill: after a new test, minutes instead of the whole
pass. Not a test: the suite never runs it."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _status(mutmut: str, env: dict) -> dict[str, str]:
    listing = subprocess.run([mutmut, "results", "--all", "true"], cwd=ROOT, env=env, capture_output=True,
                             text=True, check=True).stdout
    names = (line.strip().rpartition(": ") for line in listing.splitlines())
    return {name: state for name, _, state in names if name}


def _forget(names: set[str]) -> None:
    """Drop mutmut's verdicts on `names` (mutants/**/*.py.meta): it keeps the verdict of a mutant whose function did
    not change, even when it is named on the command line, so a survivor would never meet a test added since."""
    for meta in (ROOT / "mutants").rglob("*.py.meta"):
        record = json.loads(meta.read_text())
        verdicts = record.get("exit_code_by_key", {})
        forgotten = names & verdicts.keys()
        if forgotten:
            verdicts.update(dict.fromkeys(forgotten))
            meta.write_text(json.dumps(record))


def main(modules: list[str], survivors: bool = False) -> int:
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
    chosen = [p + "*" for p in prefixes]
    if survivors:
        chosen = [n for n, state in _status(mutmut, env).items() if state != "killed" and n.startswith(tuple(prefixes))]
        _forget(set(chosen))
        if not chosen:
            print("no survivors to run again")
    if chosen:
        subprocess.run([mutmut, "run", "--max-children", str(min(2, os.cpu_count() or 1)), *chosen], cwd=ROOT, env=env,
                       check=False)
    everything = _status(mutmut, env)
    for module, prefix in zip(modules, prefixes, strict=True):
        status = {name: state for name, state in everything.items() if name.startswith(prefix)}
        counts = collections.Counter(status.values())
        print(f"| `{module}` | {len(status)} | {counts['killed']} | {counts['survived']} | "
              f"{sum(n for s, n in counts.items() if s not in ('killed', 'survived'))} |")
        for name, state in sorted(status.items()):
            if state != "killed":
                print(f"  {state}: {name}")
    return 0


if __name__ == "__main__":
    args = " ".join(sys.argv[1:]).split()
    sys.exit(main([a for a in args if a != "--survivors"], "--survivors" in args))
