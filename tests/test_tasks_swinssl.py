"""Swin UNETR pretraining: rotation labels undo the turns, the two views come from one volume,
cutouts replace only their mask, the inpainting loss reads only what it says, NT-Xent is the
authors' formula, determinism, learning, and `bench run` beside scratch. Tiny volumes and
networks (2-core CI)."""

from __future__ import annotations

import math

import pytest
import torch
from task_e2e import train_losses

from medssl_bench.errors import ConfigError
from medssl_bench.plugins import build_registry
from medssl_bench_tasks.swinssl import (
    SwinSSL3D,
    cutout_boxes,
    cutout_mask,
    inpaint_loss,
    nt_xent,
    paint_boxes,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _task(**config) -> SwinSSL3D:
    return SwinSSL3D(SwinSSL3D.Config(**config))


def _unet(filters=(4, 8)):
    cls = build_registry(autoload=False).get("backbone", "unet3d")
    return cls(cls.Config(filters=list(filters)))


@pytest.mark.parametrize("axes", [(1, 2), (0, 2)])
def test_rotation_labels_undo_the_turn_and_views_share_a_volume(axes):
    task = _task(rotation_axes=axes)
    images = torch.rand(3, 2, 16, 16, 16, generator=_gen(1))
    batch = task.make_batch(images, _gen(0))
    sources, turns = batch["sources"], batch["rotations"]
    assert torch.equal(sources, torch.tensor([0, 1, 2, 0, 1, 2]))  # rows r and r + B: one volume
    assert len(turns.unique()) > 1 and turns.max() <= 3
    dims = (axes[0] + 2, axes[1] + 2)
    for r in range(6):
        undone = torch.rot90(batch["targets"][r], -int(turns[r]), (dims[0] - 1, dims[1] - 1))
        assert torch.equal(undone, images[sources[r]])


def test_cutouts_replace_exactly_their_mask_with_unit_noise():
    task = _task(drop_fraction=(0.2, 0.3))
    images = torch.rand(2, 1, 16, 16, 16, generator=_gen(2))
    batch = task.make_batch(images, _gen(3))
    wide = batch["masks"][:, None].expand_as(batch["inputs"])
    assert torch.equal(batch["inputs"][~wide], batch["targets"][~wide])
    assert (batch["inputs"][wide] != batch["targets"][wide]).float().mean() > 0.99
    assert batch["inputs"].min() >= 0 and batch["inputs"].max() <= 1
    share = batch["masks"].flatten(1).float().mean(1)
    assert (share > 0.05).all() and (share < 0.3 + 0.25 ** 3 + 1e-6).all()


def test_cutout_boxes_sum_to_the_drawn_share():
    """Boxes are added until their summed volume reaches the drawn share: with one fixed
    share and boxes of one fixed size the count, hence the union's upper bound, is exact."""
    mask = cutout_mask(64, (20, 20, 20), (0.3, 0.3), (0.25, 0.25), _gen(4), "cpu")
    box = 5 ** 3  # 25 % of 20 per axis
    boxes = math.ceil(0.3 * 20 ** 3 / box)
    per = mask.flatten(1).sum(1)
    assert (per <= boxes * box).all() and (per % 1 == 0).all()
    assert per.float().mean() > 0.6 * boxes * box  # overlaps only remove a little


def test_second_pass_takes_another_volumes_content():
    task = _task(cutout_from_other=True, drop_fraction=(0.3, 0.3))
    images = torch.stack([torch.full((1, 16, 16, 16), v) for v in (0.2, 0.4, 0.6, 0.8)])
    batch = task.make_batch(images, _gen(5))
    wide = batch["masks"][:, None].expand_as(batch["inputs"])
    assert torch.equal(batch["inputs"][~wide], batch["targets"][~wide])
    taken = 0
    for r in range(8):
        own = images[batch["sources"][r], 0, 0, 0, 0]
        inside = batch["inputs"][r][wide[r]]
        others = torch.tensor([0.2, 0.4, 0.6, 0.8])
        others = others[~torch.isclose(others, own)]
        taken += int(torch.isclose(inside[:, None], others[None]).any(1).sum())
    assert taken > 0, "no voxel came from another volume"


def test_masked_inpainting_reads_only_masked_voxels():
    task = _task()
    batch = task.make_batch(torch.rand(2, 1, 16, 16, 16, generator=_gen(6)), _gen(7))
    recon = torch.rand_like(batch["targets"])
    masks = batch["masks"]
    base = inpaint_loss(recon, batch["targets"], masks, "masked")
    b, z, y, x = (~masks).nonzero()[0].tolist()
    moved = recon.clone()
    moved[b, 0, z, y, x] += 0.5
    assert torch.equal(inpaint_loss(moved, batch["targets"], masks, "masked"), base)
    assert not torch.equal(inpaint_loss(moved, batch["targets"], masks, "all"),
                           inpaint_loss(recon, batch["targets"], masks, "all"))
    b, z, y, x = masks.nonzero()[0].tolist()
    moved = recon.clone()
    moved[b, 0, z, y, x] += 0.5
    assert not torch.equal(inpaint_loss(moved, batch["targets"], masks, "masked"), base)


def test_nt_xent_is_the_authors_formula_with_positives_across_halves():
    z = torch.randn(6, 8, generator=_gen(8))
    t = 0.5
    n = torch.nn.functional.normalize(z, dim=1)
    sim = n @ n.t()
    total = 0.0
    for i in range(6):
        j = (i + 3) % 6
        denom = sum(math.exp(sim[i, k] / t) for k in range(6) if k != i)
        total += -math.log(math.exp(sim[i, j] / t) / denom)
    assert nt_xent(z, t).item() == pytest.approx(total / 6, rel=1e-5)
    aligned = torch.cat([z[:3], z[:3]])
    assert nt_xent(aligned, t) < nt_xent(torch.cat([z[:3], z[[1, 2, 0]]]), t)


def test_same_seed_same_batch():
    task = _task(cutout_from_other=True)
    images = torch.rand(2, 1, 16, 16, 16, generator=_gen(0))
    a, b = task.make_batch(images, _gen(11)), task.make_batch(images, _gen(11))
    c = task.make_batch(images, _gen(12))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["inputs"], c["inputs"])


