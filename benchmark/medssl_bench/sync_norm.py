"""Batch normalisation over the global batch of a DDP run.

Under DDP each process holds ``batch_size`` volumes of a global batch of ``N * batch_size``;
a batch-norm layer that normalises with its own process's statistics trains another model
than one process at the global batch (and at the small batches of 3D training, a noisier
one). :func:`synchronise` turns every batch-norm layer of a module into one whose training
statistics are those of the global batch, gathered from every process (differentiably, so
the gradient is one process's too), as one process would compute them.

Why not ``torch.nn.SyncBatchNorm``: it runs on CUDA only (the CPU tests with gloo could not
check it), it replaces the layer's class (Models Genesis' ``ContBatchNorm3d``, which also
normalises with batch statistics in evaluation, would lose that), and SparK's masked
normalisation (``medssl_bench_tasks.masking``) needs the same global statistics over its
active voxels only: :func:`batch_moments` serves both. A layer keeps its class (it becomes a
subclass of it), its parameters and buffers under their names, so state dicts, weight
files and ``isinstance`` checks are unchanged.

Evaluation is never synchronised: processes score different numbers of batches (and each
scores whole batches of one process's evaluation, see ``Runtime.shard``), so a layer in
``eval()`` behaves exactly as it did.
"""

from __future__ import annotations

import sys
import warnings

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


