"""The bounds fracgen holds every data set to, in one place below every other module: what `render` accepts, what
a manifest may claim and what a sample's parts may weigh. The settings check them, and so do the readers of shards
that any server may have written."""

MAX_CLASSES = 100_000  # the manifest holds every class's system; FractalDB-10k has 10,000
MAX_SAMPLES = 10**9  # 1000x FractalDB-1M; bounds what a manifest may claim (num_samples, shards)
MAX_NAME = 100  # a shard's file name and its tar members' names must stay short
MAX_MAPS = 256  # the most --maps: FractalDB draws 2..8; a sample's .json grows with the maps
