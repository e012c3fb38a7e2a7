"""SparK (spark3d): masks hide exactly the stated share, masked regions stay empty through
the encoder (its features never depend on what the masked voxels held), normalisation
statistics come from visible voxels only, mask tokens fill the empty positions at every
scale, only masked patches enter the loss, the encoder transfers unchanged, a tiny model
overfits, and `bench run` works on phantom3d and MedMNIST. Tiny volumes (2-core CI)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from masked_fixtures import smooth
from torch import nn

from medssl_bench.errors import ConfigError
from medssl_bench.plugins import build_registry
from medssl_bench_tasks.masking import expand_to, masked_norm, patchify, random_patch_mask
from medssl_bench_tasks.spark import Densify, SparK3D, SparseMask, reconstruction_loss, sparsify

REGISTRY = build_registry(autoload=False)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _backbone(filters=(4, 8), norm="instance"):
    cls = REGISTRY.get("backbone", "unet3d")
    return cls(cls.Config(filters=list(filters), width=1.0, norm=norm))


@pytest.mark.parametrize("ratio", [0.6, 0.75])
@pytest.mark.parametrize("shape,patch", [((64, 64, 32), 16), ((16, 16, 16), 4)])
def test_mask_hides_the_stated_share(ratio, shape, patch):
    task = SparK3D(SparK3D.Config(mask_ratio=ratio, mask_patch_size=patch))
    mask = task.make_batch(torch.rand(4, 1, *shape, generator=_gen(1)), _gen(2))["mask"]
    total = math.prod(s // patch for s in shape)
    expected = total - round(total * (1 - ratio))  # SparK keeps round(L * (1 - ratio))
    assert mask.shape == (4, *(s // patch for s in shape))
    assert (mask.flatten(1).sum(1) == expected).all()
    share = expand_to(mask, shape).flatten(1).float().mean(1)
    torch.testing.assert_close(share, torch.full((4,), expected / total))


@pytest.mark.parametrize("norm", ["instance", "batch", "group"])
def test_masked_regions_stay_empty_through_the_encoder(norm):
    """Sparse convolution emulated densely: with the mask set, every feature is zero at the
    masked positions and the visible features do not depend on the masked voxels' content."""
    task = SparK3D(SparK3D.Config(mask_patch_size=4))
    backbone = _backbone((4, 8, 16), norm)
    encoder = backbone.build_encoder(2)
    dense = copy.deepcopy(encoder)  # the same weights, no hooks
    task.build_heads(backbone, encoder)
    images = torch.rand(2, 2, 16, 16, 16, generator=_gen(3))
    mask = task.make_batch(images, _gen(4))["mask"]
    masked = expand_to(mask, (16, 16, 16)).expand_as(images)
    other = images.clone()
    other[masked] = torch.rand(int(masked.sum()), generator=_gen(5)) * 5
    seen = []
    for module in encoder.modules():  # these run after SparK's hooks and see their result
        if isinstance(module, (nn.Conv3d, nn.MaxPool3d, nn.InstanceNorm3d, nn.BatchNorm3d,
                               nn.GroupNorm)):
            module.register_forward_hook(lambda m, args, out: seen.append(out.detach()))
    a = task.encode(encoder, images, mask)
    # every layer's output is empty at the masked positions of its resolution
    assert len(seen) > 10
    for out in seen:
        hidden = expand_to(mask, tuple(out.shape[2:])).expand_as(out)
        assert (out[hidden] == 0).all()
    b = task.encode(encoder, other, mask)
    for fa, fb in zip(a, b, strict=True):
        hidden = expand_to(mask, tuple(fa.shape[2:])).expand_as(fa)
        assert (fa[hidden] == 0).all() and hidden.any() and (~hidden).any()
        torch.testing.assert_close(fa, fb, rtol=1e-4, atol=1e-5)
    # Without the mask the dense encoder does see the masked voxels (the test means something)
    plain = dense(images)[0]
    assert not torch.allclose(plain, dense(other)[0])
    # Outside compute_loss the hooks are inert: the encoder is the plain network.
    torch.testing.assert_close(encoder(images)[-1], dense(images)[-1])


