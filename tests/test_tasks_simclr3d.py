"""simclr3d: the two views of a pair come from one volume and the negatives from the others,
the loss is NT-Xent over the whole batch (gathered across DDP ranks when a process group
exists), the augmentations do what they say, and a tiny model learns."""

from __future__ import annotations

import torch
from task_e2e import train_losses
from torch import nn
from torch.nn import functional as F

from medssl_bench_backbones.unet3d import UNet3D
from medssl_bench_tasks.simclr import SimCLR3D, gaussian_blur, nt_xent

torch.set_num_threads(1)

PLAIN = dict(crop_scale_min=1.0, crop_ratio_min=1.0, crop_ratio_max=1.0, flip_p=0.0,
             color_p=0.0, blur_p=0.0)


def _images(batch: int, channels: int = 1, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, channels, size, size, size,
                      generator=torch.Generator().manual_seed(seed))


class _Stub(nn.Module):
    """Features whose global pooling is the first four voxels of each image."""

    embed_dim = 4
    feature_channels = [4]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x.flatten(1)[:, :4, None].float()]


def test_without_augmentation_both_views_are_the_volume_and_pair_up():
    task = SimCLR3D(SimCLR3D.Config(**PLAIN))
    images = _images(3, 2)
    batch = task.make_batch(images, torch.Generator().manual_seed(0))
    torch.testing.assert_close(batch["views"], torch.cat([images, images]))
    source, positive = batch["source"], batch["positive"]
    assert source.tolist() == [0, 1, 2, 0, 1, 2]
    assert positive.tolist() == [3, 4, 5, 0, 1, 2]
    # every positive is the other view of the same volume; every other view is a negative,
    # and those of the other volumes come from other volumes
    rows = torch.arange(6)
    assert (positive != rows).all() and torch.equal(source[positive], source)
    for i in range(6):
        negatives = [j for j in range(6) if j not in (i, positive[i].item())]
        assert all(source[j] != source[i] for j in negatives)


def test_random_views_keep_their_own_volume():
    """Constant volumes (value = index + 1): a crop of volume i, flipped, however stretched,
    holds only volume i's value, so each view is traceable to its source."""
    task = SimCLR3D(SimCLR3D.Config(color_p=0.0, blur_p=0.0, crop_scale_min=0.2))
    n = 4
    images = (torch.arange(n, dtype=torch.float32) + 1).view(n, 1, 1, 1, 1).expand(
        n, 2, 12, 12, 12).contiguous()
    batch = task.make_batch(images, torch.Generator().manual_seed(1))
    views = batch["views"]
    expected = (batch["source"].float() + 1).view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(views, expected.expand_as(views), atol=1e-5, rtol=0)
    # the views differ from their volume's plain copy only by geometry: two draws differ
    smooth = F.interpolate(_images(n, 1, 4), size=(12, 12, 12), mode="trilinear")
    pair = task.make_batch(smooth, torch.Generator().manual_seed(1))["views"]
    assert not torch.allclose(pair[:n], pair[n:])


def test_flips_and_crop_geometry():
    images = _images(2, 1, 10)
    flipped = SimCLR3D(SimCLR3D.Config(**(PLAIN | {"flip_p": 1.0}))).make_batch(
        images, torch.Generator().manual_seed(0))["views"]
    torch.testing.assert_close(flipped, torch.cat([images, images]).flip(2, 3, 4))
    # a crop keeps a share of the volume within [scale_min, scale_max] (up to clipping)
    from medssl_bench_tasks.simclr import resized_crop_maps

    maps = resized_crop_maps(500, (32, 32, 32), (0.08, 1.0), (0.75, 4 / 3), 0.0,
                             torch.Generator().manual_seed(0), "cpu")
    side = torch.diagonal(maps[:, :3, :3], dim1=1, dim2=2)
    share = side.prod(1)
    assert (share <= 1.0 + 1e-6).all() and (share >= 0.08 * 0.75 - 1e-6).all()
    assert share.min() < 0.2 and share.max() > 0.8
    # every crop lies inside the volume
    half = 15.5
    assert ((maps[:, :3, 3].abs() + side.abs() * half) <= half + 1e-4).all()


def test_intensity_change_is_brightness_and_contrast():
    task = SimCLR3D(SimCLR3D.Config(**(PLAIN | {"color_p": 1.0})))
    images = _images(4, 1, 8)
    views = task.make_batch(images, torch.Generator().manual_seed(0))["views"]
    source = torch.cat([images, images])
    # an affine intensity map per view: view = a * x + c exactly
    for v, x in zip(views, source, strict=True):
        a = ((v - v.mean()) * (x - x.mean())).sum() / ((x - x.mean()) ** 2).sum()
        torch.testing.assert_close(v, a * x + (v.mean() - a * x.mean()), atol=1e-5, rtol=0)
        assert 0.2 - 1e-5 <= a <= 1.8**2 + 1e-5
    assert not torch.allclose(views, source)


