"""Pieces shared by proxy tasks."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class MLPHead(nn.Module):
    """Linear - ReLU - Linear: the hidden nonlinear layer Taleb et al. (after Kolesnikov et
    al.) put before every proxy-task classifier."""

    def __init__(self, in_features: int, hidden: int, out_features: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_features)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def classification_loss(logits: Tensor, targets: Tensor) -> tuple[Tensor, dict[str, float]]:
    """Cross-entropy and accuracy (computed in float32 whatever the autocast dtype)."""
    logits = logits.float()
    loss = F.cross_entropy(logits, targets)
    with torch.no_grad():
        acc = (logits.argmax(1) == targets).float().mean().item()
    return loss, {"acc": acc}


def randint(high: int, size: tuple[int, ...], generator: torch.Generator, device) -> Tensor:
    """``torch.randint`` on ``device`` driven by ``generator`` (which must live there too)."""
    return torch.randint(high, size, generator=generator, device=device)
