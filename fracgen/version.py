"""fracgen's version, in one place: the package, `fracgen --version`, manifests and the wheel's metadata
(pyproject.toml reads it from here) all take it from this line."""

__version__ = "0.4.0"