class SyncedBatchNorm(_BatchNorm):
    """Mixin put in front of a batch-norm layer's own class by :func:`synchronise`: in
    training, the global batch's statistics; in evaluation, the layer's own ``forward``."""

    #: Set (by a forward pre-hook) when a forward hook will replace this call's output with
    #: a normalisation of its own (SparK's masked batch norm, which gathers the statistics
    #: it needs itself): the call then takes this process's statistics, sparing a collective
    #: whose result would be thrown away. Cleared by the hook that replaces the output.
    output_replaced: bool = False

    def forward(self, input: Tensor) -> Tensor:
        if not self.training or self.output_replaced:
            return super().forward(input)
        self._check_input_dim(input)
        dims = (0, *range(2, input.dim()))
        mean, var, count = batch_moments(self, input, dims)
        if self.track_running_stats and self.running_mean is not None:
            self.num_batches_tracked.add_(1)
            update_running_stats(self, mean, var, count)
        shape = (1, -1, *([1] * (input.dim() - 2)))
        y = (input.float() - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight.float().view(shape) + self.bias.float().view(shape)
        return self.after_norm(y.to(input.dtype))

    def after_norm(self, y: Tensor) -> Tensor:
        """What the layer's own forward does after normalising (nothing for batch norm)."""
        return y


class SyncedBatchNormAct(SyncedBatchNorm):
    """:class:`SyncedBatchNorm` for timm's ``BatchNormAct2d`` (the norm of its DenseNet and
    EfficientNet encoders): batch norm, then its ``drop`` and ``act``, as its forward."""

    def after_norm(self, y: Tensor) -> Tensor:
        return self.act(self.drop(y))


def synced(module: nn.Module) -> bool:
    """Whether ``module``'s batch statistics are the global batch's now: a layer made so by
    :func:`synchronise`, in training mode."""
    return isinstance(module, SyncedBatchNorm) and module.training


def batch_moments(module: nn.Module, x: Tensor, dims: tuple[int, ...],
                  weight: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel mean and (biased) variance of ``x`` over ``dims`` (kept as size-1 dims),
    in float32, and the count of values they are over; with ``weight`` (a 0/1 mask
    broadcastable to ``x``) over the values it marks. Over every process's ``x`` when
    ``module`` is :func:`synced`, else over this process's.

    Every process sends its count, mean and sum of squared deviations (one all-gather, which
    carries the gradient back to each process's own values); they are combined as one
    process computing over the concatenated batch would (Chan et al.'s pairwise update), not
    as sums of squares, which lose precision when the mean is large."""
    xf = x.float()
    if weight is None:
        mean = xf.mean(dims, keepdim=True)
        n = torch.full_like(mean, xf.numel() / mean.numel())
        m2 = ((xf - mean) ** 2).sum(dims, keepdim=True)
    else:
        w = weight.to(torch.float32).expand_as(xf)
        n = w.sum(dims, keepdim=True)
        mean = (xf * w).sum(dims, keepdim=True) / n.clamp_min(1)
        m2 = ((xf - mean) ** 2 * w).sum(dims, keepdim=True)
    if synced(module) and dist.is_initialized() and dist.get_world_size() > 1:
        from medssl_bench.distributed import gather_rows

        ns, means, m2s = gather_rows(torch.stack([n, mean, m2])[None]).unbind(1)
        n = ns.sum(0)
        mean = (ns * means).sum(0) / n.clamp_min(1)
        m2 = (m2s + ns * (means - mean) ** 2).sum(0)
    return mean, m2 / n.clamp_min(1), n


@torch.no_grad()
def update_running_stats(module: _BatchNorm, mean: Tensor, var: Tensor, count: Tensor) -> None:
    """Move ``module``'s running statistics towards a batch's ``mean`` and biased ``var``
    over ``count`` values, as ``nn.BatchNorm`` does: the unbiased variance, momentum (or,
    without one, the cumulative average over ``num_batches_tracked`` batches)."""
    # tensors only, no host synchronisation (nor a graph break under torch.compile)
    n = count.flatten()[0].to(var.dtype)
    unbiased = var.flatten() * n / (n - 1).clamp_min(1)
    if module.momentum is None:  # the cumulative average
        momentum: Tensor | float = 1.0 / module.num_batches_tracked.clamp_min(1).to(var.dtype)
    else:
        momentum = module.momentum
    for running, batch in ((module.running_mean, mean.flatten()), (module.running_var, unbiased)):
        running.copy_(torch.lerp(running, batch.to(running.dtype), momentum))


_SYNCED_CLASSES: dict[type, type] = {}


def _batch_norm_act() -> type | None:
    """timm's ``BatchNormAct2d`` when timm is loaded (it is imported lazily)."""
    layers = sys.modules.get("timm.layers")
    return getattr(layers, "BatchNormAct2d", None) if layers is not None else None


def synchronise(module: nn.Module) -> int:
    """Make every batch-norm layer in ``module`` normalise with the global batch's statistics
    in training (in place; see the module docstring); how many layers it changed.

    A layer qualifies when its training ``forward`` is plain batch norm: ``nn.BatchNorm1d/
    2d/3d`` and subclasses that declare ``training_forward_is_batch_norm = True`` (Models
    Genesis' ``ContBatchNorm3d``), or timm's ``BatchNormAct2d`` (batch norm, dropout,
    activation). ``nn.SyncBatchNorm`` synchronises itself. Any other batch-norm subclass
    keeps per-process statistics, with a warning naming it."""
    changed, kept = 0, set()
    norm_act = _batch_norm_act()
    for layer in module.modules():
        cls = type(layer)
        if not isinstance(layer, _BatchNorm) or isinstance(layer, SyncedBatchNorm | nn.SyncBatchNorm):
            continue
        if norm_act is not None and isinstance(layer, norm_act):
            mixin: type = SyncedBatchNormAct
        elif cls.forward is _BatchNorm.forward or getattr(
                cls, "training_forward_is_batch_norm", False):
            mixin = SyncedBatchNorm
        else:
            kept.add(cls.__name__)
            continue
        if cls not in _SYNCED_CLASSES:
            name = f"Synced{cls.__name__}"
            _SYNCED_CLASSES[cls] = type(name, (mixin, cls), {"__module__": __name__})
            globals().setdefault(name, _SYNCED_CLASSES[cls])  # picklable by name
        layer.__class__ = _SYNCED_CLASSES[cls]
        changed += 1
    if kept:
        warnings.warn(f"{', '.join(sorted(kept))}: batch norm with its own forward, left "
                      "with per-process statistics under DDP (declare "
                      "training_forward_is_batch_norm = True on the class if its training "
                      "forward is plain batch norm)", stacklevel=2)
    return changed
