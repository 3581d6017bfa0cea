"""fracgen: the 1p-frac dataset (one fractal, C perturbed copies) rendered fast into WebDataset shards."""

from fracgen.dataset import render_sample  # the one way `train` reaches the renderer
from fracgen.errors import FracgenError
from fracgen.ifs import IFS, perturb, sample_sigma_system
from fracgen.render import render
from fracgen.version import __version__

__all__ = ["FracgenError", "IFS", "perturb", "render", "render_sample", "sample_sigma_system", "__version__"]
