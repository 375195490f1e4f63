import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("OMP_NUM_THREADS", "1")
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory) -> Path:
    """A small noisy synthetic data set (train 512 pairs in 4 shards, val 128, 30% noise)."""
    from dissect_ds.data.synthetic import write_synthetic

    out = tmp_path_factory.mktemp("synthetic")
    write_synthetic(str(out), num_samples=512, noise_rate=0.3, seed=0, val_samples=128, shard_size=128, progress=False)
    return out