def test_non_square_rotation_plane_is_refused():
    with pytest.raises(ConfigError, match="rotation_axes"):
        _task().check_input((16, 16, 24), 1)
    _task(rotation_axes=(0, 1)).check_input((16, 16, 24), 1)


def test_only_the_encoder_transfers():
    backbone = _unet()
    encoder = backbone.build_encoder(2)
    heads = _task().build_heads(backbone, encoder)
    assert SwinSSL3D.transfers == ("encoder",) and "decoder" not in heads
    out = heads["reconstruction"](encoder(torch.rand(1, 2, 16, 16, 16)))
    assert out.shape == (1, 2, 16, 16, 16)


def test_tiny_model_overfits_a_fixed_batch():
    torch.manual_seed(0)
    backbone = _unet()
    encoder = backbone.build_encoder(1)
    task = _task(projection_dim=16)
    heads = task.build_heads(backbone, encoder)
    coarse = torch.rand(2, 1, 4, 4, 4, generator=_gen(1))
    images = torch.nn.functional.interpolate(coarse, size=(16, 16, 16), mode="trilinear")
    batch = task.make_batch(images, _gen(2))
    losses = train_losses(task, encoder, heads, lambda: batch, 20, 1e-2)
    _, logs = task.compute_loss(encoder, heads, batch)
    assert {"inpaint", "rotation", "contrast", "acc"} <= set(logs)
    assert losses[-1] < 0.7 * losses[0], losses



def test_boxes_reach_the_drawn_share_and_paint_as_their_union():
    spatial = (12, 16, 20)
    starts, ends, active = cutout_boxes(8, spatial, (0.1, 0.3), (0.05, 0.25), _gen(9), "cpu")
    sides = [(e - s) for s, e in zip(starts, ends, strict=True)]
    volume = (sides[0] * sides[1] * sides[2] * active).sum(1).float() / math.prod(spatial)
    last = (sides[0] * sides[1] * sides[2]).float() / math.prod(spatial)
    assert (volume >= 0.1).all() and (volume < 0.3 + last.max()).all()
    for axis, dim in enumerate(spatial):
        assert (starts[axis] >= 0).all() and (ends[axis] <= dim).all()
        assert (sides[axis] >= 1).all() and (sides[axis] <= max(1, int(0.25 * dim))).all()
    # Boxes are placed in order: once one is skipped, no later one is placed.
    assert (active.long().diff(dim=1) <= 0).all()
    painted = paint_boxes(starts, ends, active, spatial)
    naive = torch.zeros(8, *spatial, dtype=torch.bool)
    for b in range(8):
        for j in active[b].nonzero().flatten().tolist():
            naive[b, starts[0][b, j]:ends[0][b, j], starts[1][b, j]:ends[1][b, j],
                  starts[2][b, j]:ends[2][b, j]] = True
    assert torch.equal(painted, naive)
