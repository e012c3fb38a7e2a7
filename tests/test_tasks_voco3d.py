"""voco3d: base crops tile the volume, random crops are where their corners say, the overlap
targets equal the crops' true overlaps (counted voxel by voxel), the loss forms and the
regulariser are the stated formulas, and a tiny model learns."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from task_e2e import train_losses
from torch import nn
from torch.nn import functional as F

from medssl_bench.errors import ConfigError
from medssl_bench_backbones.unet3d import UNet3D
from medssl_bench_tasks.voco import VoCo3D

torch.set_num_threads(1)

NO_AUG = dict(flip_p=0.0, rotate_p=0.0, shift_p=0.0)


def _label_volume(shape, grid, batch: int = 1, channels: int = 1) -> torch.Tensor:
    """Each voxel holds the row-major index of the base crop containing it (-1 outside the
    grid), written with plain Python slicing; volume b adds 100 * b."""
    crop = [s // g for s, g in zip(shape, grid, strict=True)]
    labels = torch.full((batch, channels, *shape), -1.0)
    k = 0
    for i in range(grid[0]):
        for j in range(grid[1]):
            for m in range(grid[2]):
                labels[:, :, i * crop[0]:(i + 1) * crop[0], j * crop[1]:(j + 1) * crop[1],
                       m * crop[2]:(m + 1) * crop[2]] = k
                k += 1
    return labels + 100 * torch.arange(batch, dtype=torch.float32).view(-1, 1, 1, 1, 1)


@pytest.mark.parametrize("shape,grid", [((16, 16, 8), (4, 4, 1)), ((13, 12, 10), (2, 3, 2)),
                                        ((12, 12, 12), (3, 1, 1))])
def test_base_crops_tile_the_volume_and_overlaps_are_the_true_overlaps(shape, grid):
    b, r = 3, 5
    task = VoCo3D(VoCo3D.Config(base_grid=list(grid), random_crops=r, **NO_AUG))
    images = _label_volume(shape, grid, batch=b, channels=2)
    batch = task.make_batch(images, torch.Generator().manual_seed(0))
    k = grid[0] * grid[1] * grid[2]
    crop = [s // g for s, g in zip(shape, grid, strict=True)]
    crops, overlap, starts = batch["crops"], batch["overlap"], batch["starts"]
    assert crops.shape == (b * (k + r), 2, *crop) and overlap.shape == (b, r, k)
    # base crop k of volume v holds only label k of volume v
    base = crops[:b * k].view(b, k, -1)
    expected = torch.arange(k).view(1, k, 1) + 100 * torch.arange(b).view(b, 1, 1)
    assert torch.equal(base, expected.float().expand_as(base))
    # random crops: the box at its corner, and its overlaps counted label by label
    random = crops[b * k:].view(b, r, 2, *crop)
    for v in range(b):
        for i in range(r):
            z, y, x = starts[v, i].tolist()
            box = images[v, :, z:z + crop[0], y:y + crop[1], x:x + crop[2]]
            assert box.shape[1:] == tuple(crop), "the random crop leaves the grid"
            assert torch.equal(random[v, i], box)
            labels = box[0].flatten() - 100 * v
            assert (labels >= 0).all(), "a random crop reaches beyond the base-crop grid"
            counts = torch.bincount(labels.long(), minlength=k).float() / labels.numel()
            torch.testing.assert_close(overlap[v, i], counts)
    torch.testing.assert_close(overlap.sum(-1), torch.ones(b, r))


def test_random_crops_reach_every_position_of_the_grid():
    task = VoCo3D(VoCo3D.Config(base_grid=[2, 2, 1], random_crops=200, **NO_AUG))
    starts = task.make_batch(torch.rand(2, 1, 8, 8, 6), torch.Generator().manual_seed(0))[
        "starts"]
    # crops of 4 x 4 x 6 inside an 8 x 8 x 6 grid: corners 0..4, 0..4, 0
    assert starts[..., 0].min() == 0 and starts[..., 0].max() == 4
    assert starts[..., 1].min() == 0 and starts[..., 1].max() == 4
    assert (starts[..., 2] == 0).all()
    assert starts.unique(dim=0).shape[0] > 1


def test_augmentations_are_flips_turns_and_shifts_of_each_crop():
    task = VoCo3D(VoCo3D.Config(base_grid=[2, 2, 1], flip_p=0.5, rotate_p=0.5, shift_p=0.5))
    images = torch.rand(2, 1, 8, 8, 4, generator=torch.Generator().manual_seed(0))
    plain = VoCo3D(VoCo3D.Config(base_grid=[2, 2, 1], **NO_AUG)).make_batch(
        images, torch.Generator().manual_seed(0))["crops"]
    crops = task.make_batch(images, torch.Generator().manual_seed(0))["crops"]
    changed = 0
    for a, p in zip(crops, plain, strict=True):
        candidates = []
        for flips in range(8):
            dims = [2 + d for d in range(3) if flips >> d & 1]
            y = p.unsqueeze(0).flip(dims) if dims else p.unsqueeze(0)
            candidates += [torch.rot90(y, k, (2, 3)) for k in range(4)]
        # same crop up to a flip/turn and a constant shift of at most 0.1
        assert any(((a - c[0]) - (a - c[0]).mean()).abs().max() < 1e-5
                   and (a - c[0]).mean().abs() <= 0.1 + 1e-6 for c in candidates)
        changed += not torch.equal(a, p)
    assert changed


class _Stub(nn.Module):
    """Features whose global pooling is the first four voxels of each crop."""

    embed_dim = 4
    feature_channels = [4]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x.flatten(1)[:, :4, None].float() - 0.5]


class _Backbone:
    def size_multiple(self) -> int:
        return 1

    def min_input_size(self) -> int:
        return 1


def _setup(**config):
    task = VoCo3D(VoCo3D.Config(base_grid=[2, 2, 1], random_crops=3, projector_hidden=8,
                                projector_dim=6, projector_norm="none", **config))
    torch.manual_seed(0)
    heads = task.build_heads(_Backbone(), _Stub())
    images = torch.rand(2, 1, 8, 8, 4, generator=torch.Generator().manual_seed(1))
    batch = task.make_batch(images, torch.Generator().manual_seed(0))
    z = heads["projector"](batch["crops"].flatten(1)[:, :4] - 0.5)
    base, random = z[:8].view(2, 4, -1), z[8:].view(2, 3, -1)
    cos = F.cosine_similarity(random[:, :, None], base[:, None], dim=-1)  # (2, 3, 4)
    return task, heads, batch, base, cos


def _pairs(base: torch.Tensor) -> torch.Tensor:
    k = base.shape[1]
    return torch.stack([F.cosine_similarity(base[:, i], base[:, j], dim=-1)
                        for i in range(k) for j in range(i + 1, k)], 1)


def test_paper_loss_and_regulariser():
    task, heads, batch, base, cos = _setup()
    loss, logs = task.compute_loss(_Stub(), heads, batch)
    y = batch["overlap"]
    pred = -torch.log(1 - (y - F.relu(cos)).abs() + 1e-6).mean()
    reg = _pairs(base).abs().mean()
    # (a cosine a rounding step above 1 with no overlap sits at -log(eps): loose tolerance)
    torch.testing.assert_close(loss, pred + reg, atol=1e-3, rtol=1e-3)
    assert logs["pred"] == pytest.approx(pred.item(), rel=1e-3)
    expected_acc = (F.relu(cos).argmax(-1) == y.argmax(-1)).float().mean().item()
    assert logs["acc"] == pytest.approx(expected_acc)


@pytest.mark.parametrize("mode", ["split", "split_weighted"])
def test_code_loss_forms(mode):
    task, heads, batch, base, cos = _setup(prediction_loss=mode, regulariser="relu_squared",
                                           reg_weight=0.5)
    loss, _ = task.compute_loss(_Stub(), heads, batch)
    y, logits = batch["overlap"], F.relu(cos)
    positive = y > 0
    log_term = -torch.log(1 - (y - logits).abs() + 1e-6)
    if mode == "split":
        pos = log_term[positive].mean()
    else:
        pos = (log_term * y).sum() / y.sum()
    neg = logits[~positive].pow(2).mean()
    reg = F.relu(_pairs(base)).pow(2).mean()
    torch.testing.assert_close(loss, pos + neg + 0.5 * reg, atol=1e-3, rtol=1e-3)


def test_base_features_learn_only_from_the_regulariser_when_detached():
    task, heads, batch, _, _ = _setup(reg_weight=0.0)
    crops = batch["crops"].clone().requires_grad_(True)
    loss, _ = task.compute_loss(_Stub(), heads, batch | {"crops": crops})
    loss.backward()
    assert crops.grad[:8].abs().sum() == 0 and crops.grad[8:].abs().sum() > 0
    task, heads, batch, _, _ = _setup(reg_weight=0.0, detach_bases=False)
    crops = batch["crops"].clone().requires_grad_(True)
    task.compute_loss(_Stub(), heads, batch | {"crops": crops})[0].backward()
    assert crops.grad[:8].abs().sum() > 0


def test_targets_match_the_loss_minimum():
    """A prediction equal to the target scores zero prediction loss in the paper form; the
    target order matters (permuting the base crops raises it)."""
    task = VoCo3D()
    y = torch.tensor([[[0.25, 0.75, 0.0, 0.0]]])
    assert task.prediction_loss(y, y).item() == pytest.approx(0.0, abs=1e-5)
    assert task.prediction_loss(y[..., [1, 0, 2, 3]], y).item() > 0.1


def test_grid_validation_and_input_check():
    with pytest.raises(ValidationError):
        VoCo3D.Config(base_grid=[4, 4])
    with pytest.raises(ValidationError):
        VoCo3D.Config(base_grid=[1, 1, 1])
    with pytest.raises(ConfigError, match="base_grid"):
        VoCo3D().check_input((16, 3, 16), 1)


def test_crops_are_padded_for_the_backbone_and_can_be_resized():
    """The quick preset on the 5-level U-Net: 16 x 16 x 32 crops of a 32^3 volume pass as
    they are; 8 x 8 x 32 crops (the paper grid) are zero-padded to the size multiple."""
    backbone = UNet3D(UNet3D.Config(filters=[4, 8, 16, 32, 64]))
    encoder = backbone.build_encoder(1)
    images = torch.rand(2, 1, 32, 32, 32)
    for config in (VoCo3D.presets["quick"], {"projector_hidden": 16, "projector_dim": 8},
                   {"projector_hidden": 16, "projector_dim": 8, "crop_resize": 16}):
        task = VoCo3D(VoCo3D.Config(**config))
        heads = task.build_heads(backbone, encoder)
        batch = task.make_batch(images, torch.Generator().manual_seed(0))
        loss, _ = task.compute_loss(encoder, heads, batch)
        assert torch.isfinite(loss)
    assert batch["crops"].shape[2:] == (16, 16, 16)
    padded = heads["pad"](torch.zeros(1, 1, 8, 8, 32)).shape[2:]
    assert padded[0] == padded[1] and padded[2] == max(32, padded[0])
    assert all(s % backbone.size_multiple() == 0 and s >= backbone.min_input_size()
               for s in padded)


def test_all_scale_features_and_fp32_under_autocast():
    backbone = UNet3D(UNet3D.Config(filters=[4, 8]))
    encoder = backbone.build_encoder(1)
    task = VoCo3D(VoCo3D.Config(features="all_scales", projector_hidden=16, projector_dim=8,
                                projector_norm="layer"))
    heads = task.build_heads(backbone, encoder)
    assert heads["projector"].net[0].in_features == 12
    batch = task.make_batch(torch.rand(2, 1, 16, 16, 8), torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = task.compute_loss(encoder, heads, batch)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_teacher_is_an_ema_of_the_student_and_averages_both_predictions():
    backbone = UNet3D(UNet3D.Config(filters=[4, 8]))
    encoder = backbone.build_encoder(1)
    task = VoCo3D(VoCo3D.Config(base_grid=[2, 2, 1], projector_hidden=16, projector_dim=8,
                                teacher_momentum=0.9))
    heads = task.build_heads(backbone, encoder)
    assert not any(p.requires_grad for p in heads["teacher_encoder"].parameters())
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(1.0)
    before = [p.clone() for p in heads["teacher_encoder"].parameters()]
    batch = task.make_batch(torch.rand(2, 1, 16, 16, 8), torch.Generator().manual_seed(0))
    loss, _ = task.compute_loss(encoder, heads, batch)
    for old, new, student in zip(before, heads["teacher_encoder"].parameters(),
                                 encoder.parameters(), strict=True):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * student.detach())
    loss.backward()
    assert all(p.grad is None for p in heads["teacher_encoder"].parameters())
    assert any(p.grad is not None for p in encoder.parameters())
    # the prediction averages student-random/teacher-base and teacher-random/student-base
    with torch.no_grad():
        z = task.embed(encoder, heads, batch["crops"])
        zt = task.embed(heads["teacher_encoder"], heads, batch["crops"], "teacher_projector")
    k, r = 4, task.config.random_crops
    expected = 0.5 * (task.prediction(z[8:].view(2, r, -1), zt[:8].view(2, k, -1))
                      + task.prediction(zt[8:].view(2, r, -1), z[:8].view(2, k, -1)))
    reg = task.regularisation(z[:8].view(2, k, -1))
    torch.testing.assert_close(loss.detach(), task.prediction_loss(expected, batch["overlap"])
                               + reg, atol=1e-4, rtol=1e-4)


def test_tiny_model_learns():
    torch.manual_seed(0)
    backbone = UNet3D(UNet3D.Config(filters=[8, 16, 32]))
    encoder = backbone.build_encoder(1)
    # without the crop augmentations, so 25 steps suffice (flip- and turn-invariant features
    # take a tiny model on two volumes far longer)
    task = VoCo3D(VoCo3D.Config(base_grid=[2, 2, 1], random_crops=4, projector_hidden=64,
                                projector_dim=32, **NO_AUG))
    heads = task.build_heads(backbone, encoder)
    coarse = torch.rand(2, 1, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    images = F.interpolate(coarse, size=(16, 16, 16), mode="trilinear")
    generator = torch.Generator().manual_seed(0)
    losses = train_losses(task, encoder, heads, lambda: task.make_batch(images, generator), 25,
                          1e-3)
    start, end = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert end < 0.8 * start, (start, end)
