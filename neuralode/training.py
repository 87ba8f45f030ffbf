"""Training utilities the chapters share: run profiles, device choice, seeding."""

from __future__ import annotations

import random
from typing import Callable

import numpy as np
import torch

__all__ = ["PROFILES", "resolve_profile", "default_device", "seed_everything", "saved_tensor_bytes"]

#: The run profiles: ``smoke`` (CI, seconds), ``cpu`` (the rendered book on a laptop, minutes),
#: ``gpu`` (paper scale, chosen automatically when CUDA is present).
PROFILES = ("smoke", "cpu", "gpu")


def resolve_profile(profile: str) -> str:
    """Turn a chapter's ``PROFILE`` setting into one of :data:`PROFILES`.

    ``"auto"`` gives ``"gpu"`` when CUDA is available and ``"cpu"`` otherwise.

    Raises:
        ValueError: for any other name, listing the valid ones.
    """
    if not isinstance(profile, str):
        raise TypeError(f"resolve_profile: profile must be a string, got {type(profile).__name__}.")
    name = profile.strip().lower()
    if name == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if name not in PROFILES:
        raise ValueError(f"resolve_profile: unknown profile {profile!r}; choose 'auto' or one of "
                         f"{', '.join(PROFILES)} (set it with the NEURALODE_PROFILE environment variable).")
    return name


def default_device() -> torch.device:
    """CUDA when it is available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and PyTorch (all devices); returns a CPU generator seeded alike."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def saved_tensor_bytes(fn: Callable[[], object]) -> int:
    """Bytes autograd saves for the backward pass while ``fn()`` runs (the memory cost of gradients).

    Counted with ``torch.autograd.graph.saved_tensors_hooks``: every tensor an operation keeps for
    its backward is counted once per save, at its full size. Returns the total in bytes.
    """
    total = 0

    def pack(x: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += x.numel() * x.element_size()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        fn()
    return total
