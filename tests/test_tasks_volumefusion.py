"""Volume Fusion (MIS-FM): the fused volume matches its labels, the region schemes keep their
stated shapes and shares, determinism, learning, what transfers, and `bench run` beside
scratch. Tiny volumes and networks (2-core CI)."""

from __future__ import annotations

import pytest
import torch
from task_e2e import train_losses

from medssl_bench.plugins import build_registry
from medssl_bench_tasks import volumefusion
from medssl_bench_tasks.volumefusion import VolumeFusion3D


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _task(**config) -> VolumeFusion3D:
    return VolumeFusion3D(VolumeFusion3D.Config(**config))


@pytest.mark.parametrize("scheme", ["paper", "code"])
@pytest.mark.parametrize("pairing", ["next", "halves"])
def test_fusion_labels_match_the_fused_volume(scheme, pairing):
    task = _task(region_scheme=scheme, pairing=pairing, block_size=(4, 8))
    images = torch.rand(4, 2, 16, 16, 16, generator=_gen(1))
    batch = task.make_batch(images, _gen(0))
    fg, bg = batch["foreground"], batch["background"]
    if pairing == "next":
        assert torch.equal(fg, torch.tensor([1, 2, 3, 0])) and torch.equal(bg, torch.arange(4))
    else:
        assert torch.equal(fg, torch.tensor([0, 1])) and torch.equal(bg, torch.tensor([2, 3]))
    labels, inputs = batch["labels"], batch["inputs"]
    assert labels.shape == (len(fg), 16, 16, 16) and labels.dtype == torch.long
    assert labels.min() >= 0 and labels.max() <= 4 and len(labels.unique()) >= 3
    # Recover each voxel's coefficient from the fused value alone, per channel, and compare.
    diff = images[fg] - images[bg]
    usable = diff.abs() > 0.05
    recovered = ((inputs - images[bg]) / diff * 4).round()
    expected = labels[:, None].expand_as(inputs).float()
    assert torch.equal(recovered[usable], expected[usable])
    # Both channels share one coefficient map.
    a = labels[:, None].float() / 4
    assert torch.allclose(inputs, a * images[fg] + (1 - a) * images[bg], atol=1e-6)


def test_a_lone_volume_is_fused_with_its_mirror_image():
    task = _task()
    image = torch.rand(1, 1, 16, 16, 16, generator=_gen(14))
    batch = task.make_batch(image, _gen(15))
    a = batch["labels"][:, None].float() / 4
    mirror = image.flip((2, 3, 4))
    assert torch.allclose(batch["inputs"], a * mirror + (1 - a) * image, atol=1e-6)
    assert (batch["labels"] > 0).any()


def test_paper_scheme_one_box_has_the_stated_size():
    task = _task(num_regions=(1, 1), num_classes=2)
    spatial = (16, 32, 32)
    labels = task.make_batch(torch.rand(64, 1, *spatial, generator=_gen(2)), _gen(3))["labels"]
    boxes = 0
    for volume in labels:
        where = volume.nonzero()
        if where.numel() == 0:  # a box of class 0 leaves no trace
            continue
        boxes += 1
        lo, hi = where.min(0).values, where.max(0).values
        sides = (hi - lo + 1).tolist()
        assert volume[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1].all()  # one solid box
        assert int(volume.sum()) == sides[0] * sides[1] * sides[2]
        assert 2 <= sides[0] <= 10 and 2 <= sides[1] <= 20 and 2 <= sides[2] <= 20
    assert 16 < boxes < 48  # class 1 of {0, 1} about half the time


def test_paper_scheme_draws_all_coefficients_and_overwrites():
    task = _task()
    labels = task.make_batch(torch.rand(8, 1, 32, 32, 32, generator=_gen(4)), _gen(5))["labels"]
    counts = torch.bincount(labels.flatten(), minlength=5)
    assert (counts > 0).all()  # 0, .25, .5, .75 and 1 all occur


@pytest.mark.parametrize("spatial", [(16, 16, 16), (12, 20, 28)])
def test_paper_scheme_bit_sets_equal_painting_box_after_box(spatial, monkeypatch):
    """The one-bit-per-box shortcut gives what painting the boxes in order, later on top,
    gives."""
    cfg = VolumeFusion3D.Config()
    fast = volumefusion.paper_regions(6, spatial, cfg, _gen(13), "cpu")
    monkeypatch.setattr(volumefusion, "BITMASK_BOXES", 0)
    painted = volumefusion.paper_regions(6, spatial, cfg, _gen(13), "cpu")
    assert torch.equal(fast, painted) and len(fast.unique()) == 5


def test_code_scheme_fuses_exactly_the_ratio_of_blocks():
    task = _task(region_scheme="code", block_size=(8, 8), foreground_ratio=0.7)
    labels = task.make_batch(torch.rand(6, 1, 32, 32, 32, generator=_gen(6)), _gen(7))["labels"]
    blocks = labels.view(6, 4, 8, 4, 8, 4, 8).permute(0, 1, 3, 5, 2, 4, 6).reshape(6, 64, 512)
    assert (blocks == blocks[..., :1]).all(), "each block carries one class"
    fused = (blocks[..., 0] > 0).sum(1)
    assert (fused == int(64 * 0.7)).all()
    assert blocks[..., 0][blocks[..., 0] > 0].unique().tolist() == [1, 2, 3, 4]


def test_code_scheme_offsets_leave_a_background_margin():
    task = _task(region_scheme="code", block_size=(5, 7))
    labels = task.make_batch(torch.rand(16, 1, 16, 16, 16, generator=_gen(8)), _gen(9))["labels"]
    fused = (labels > 0).flatten(1).sum(1).float() / 16 ** 3
    assert (fused > 0.05).all() and (fused < 0.71).all()


def test_same_seed_same_batch():
    task = _task()
    images = torch.rand(2, 1, 16, 16, 16, generator=_gen(0))
    a, b = task.make_batch(images, _gen(11)), task.make_batch(images, _gen(11))
    c = task.make_batch(images, _gen(12))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["labels"], c["labels"])


def test_decoder_transfers_and_predicts_every_class():
    registry = build_registry(autoload=False)
    cls = registry.get("backbone", "unet3d")
    backbone = cls(cls.Config(filters=[4, 8]))
    encoder = backbone.build_encoder(1)
    task = _task()
    heads = task.build_heads(backbone, encoder)
    assert VolumeFusion3D.transfers == ("encoder", "decoder") and "decoder" in heads
    out = heads["decoder"](encoder(torch.rand(1, 1, 16, 16, 16)))
    assert out.shape == (1, 5, 16, 16, 16)


def test_tiny_model_overfits_a_fixed_batch():
    torch.manual_seed(0)
    registry = build_registry(autoload=False)
    cls = registry.get("backbone", "unet3d")
    backbone = cls(cls.Config(filters=[4, 8]))
    encoder = backbone.build_encoder(1)
    task = _task(num_regions=(2, 4), region_min_fraction=(0.25, 0.25, 0.25))
    heads = task.build_heads(backbone, encoder)
    coarse = torch.rand(2, 1, 4, 4, 4, generator=_gen(1))
    images = torch.nn.functional.interpolate(coarse, size=(16, 16, 16), mode="trilinear")
    batch = task.make_batch(images, _gen(2))
    losses = train_losses(task, encoder, heads, lambda: batch, 20, 1e-2)
    assert losses[-1] < 0.7 * losses[0], losses
