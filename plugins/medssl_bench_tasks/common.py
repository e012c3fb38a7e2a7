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


# --------------------------------------------------------------------------- DDP negatives
# Contrastive tasks take negatives from every process of a distributed run (their
# ``gather_negatives`` option): the pool is the global batch, as one process at that batch
# would have it. Without an initialised process group (one process) every helper is the
# identity, so one-process results are unchanged.


def process_group() -> tuple[int, int]:
    """(rank, world size) of the initialised default process group; (0, 1) without one."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def gather_with_grad(z: Tensor) -> tuple[Tensor, int]:
    """The rows of ``z`` from every DDP rank, concatenated in rank order, and the offset of
    this rank's rows. The gather is differentiable both ways
    (:func:`medssl_bench.distributed.gather_rows`): the gradient a rank's loss sends into
    another rank's rows goes back to that rank, so after DDP averages the gradients, N
    processes step exactly as one process at the global batch would (keeping only the local
    rows' gradient, as many SimCLR ports do, loses every "other rank's anchor -> my key"
    term: ~12 % of the gradient at 2 ranks, measured).
    Without an initialised process group (or with one rank) ``z`` itself and 0. Every
    rank's rows must have the same shape."""
    rank, world = process_group()
    if world == 1:
        return z, 0
    from medssl_bench.distributed import gather_rows

    return gather_rows(z), rank * z.shape[0]


def gather_detached(t: Tensor) -> Tensor:
    """The rows of ``t`` from every rank in rank order, without gradient (``t`` in one
    process)."""
    return gather_with_grad(t.detach())[0]


def all_reduce_sum(t: Tensor) -> Tensor:
    """``t`` summed over every rank, without gradient (``t`` itself in one process): a count
    that a loss over the global batch divides by."""
    if process_group()[1] == 1:
        return t.detach()
    import torch.distributed as dist

    total = t.detach().clone()
    dist.all_reduce(total)
    return total
