import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests import the slow reference implementations

from fracgen.dataset import Settings  # noqa: E402

# Small but real: 12 classes of 64 px images in 3 shards, fast enough for every test to render.
SMALL = Settings(classes=12, per_class=1, points=4000, size=64, shard_size=5, seed=3)


@pytest.fixture
def small_settings():
    return SMALL