def test_masked_norm_uses_visible_statistics():
    x = torch.randn(2, 3, 8, 8, 8, generator=_gen(6)) * 3 + 1
    mask = random_patch_mask(2, (2, 2, 2), 5, _gen(7), "cpu")
    active = ~expand_to(mask, (8, 8, 8))
    norm = nn.InstanceNorm3d(3, affine=True)
    y = masked_norm(norm, x, active)
    for b in range(2):
        sel = active[b, 0]
        for c in range(3):
            values = x[b, c][sel]
            expected = (values - values.mean()) / (values.var(unbiased=False) + norm.eps).sqrt()
            torch.testing.assert_close(y[b, c][sel], expected, rtol=1e-4, atol=1e-4)
            assert (y[b, c][~sel] == 0).all()
    # BatchNorm: the running mean moves towards the visible voxels' mean (momentum 0.1)
    bn = nn.Sequential(nn.BatchNorm3d(3))
    state = SparseMask()
    sparsify(bn, state)
    state.set(mask)
    bn(x)
    state.set(None)
    visible = x.permute(1, 0, 2, 3, 4)[:, active[:, 0]]
    torch.testing.assert_close(bn[0].running_mean, 0.1 * visible.mean(1), rtol=1e-4, atol=1e-5)


def test_densify_fills_mask_tokens_at_every_scale():
    task = SparK3D(SparK3D.Config(mask_patch_size=4))
    backbone = _backbone((4, 8, 16))
    encoder = backbone.build_encoder(1)
    heads = task.build_heads(backbone, encoder)
    densify = heads["reconstruct"].densify
    assert len(densify) == 3 and all(d.token is not None for d in densify)
    assert isinstance(densify[-1].proj, nn.Identity) and densify[0].proj.kernel_size == (3, 3, 3)
    plain = Densify(4, "none", True, False)
    x = torch.rand(2, 4, 8, 8, 8, generator=_gen(8))
    active = ~expand_to(random_patch_mask(2, (2, 2, 2), 5, _gen(9), "cpu"), (8, 8, 8))
    out = plain(x, active)
    token = plain.token.detach().view(1, 4, 1, 1, 1).expand_as(x)
    act = active.expand_as(x)
    assert torch.equal(out[act], x[act]) and torch.equal(out[~act], token[~act])


def test_only_masked_patches_enter_the_loss():
    images = torch.rand(2, 2, 16, 16, 16, generator=_gen(10))
    mask = random_patch_mask(2, (4, 4, 4), 38, _gen(11), "cpu")
    prediction = torch.randn(2, 2, 16, 16, 16, generator=_gen(12))
    voxels = expand_to(mask, (16, 16, 16))[:, 0]
    for target_norm in ("patch", "none"):
        base = reconstruction_loss(prediction, images, mask, 4, target_norm)
        for voxel, changes in (((~voxels).nonzero()[0], False), (voxels.nonzero()[0], True)):
            other = prediction.clone()
            b, d, h, w = voxel.tolist()
            other[b, 0, d, h, w] += 5.0
            assert bool(reconstruction_loss(other, images, mask, 4, target_norm) != base) is changes
    # no normalisation: the plain MSE over the masked voxels (nnssl SparkLoss)
    m = expand_to(mask, (16, 16, 16)).expand_as(images)
    torch.testing.assert_close(reconstruction_loss(prediction, images, mask, 4, "none"),
                               (prediction - images)[m].square().mean(), rtol=1e-4, atol=0)
    # per-patch normalisation: a prediction equal to the normalised target scores zero
    t = patchify(images, 4)
    normed = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()
    assert normed.mean(-1).abs().max() < 1e-5
    grid = normed.view(2, 4, 4, 4, 4, 4, 4, 2).permute(0, 7, 1, 4, 2, 5, 3, 6)
    perfect = grid.reshape(2, 2, 16, 16, 16)
    assert reconstruction_loss(perfect, images, mask, 4, "patch") < 1e-8


