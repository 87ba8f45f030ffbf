"""Random draws that follow a model's dtype and device whatever device the generator lives on."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor


def randn(shape: Sequence[int], like: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """Standard normal noise of ``shape`` with ``like``'s dtype and device.

    A generator can only fill tensors on its own device, so with a ``generator`` the draw is made
    there and then moved: a CPU generator (what :func:`neuralode.seed_everything` returns) serves a
    CUDA model, and a seed gives the same numbers on every device.
    """
    device = generator.device if generator is not None else like.device
    return torch.randn(tuple(shape), generator=generator, dtype=like.dtype, device=device).to(like.device)
