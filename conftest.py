"""Test-wide settings: fixed thread count, deterministic numerics, seeds reset for every test."""

from __future__ import annotations

import os
import random

os.environ.setdefault("OMP_NUM_THREADS", "2")

import numpy as np  # noqa: E402  (the thread variable must be set before the import)
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
torch.use_deterministic_algorithms(True)


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    """Every test starts from the same global random state."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
