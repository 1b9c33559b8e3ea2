"""Seeding, so a run is reproducible (a checkpoint's RNG state: common/checkpoint.py)."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device). Every rank passes the same seed: data
    sharding, not the seed, makes ranks see different examples."""
    from accelerate.utils import set_seed

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    set_seed(seed)  # also seeds CUDA/XPU/NPU generators where present
