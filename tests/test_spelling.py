"""One spelling of the trainer everywhere a user reads (issue 40): `fracgen-train COMMAND`, and `-m fracgen_train.X`
only where torchrun needs a module. `python -m train.X` runs only from a clone's root, and there a project's own
train.py would shadow it; after `pip install` it fails."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
# the other spellings: the repository folder as a module, or the package started by python instead of torchrun
OTHER = re.compile(r"-m\s+train(\.\w+|\s|$)|python[0-9.]*\s+-m\s+fracgen_train", re.M)
# in the prose of README and docs/, a command is named as it is typed: `fracgen-train pretrain`, not train.pretrain
PROSE = re.compile(r"(?<![\w/.])train\.(pretrain|finetune|probe|publish)\b(?![\w.(])")


def user_texts() -> list[Path]:
    """README, CHANGELOG, docs/ and the Makefile; every source file of both packages (their docstrings are the
    --help texts, their f-strings the cards publish writes and the hints in errors). Not docs/results/gpu/*.sh: the
    device scripts run a clone that is not installed (the GPU image gets wheels only)."""
    texts = [ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "Makefile", *sorted((ROOT / "docs").rglob("*.md"))]
    return texts + sorted((ROOT / "fracgen").rglob("*.py")) + sorted((ROOT / "train").rglob("*.py"))


def test_every_text_a_user_reads_spells_the_trainer_one_way():
    found = [f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0).strip()!r}"
             for path in user_texts() for text in [path.read_text()] for m in OTHER.finditer(text)]
    assert not found, "the other spelling of the trainer:\n" + "\n".join(found)


def test_the_docs_name_the_commands_as_they_are_typed():
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    found = [f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)!r}"
             for path in docs for text in [path.read_text()] for m in PROSE.finditer(text)]
    assert not found, "a module's name where a command is meant:\n" + "\n".join(found)
    assert PROSE.search("run `train.pretrain --out x`") and PROSE.search("(train.finetune, train.probe)")
    assert not PROSE.search("train/pretrain.py, train.pretrain.Config, tests/test_train.probe")


def test_messages_and_help_name_the_commands_as_they_are_typed():
    """Every string of both packages that is not a docstring (errors, hints, help, the cards): `fracgen-train
    pretrain`, not train.pretrain (a module's name, meaningless after `pip install`)."""
    import ast

    found = []
    for path in sorted((ROOT / "fracgen").rglob("*.py")) + sorted((ROOT / "train").rglob("*.py")):
        tree = ast.parse(path.read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and node.body
                      and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                found += [f"{path.relative_to(ROOT)}:{node.lineno}: {m.group(0)!r}" for m in PROSE.finditer(node.value)]
    assert not found, "a module's name where a command is meant:\n" + "\n".join(found)


def test_the_pattern_finds_the_other_spellings():  # a check that cannot fail guards nothing
    for bad in ("python -m train.pretrain --out x", "torchrun --standalone -m train.pretrain", "python3 -m train x",
                "python -m fracgen_train.finetune"):
        assert OTHER.search(bad), bad
    for good in ("fracgen-train pretrain --out x", "torchrun --nproc_per_node=8 -m fracgen_train.pretrain",
                 "a train.pretrain checkpoint", "python -m fracgen render"):
        assert not OTHER.search(good), good


@pytest.mark.parametrize("command", ["pretrain", "finetune", "probe", "publish", "experiments.__main__"])
def test_help_spells_the_trainer_one_way(command):
    import importlib

    app = importlib.import_module(f"train.{command}").app
    result = CliRunner().invoke(app, ["--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert not OTHER.search(result.output), result.output