def test_encoder_transfers_unchanged_and_unsupported_layers_are_refused():
    backbone = _backbone((4, 8))
    encoder = backbone.build_encoder(1)
    keys = set(encoder.state_dict())
    SparK3D(SparK3D.Config(mask_patch_size=4)).build_heads(backbone, encoder)
    assert set(encoder.state_dict()) == keys  # nothing replaced, nothing added

    class WithLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv3d(1, 4, 3, padding=1)
            self.norm = nn.LayerNorm(4)

    with pytest.raises(ConfigError, match="norm \\(LayerNorm\\)"):
        sparsify(WithLinear(), SparseMask())


def test_tiny_model_overfits_a_fixed_batch():
    torch.manual_seed(0)
    task = SparK3D(SparK3D.Config(mask_patch_size=4, densify_norm="instance"))
    backbone = _backbone()
    encoder = backbone.build_encoder(1)
    heads = task.build_heads(backbone, encoder)
    batch = task.make_batch(smooth(2), _gen(13))
    optimizer = torch.optim.Adam([*encoder.parameters(), *heads.parameters()], lr=1e-2)
    losses = []
    for _ in range(30):
        loss, _ = task.compute_loss(encoder, heads, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses




def test_scales_coarser_than_the_mask_grid_are_visible_where_any_patch_is():
    """nnssl masks 16^3 blocks under a stride-32 encoder: a deep cell covering several patches
    stays active (visible) when any of them is; it is empty only when all are masked."""
    mask = torch.zeros(1, 4, 4, 4, dtype=torch.bool)
    mask[0, :2, :2, :2] = True  # the first 2x2x2 block of patches wholly masked
    mask[0, 2:, 2:, 2:] = True
    mask[0, 3, 3, 3] = False  # ... this block has one visible patch
    coarse = expand_to(mask, (2, 2, 2))[0, 0]
    assert coarse[0, 0, 0] and not coarse[1, 1, 1] and coarse.sum() == 1
    fine = expand_to(mask, (8, 8, 8))[0, 0]
    assert torch.equal(fine[::2, ::2, ::2], mask[0]) and fine.sum() == 8 * mask.sum()


def test_under_ddp_each_batch_norm_gathers_once_per_step(monkeypatch):
    """With batch norm synchronised across processes (simulated: 2 ranks holding the same
    batch), each layer gathers its masked statistics once; the dense pass whose output SparK
    replaces does not gather too. Identical ranks leave the loss unchanged."""
    from medssl_bench import distributed
    from medssl_bench.sync_norm import synchronise

    task = SparK3D(SparK3D.Config(mask_patch_size=4))
    backbone = _backbone((4, 8), "batch")
    torch.manual_seed(0)
    encoder = backbone.build_encoder(1)
    heads = task.build_heads(backbone, encoder)
    batch = task.make_batch(torch.rand(2, 1, 16, 16, 16, generator=_gen(20)), _gen(21))
    alone, _ = task.compute_loss(copy.deepcopy(encoder), copy.deepcopy(heads), batch)
    layers = synchronise(encoder) + synchronise(heads)
    assert layers > 0
    gathers = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(distributed, "gather_rows",
                        lambda t: gathers.append(t.shape) or torch.cat([t, t]))
    loss, _ = task.compute_loss(encoder, heads, batch)
    # one gather per synchronised layer: the encoder's for their masked statistics, the
    # decoder's for their (dense) own; before, the encoder's dense pass gathered as well
    assert len(gathers) == layers
    torch.testing.assert_close(loss, alone)
