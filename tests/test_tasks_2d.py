"""rpl2d, jigsaw2d, cpc2d and exemplar2d: the 3D label-correctness tests in 2D (labels
recomputed from the images), the same seed giving the same batch, and 1- and 3-channel
inputs through the timm2d quick backbone."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from medssl_bench_backbones.timm2d import Timm2D
from medssl_bench_tasks.cpc import grid_geometry, pyramid_context
from medssl_bench_tasks.cpc2d import CPC2D
from medssl_bench_tasks.exemplar2d import Exemplar2D
from medssl_bench_tasks.jigsaw import hamming_stats, permutation_set, random_permutations, unshuffle
from medssl_bench_tasks.jigsaw2d import Jigsaw2D
from medssl_bench_tasks.patches import PatchGrid, extract_patches
from medssl_bench_tasks.rpl import query_cells
from medssl_bench_tasks.rpl2d import RelativePatchLocation2D


@pytest.fixture(autouse=True)
def _setup(tmp_path, monkeypatch):
    """One thread (tiny tensors, shared CPU) and a private permutation cache."""
    monkeypatch.setenv("BENCH_CACHE_DIR", str(tmp_path / "cache"))
    permutation_set.cache_clear()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    permutation_set.cache_clear()


def _images(size: int, batch: int = 3, channels: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


def _crop(image: torch.Tensor, start, patch) -> torch.Tensor:
    return image[(slice(None), *(slice(int(s), int(s) + p) for s, p in zip(start, patch, strict=True)))]


def _small_jigsaw() -> Jigsaw2D:
    return Jigsaw2D(Jigsaw2D.Config(num_permutations=12, candidates=500))


# --------------------------------------------------------------------------- rpl2d


def test_rpl2d_query_is_the_patch_at_the_labelled_position():
    task = RelativePatchLocation2D(RelativePatchLocation2D.Config(queries_per_volume=4))
    images = _images(64, batch=4, channels=3)
    batch = task.make_batch(images, torch.Generator().manual_seed(0))
    geometry = PatchGrid.for_size((64, 64), 3, 8)
    assert geometry.patch == (13, 13) and task.num_classes == 8
    labels, starts, patches = batch["labels"], batch["starts"], batch["patches"]
    assert labels.shape == (4, 4) and labels.min() >= 0 and labels.max() < 8
    assert patches.shape == (4, 5, 3, 13, 13)
    cell, coords = torch.tensor(geometry.cell), geometry.cell_coords()
    for b in range(4):
        assert torch.equal(starts[b, 0] // cell, torch.tensor([1, 1]))  # the centre
        for q in range(4):
            assert torch.equal(starts[b, 1 + q] // cell, coords[query_cells(labels[b, q], 4)])
        for k in range(5):
            torch.testing.assert_close(patches[b, k], _crop(images[b], starts[b, k], (13, 13)))
    assert query_cells(torch.arange(8), 4).tolist() == [0, 1, 2, 3, 5, 6, 7, 8]


# --------------------------------------------------------------------------- jigsaw2d


def test_jigsaw2d_unshuffling_restores_grid_order():
    task = _small_jigsaw()
    images = _images(64, batch=4, channels=3)
    batch = task.make_batch(images, torch.Generator().manual_seed(0))
    perms = task.permutation_table()[batch["labels"]]
    assert perms.shape == (4, 9)
    patches, starts = unshuffle(batch["patches"], perms), unshuffle(batch["starts"], perms)
    geometry = PatchGrid.for_size((64, 64), 3, 8)
    assert torch.equal(starts // torch.tensor(geometry.cell),
                       geometry.cell_coords().expand(4, -1, -1))
    torch.testing.assert_close(patches, extract_patches(images, starts, geometry.patch))
    assert not torch.equal(patches, batch["patches"])


def test_jigsaw2d_default_set_is_exhaustive_and_beats_random():
    task = Jigsaw2D()
    table = task.permutation_table()
    assert table.shape == (100, 9)
    assert (np.sort(table.numpy(), axis=1) == np.arange(9)).all()
    greedy, rand = hamming_stats(table.numpy()), hamming_stats(random_permutations(100, 9, 0))
    print(f"2D Hamming distances, exhaustive greedy: {greedy}; random: {rand}")
    assert greedy["min"] >= 6 > rand["min"]


# --------------------------------------------------------------------------- cpc2d


def test_cpc2d_context_is_the_row_above_and_targets_skip_a_row():
    centres, context, targets = pyramid_context(5, 1, 2, "all", 2, 1)
    assert centres.tolist() == [[1, y] for y in range(5)]
    rows = {tuple(c.tolist()): (ctx.tolist(), tgt.tolist())
            for c, ctx, tgt in zip(centres, context, targets, strict=True)}
    assert rows[(1, 2)] == ([[0, 1], [0, 2], [0, 3], [1, 2]], [[3, 2], [4, 2]])
    assert rows[(1, 0)][0] == [[0, 1], [0, 0], [0, 1], [1, 0]]  # mirrored at the border


def test_cpc2d_batch_patches_and_indices():
    task = CPC2D()
    images = _images(96, batch=2, channels=3)
    batch = task.make_batch(images, torch.Generator().manual_seed(0))
    grid = grid_geometry((96, 96), 5, 0.5)
    p, s = grid.patch[0], grid.stride[0]
    assert (p, s) == (32, 16) and grid_geometry((224, 224), 5, 0.5).patch == (74, 74)
    assert batch["patches"].shape == (2, 5, 5, 3, p, p)
    torch.testing.assert_close(batch["patches"][1, 3, 2],
                               images[1, :, 3 * s:3 * s + p, 2 * s:2 * s + p])
    centres, context, targets = pyramid_context(5, 1, 2, "all", 2, 1)
    flat = lambda c: c[..., 0] * 5 + c[..., 1]  # noqa: E731
    assert torch.equal(batch["context_index"], torch.cat([flat(context), flat(context) + 25]))
    assert torch.equal(batch["target_index"], torch.cat([flat(targets), flat(targets) + 25]))
    negative = batch["negative_index"]
    assert not (negative == batch["target_index"].unsqueeze(-1)).any()
    binary = CPC2D(CPC2D.Config(loss="binary")).make_batch(images, torch.Generator())
    target, other = binary["target_index"], binary["negative_index"]
    assert torch.equal(other % 25 // 5, target % 25 // 5)  # same rows, another column
    assert ((other // 25 != target // 25) | (other % 5 != target % 5)).all()


def test_cpc2d_augmentation_without_crops_only_flips_along_x():
    from medssl_bench_tasks.cpc import augmented_patches

    images = _images(64, batch=2)
    grid = grid_geometry((64, 64), 4, 0.0)
    out = augmented_patches(images, grid, torch.Generator().manual_seed(0), 1.0, 1.0)
    plain = CPC2D(CPC2D.Config(patches_per_side=4, overlap=0.0, target_gap=0)).make_batch(
        images, torch.Generator())["patches"]
    same = (out == plain).flatten(3).all(-1)
    flipped = (out == plain.flip(4)).flatten(3).all(-1)
    assert (same | flipped).all() and (~same).any() and (~flipped).any()


# --------------------------------------------------------------------------- exemplar2d


def _dihedral(x: torch.Tensor):
    for k in range(4):
        for flip in (False, True):
            y = torch.rot90(x, k, dims=(-2, -1))
            yield y.flip(-1) if flip else y


def test_exemplar2d_positive_is_a_transform_of_its_anchor():
    task = Exemplar2D(Exemplar2D.Config(quarter_p=1.0, color_p=0, zoom_p=0))
    images = _images(16, batch=8, channels=3)
    batch = task.make_batch(images, torch.Generator().manual_seed(1))
    changed = 0
    for anchor, positive in zip(images, batch["positives"], strict=True):
        assert any(torch.equal(c, positive) for c in _dihedral(anchor))
        changed += not torch.equal(anchor, positive)
    assert changed
    assert (batch["negative_index"] != torch.arange(8)).all()
    plain = Exemplar2D(Exemplar2D.Config(flip_p=0, rotate_p=0, color_p=0, zoom_p=0))
    torch.testing.assert_close(plain.make_batch(images, torch.Generator())["positives"], images)


def test_exemplar2d_free_rotation_moves_channels_together():
    task = Exemplar2D(Exemplar2D.Config(quarter_p=0, rotate_p=1, flip_p=0, color_p=0, zoom_p=0))
    images = _images(16, batch=2).repeat(1, 3, 1, 1)
    positives = task.make_batch(images, torch.Generator().manual_seed(0))["positives"]
    assert not torch.allclose(positives, images)
    for c in (1, 2):
        torch.testing.assert_close(positives[:, c], positives[:, 0])


# --------------------------------------------------------------------------- all four


def _tasks():
    return {
        "rpl2d": (RelativePatchLocation2D(), 64),
        "jigsaw2d": (_small_jigsaw(), 64),
        "cpc2d": (CPC2D(CPC2D.Config(code_size=32, num_negatives=15)), 96),
        "exemplar2d": (Exemplar2D(Exemplar2D.Config(code_size=32)), 64),
    }


@pytest.mark.parametrize("name", ["rpl2d", "jigsaw2d", "cpc2d", "exemplar2d"])
def test_same_seed_same_batch(name):
    task, size = _tasks()[name]
    images = _images(size, batch=2)
    a = task.make_batch(images, torch.Generator().manual_seed(5))
    b = task.make_batch(images, torch.Generator().manual_seed(5))
    c = task.make_batch(images, torch.Generator().manual_seed(6))
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize(("name", "channels"),
                         list(itertools.product(["rpl2d", "jigsaw2d", "cpc2d", "exemplar2d"],
                                                [1, 3])))
def test_one_and_three_channels_through_timm2d(name, channels):
    task, size = _tasks()[name]
    backbone = Timm2D(Timm2D.Config(**Timm2D.presets["quick"]))
    encoder = backbone.build_encoder(channels)
    heads = task.build_heads(backbone, encoder)
    images = _images(size, batch=2, channels=channels)
    task.check_input(tuple(images.shape[2:]), channels)
    torch.manual_seed(0)
    loss, logs = task.compute_loss(encoder, heads,
                                   task.make_batch(images, torch.Generator().manual_seed(0)))
    assert torch.isfinite(loss) and all(isinstance(v, float) for v in logs.values())
    loss.backward()
    assert any(p.grad is not None for p in encoder.parameters())
