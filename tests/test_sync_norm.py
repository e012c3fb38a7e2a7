"""sync_norm in one process: a synchronised batch-norm layer computes exactly what its own
class computes (outputs, gradients, running statistics, batch count), for every kind of
batch norm it takes over; the statistics across processes are checked in
tests/test_distributed.py (2 gloo processes against one)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from medssl_bench.sync_norm import SyncedBatchNorm, synchronise


def _layers() -> dict[str, nn.Module]:
    from timm.layers import BatchNormAct2d

    from medssl_bench_backbones.genesis_unet3d import ContBatchNorm3d

    return {
        "bn3d": nn.BatchNorm3d(3),
        "bn3d-cumulative": nn.BatchNorm3d(3, momentum=None),
        "bn3d-untracked": nn.BatchNorm3d(3, track_running_stats=False),
        "bn3d-no-affine": nn.BatchNorm3d(3, affine=False),
        "bn2d-act (timm)": BatchNormAct2d(3, act_layer=nn.ReLU),
        "bn1d": nn.BatchNorm1d(3),
        "contbatch (genesis)": ContBatchNorm3d(3),
    }


@pytest.mark.parametrize("name", list(_layers()))
def test_a_synchronised_layer_computes_what_its_own_class_computes(name):
    own = _layers()[name]
    if own.affine:
        with torch.no_grad():
            own.weight.uniform_(0.5, 1.5), own.bias.uniform_(-1, 1)
    synced = copy.deepcopy(own)
    assert synchronise(synced) == 1
    assert isinstance(synced, SyncedBatchNorm) and isinstance(synced, type(own))
    assert synced.state_dict().keys() == own.state_dict().keys()
    shape = {"bn1d": (6, 3), "bn2d-act (timm)": (4, 3, 5, 5)}.get(name, (4, 3, 4, 4, 4))
    gen = torch.Generator().manual_seed(0)
    for step in range(3):  # the running statistics move over several batches
        x = torch.randn(*shape, generator=gen) * 2 + step
        coef = torch.randn(*shape, generator=gen)
        outs = []
        for layer in (own, synced):
            layer.train()
            xi = x.clone().requires_grad_(True)
            y = layer(xi)
            (y * coef).sum().backward()
            outs.append((y.detach(), xi.grad))
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
    for key, value in own.state_dict().items():
        torch.testing.assert_close(synced.state_dict()[key], value, rtol=1e-5, atol=1e-6)
    for p_own, p_synced in zip(own.parameters(), synced.parameters(), strict=True):
        torch.testing.assert_close(p_synced.grad, p_own.grad, rtol=1e-4, atol=1e-5)
    x = torch.randn(*shape, generator=gen)  # evaluation: the layer's own forward
    torch.testing.assert_close(synced.eval()(x), own.eval()(x))
    assert type(pickle.loads(pickle.dumps(synced))) is type(synced)


def test_other_batch_norm_subclasses_are_left_alone_with_a_warning():
    class Odd(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(nn.BatchNorm2d(2), Odd(2), nn.SyncBatchNorm(2))
    with pytest.warns(UserWarning, match="Odd: batch norm with its own forward"):
        assert synchronise(model) == 1
    assert [type(m).__name__ for m in model] == ["SyncedBatchNorm2d", "Odd", "SyncBatchNorm"]