def test_blur_matches_a_direct_gaussian_and_skips_unselected_samples():
    x = _images(2, 1, 9)
    sigma = torch.tensor([1.0, 1.5])
    out = gaussian_blur(x, sigma, torch.tensor([True, False]), kernel=5)
    torch.testing.assert_close(out[1], x[1])
    taps = torch.arange(-2, 3, dtype=torch.float32)
    w = torch.exp(-0.5 * taps**2)
    w = w / w.sum()
    kernel = w.view(5, 1, 1) * w.view(1, 5, 1) * w.view(1, 1, 5)
    direct = F.conv3d(x[:1], kernel.view(1, 1, 5, 5, 5), padding=2)
    torch.testing.assert_close(out[:1], direct, atol=1e-5, rtol=0)


def _manual_nt_xent(z: torch.Tensor, positive: torch.Tensor, tau: float) -> torch.Tensor:
    z = F.normalize(z, dim=1)
    total = 0.0
    for i in range(z.shape[0]):
        sims = torch.stack([z[i] @ z[k] / tau for k in range(z.shape[0]) if k != i])
        others = [k for k in range(z.shape[0]) if k != i]
        pos = z[i] @ z[positive[i]] / tau
        total = total - (pos - torch.logsumexp(sims, 0))
        assert positive[i].item() in others
    return total / z.shape[0]


def test_loss_is_nt_xent_over_the_whole_batch():
    encoder = _Stub()
    task = SimCLR3D(SimCLR3D.Config(temperature=0.3, projection_dim=5))
    torch.manual_seed(0)
    heads = task.build_heads(None, encoder)
    batch = task.make_batch(_images(3, 1, 8), torch.Generator().manual_seed(0))
    loss, logs = task.compute_loss(encoder, heads, batch)
    z = heads["projection"](batch["views"].flatten(1)[:, :4])
    torch.testing.assert_close(loss, _manual_nt_xent(z, batch["positive"], 0.3))
    assert 0.0 <= logs["acc"] <= 1.0
    # the pairing matters: swapping the positive index changes the loss
    wrong = batch | {"positive": batch["positive"].roll(1)}
    assert not torch.isclose(task.compute_loss(encoder, heads, wrong)[0], loss)


def test_gather_negatives_is_a_no_op_without_a_process_group():
    z = torch.randn(6, 5)
    positive = torch.tensor([3, 4, 5, 0, 1, 2])
    a, _ = nt_xent(z, positive, 0.1, gather=True)
    b, _ = nt_xent(z, positive, 0.1, gather=False)
    torch.testing.assert_close(a, b)


def test_gathered_negatives_come_from_every_rank(monkeypatch):
    """A two-rank world simulated on one process: rank 1's views join rank 0's softmax as
    negatives. (The gradient across ranks needs a real process group:
    tests/test_distributed.py compares it with one process's.)"""
    import torch.distributed as dist

    from medssl_bench import distributed

    remote = torch.randn(4, 5)
    mp = monkeypatch
    mp.setattr(dist, "is_available", lambda: True)
    mp.setattr(dist, "is_initialized", lambda: True)
    mp.setattr(dist, "get_world_size", lambda group=None: 2)
    mp.setattr(dist, "get_rank", lambda group=None: 0)
    mp.setattr(distributed, "gather_rows", lambda t: torch.cat([t, F.normalize(remote, dim=1)]))
    z = torch.randn(4, 5, requires_grad=True)
    positive = torch.tensor([2, 3, 0, 1])
    loss, _ = nt_xent(z, positive, 0.5, gather=True)
    local = F.normalize(z, dim=1)
    keys = torch.cat([local, F.normalize(remote, dim=1)])
    logits = local @ keys.T / 0.5
    logits[torch.arange(4), torch.arange(4)] = float("-inf")
    torch.testing.assert_close(loss, F.cross_entropy(logits, positive))
    alone, _ = nt_xent(z, positive, 0.5, gather=False)
    assert loss > alone  # more negatives


def test_scores_stay_fp32_under_autocast():
    encoder = _Stub()
    task = SimCLR3D()
    heads = task.build_heads(None, encoder)
    batch = task.make_batch(_images(2, 1, 8), torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = task.compute_loss(encoder, heads, batch)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_tiny_model_learns():
    torch.manual_seed(0)
    backbone = UNet3D(UNet3D.Config(filters=[8, 16, 32]))
    encoder = backbone.build_encoder(1)
    # crops of at least half the volume and no blur, so 25 steps suffice (the full default
    # augmentation needs far longer on four volumes)
    task = SimCLR3D(SimCLR3D.Config(projection_dim=32, crop_scale_min=0.5, blur_p=0.0))
    heads = task.build_heads(backbone, encoder)
    coarse = torch.rand(4, 1, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    images = F.interpolate(coarse, size=(16, 16, 16), mode="trilinear")
    generator = torch.Generator().manual_seed(0)
    losses = train_losses(task, encoder, heads, lambda: task.make_batch(images, generator), 25,
                          1e-3)
    start, end = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert end < 0.8 * start, (start, end)
