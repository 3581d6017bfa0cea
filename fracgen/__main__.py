"""`python -m fracgen`: the same command line as the `fracgen` script."""

from fracgen.cli import app

app(prog_name="fracgen")
