"""fracgen: the 1p-frac dataset (one fractal, C perturbed copies) rendered fast into WebDataset shards."""

__version__ = "0.3.0"

from fracgen.dataset import render_sample  # noqa: E402  (the one way `train` reaches the renderer)
from fracgen.errors import FracgenError  # noqa: E402
from fracgen.ifs import IFS, perturb, sample_sigma_system  # noqa: E402
from fracgen.render import render  # noqa: E402

__all__ = ["FracgenError", "IFS", "perturb", "render", "render_sample", "sample_sigma_system", "__version__"]
