"""Seeding and RNG state capture, so a run (and a resumed run) is reproducible."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device).

    Args:
        seed: the run's seed. Each rank of a multi-process run should pass the same seed; data
            sharding, not the seed, makes ranks see different examples.
    """
    from accelerate.utils import set_seed

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    set_seed(seed)  # also seeds CUDA/XPU/NPU generators where present


def get_rng_state() -> dict:
    """Capture every RNG this process uses, as JSON-serializable data (no pickle).

    Returns:
        {"python": ..., "numpy": ..., "torch": [uint8 values], "cuda": [[...] per device]}
    """
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
        "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state: dict) -> None:
    """Restore RNGs captured by `get_rng_state`.

    Args:
        state: the dict returned by `get_rng_state` (possibly after a JSON round trip).
    """
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
