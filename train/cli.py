"""`fracgen-train`: the trainer's commands, from any folder (a project's own `train.py` does not shadow them).

    fracgen-train pretrain --shards shards/ --out runs/x        (torchrun: -m fracgen_train.pretrain)
    fracgen-train finetune --checkpoint runs/x --out runs/x/digits
    fracgen-train probe --checkpoint runs/x
    fracgen-train publish runs/x --to hf://ORG/NAME
    fracgen-train experiments compare

Installed, the trainer is the package `fracgen_train` (the repository's `train/` folder, whose imports are all
relative, so it runs under either name); it needs the `train` extra: `pip install 'fracgen[train]'`.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

COMMANDS = {"pretrain": ".pretrain", "finetune": ".finetune", "probe": ".probe", "publish": ".publish",
            "experiments": ".experiments.__main__"}
NEEDS = {"torch": "torch", "torchvision": "torchvision", "timm": "timm", "safetensors": "safetensors",
         "sklearn": "scikit-learn"}  # what `pip install 'fracgen[train]'` brings


def missing() -> list[str]:
    """The trainer's dependencies this environment lacks (by distribution name)."""
    return [dist for module, dist in NEEDS.items() if importlib.util.find_spec(module) is None]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    usage = f"usage: fracgen-train {{{','.join(COMMANDS)}}} [OPTIONS]   (fracgen-train COMMAND --help)"
    if argv and argv[0] == "--version":
        from fracgen.version import __version__

        print(f"fracgen-train {__version__}")
        sys.exit(0)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.split("\n\n")[0] + "\n\n" + usage)
        sys.exit(0 if argv else 2)  # no command: a usage error, as click's
    if argv[0] not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}; {usage}", file=sys.stderr)
        sys.exit(2)
    lacking = missing()
    if lacking:
        print(f"error: the trainer needs {', '.join(lacking)}: pip install 'fracgen[train]'", file=sys.stderr)
        sys.exit(1)
    from .runtime import run_cli

    module = importlib.import_module(COMMANDS[argv[0]], __package__)
    sys.argv = [f"fracgen-train {argv[0]}", *argv[1:]]
    run_cli(module.app)


if __name__ == "__main__":
    main()
