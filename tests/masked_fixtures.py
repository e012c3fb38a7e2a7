"""Shared by the masked-modelling task tests (simmim3d, spark3d): smooth test volumes."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def smooth(batch: int, size: int = 16, seed: int = 0, channels: int = 1) -> torch.Tensor:
    """Low-frequency volumes in [0, 1]: learnable in a few steps, unlike white noise."""
    coarse = torch.rand(batch, channels, 4, 4, 4, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(coarse, size=(size,) * 3, mode="trilinear")
