"""rpl3d and jigsaw3d: the patch grid, the labels (recomputed from the images), the
permutation set and its cache, determinism, multi-channel input and a tiny overfit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medssl_bench.errors import ConfigError
from medssl_bench_tasks import jigsaw as jigsaw_module
from medssl_bench_tasks.jigsaw import (
    Jigsaw3D,
    hamming_permutations,
    hamming_stats,
    permutation_set,
    random_permutations,
    unshuffle,
)
from medssl_bench_tasks.patches import PatchGrid, extract_grid_patches, extract_patches
from medssl_bench_tasks.rpl import RelativePatchLocation3D, query_cells


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Keep permutation sets out of the user's cache and recompute them per test."""
    monkeypatch.setenv("BENCH_CACHE_DIR", str(tmp_path / "cache"))
    permutation_set.cache_clear()
    yield
    permutation_set.cache_clear()


def _images(*spatial: int, batch: int = 3, channels: int = 1, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((batch, channels, *spatial), generator=generator)


def _crop(image: torch.Tensor, start, patch) -> torch.Tensor:
    """Reference crop of one ``(C, *spatial)`` image by plain slicing."""
    return image[(slice(None), *(slice(int(s), int(s) + p) for s, p in zip(start, patch, strict=True)))]


# ------------------------------------------------------------------ patch grid


def test_reference_geometry_at_128():
    geometry = PatchGrid.for_size((128, 128, 128), grid=3, jitter=3)
    assert geometry.cell == (42, 42, 42) and geometry.patch == (39, 39, 39)
    assert geometry.num_cells == 27 and geometry.centre == 13


def test_grid_too_small_is_a_config_error():
    with pytest.raises(ConfigError, match="no room"):
        PatchGrid.for_size((9, 9, 9), grid=3, jitter=3)


@pytest.mark.parametrize("spatial", [(20, 23), (32, 30, 35)])
def test_grid_patches_are_jittered_crops_of_their_cells(spatial):
    images = _images(*spatial, channels=2)
    patches, starts = extract_grid_patches(images, 3, 2, torch.Generator().manual_seed(0))
    geometry = PatchGrid.for_size(spatial, 3, 2)
    assert patches.shape == (3, 3 ** len(spatial), 2, *geometry.patch)
    corners = geometry.cell_coords() * torch.tensor(geometry.cell)
    offsets = starts - corners
    assert offsets.min() >= 0 and offsets.max() <= 2
    assert len(offsets.unique()) == 3  # every jitter value occurs
    for b in range(images.shape[0]):
        for k in range(patches.shape[1]):
            torch.testing.assert_close(patches[b, k], _crop(images[b], starts[b, k], geometry.patch))


def test_extract_patches_on_given_starts():
    images = _images(16, 16, 16)
    starts = torch.tensor([[[0, 0, 0], [11, 3, 7]]] * 3)
    patches = extract_patches(images, starts, (5, 4, 3))
    torch.testing.assert_close(patches[2, 1], images[2, :, 11:16, 3:7, 7:10])


# ------------------------------------------------------------------ rpl3d


def test_rpl_query_is_the_patch_at_the_labelled_position():
    task = RelativePatchLocation3D(RelativePatchLocation3D.Config(queries_per_volume=5))
    images = _images(32, 34, 36, batch=4)
    batch = task.make_batch(images, torch.Generator().manual_seed(0))
    geometry = PatchGrid.for_size((32, 34, 36), 3, 3)
    coords = geometry.cell_coords()
    cell = torch.tensor(geometry.cell)
    labels, starts, patches = batch["labels"], batch["starts"], batch["patches"]
    assert labels.shape == (4, 5) and labels.min() >= 0 and labels.max() < 26
    assert patches.shape == (4, 6, 1, *geometry.patch)
    for b in range(4):
        assert torch.equal(starts[b, 0] // cell, torch.tensor([1, 1, 1]))  # the centre
        for q in range(5):
            position = coords[query_cells(labels[b, q], 13)]
            assert not torch.equal(position, torch.tensor([1, 1, 1]))
            assert torch.equal(starts[b, 1 + q] // cell, position)
        for k in range(6):
            torch.testing.assert_close(patches[b, k], _crop(images[b], starts[b, k], geometry.patch))


def test_rpl_labels_cover_all_26_positions():
    assert query_cells(torch.arange(26), 13).tolist() == [*range(13), *range(14, 27)]


def test_rpl_grid_must_be_odd():
    with pytest.raises(ValueError, match="odd"):
        RelativePatchLocation3D.Config(grid=4)


# ------------------------------------------------------------------ jigsaw3d


def test_jigsaw_unshuffling_restores_grid_order():
    task = Jigsaw3D(Jigsaw3D.Config(num_permutations=20, candidates=200))
    images = _images(32, 32, 32, batch=4, channels=2)
    batch = task.make_batch(images, torch.Generator().manual_seed(0))
    perms = task.permutation_table()[batch["labels"]]
    assert not torch.equal(perms, torch.arange(27).expand(4, -1))
    patches = unshuffle(batch["patches"], perms)
    starts = unshuffle(batch["starts"], perms)
    geometry = PatchGrid.for_size((32, 32, 32), 3, 3)
    # grid order: cell k's patch is at slot k, with this batch's jitter
    assert torch.equal(starts // torch.tensor(geometry.cell), geometry.cell_coords().expand(4, -1, -1))
    torch.testing.assert_close(patches, extract_patches(images, starts, geometry.patch))
    # and the shuffled slots really are shuffled
    assert not torch.equal(patches, batch["patches"])


def test_hamming_set_beats_random_set():
    hamming = hamming_stats(hamming_permutations(100, 27, 2000, seed=0))
    random = hamming_stats(random_permutations(100, 27, seed=0))
    print(f"Hamming distances, greedy: {hamming}; random: {random}")
    assert hamming["min"] > random["min"]
    assert hamming["mean"] >= random["mean"] - 0.1


def test_hamming_set_on_small_puzzles_is_well_spread():
    # 2x2x2 pieces: 8! candidates; 24 permutations at pairwise distance >= 5 are easy to find
    perms = hamming_permutations(24, 8, 5000, seed=1)
    assert hamming_stats(perms)["min"] >= 5


def test_permutation_sets_are_valid_and_distinct():
    for method in ("hamming", "random"):
        perms = permutation_set(method, 100, 27, 1000, 0)
        assert perms.shape == (100, 27) and not perms.flags.writeable
        assert (np.sort(perms, axis=1) == np.arange(27)).all()
        assert len({tuple(p) for p in perms}) == 100


def test_permutation_set_is_deterministic_and_cached_on_disk(tmp_path, monkeypatch):
    first = permutation_set("hamming", 50, 27, 500, 7)
    files = list((tmp_path / "cache" / "jigsaw").glob("*.npy"))
    assert len(files) == 1
    assert np.array_equal(np.load(files[0], allow_pickle=False), first)
    permutation_set.cache_clear()

    def fail(*args, **kwargs):
        raise AssertionError("recomputed despite the disk cache")

    monkeypatch.setattr(jigsaw_module, "hamming_permutations", fail)
    assert np.array_equal(permutation_set("hamming", 50, 27, 500, 7), first)
    monkeypatch.undo()
    assert not np.array_equal(permutation_set("hamming", 50, 27, 500, 8), first)


def test_corrupt_cache_file_is_recomputed(tmp_path):
    first = permutation_set("random", 10, 27, 10, 0)
    (path,) = (tmp_path / "cache" / "jigsaw").glob("*.npy")
    path.write_bytes(b"not an array")
    permutation_set.cache_clear()
    assert np.array_equal(permutation_set("random", 10, 27, 10, 0), first)


def test_jigsaw_config_needs_enough_candidates():
    with pytest.raises(ValueError, match="candidates"):
        Jigsaw3D.Config(num_permutations=1000, candidates=500)


# ------------------------------------------------------------------ both tasks


def _tasks():
    return [
        RelativePatchLocation3D(),
        Jigsaw3D(Jigsaw3D.Config(num_permutations=10, candidates=100)),
    ]


@pytest.mark.parametrize("index", [0, 1], ids=["rpl3d", "jigsaw3d"])
def test_same_seed_same_batches(index):
    task = _tasks()[index]
    images = _images(32, 32, 32, channels=2)
    a = task.make_batch(images, torch.Generator().manual_seed(5))
    b = task.make_batch(images, torch.Generator().manual_seed(5))
    c = task.make_batch(images, torch.Generator().manual_seed(6))
    for key in a:
        assert torch.equal(a[key], b[key])
    assert not torch.equal(a["starts"], c["starts"])


@pytest.mark.parametrize("index", [0, 1], ids=["rpl3d", "jigsaw3d"])
@pytest.mark.parametrize("channels", [2, 4])
def test_multichannel_input(index, channels, tiny_backbone):
    task = _tasks()[index]
    images = _images(32, 32, 32, batch=2, channels=channels)
    encoder = tiny_backbone.build_encoder(channels)
    heads = task.build_heads(tiny_backbone, encoder)
    batch = task.make_batch(images, torch.Generator().manual_seed(0))
    assert batch["patches"].shape[2] == channels
    loss, _ = task.compute_loss(encoder, heads, batch)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("index", [0, 1], ids=["rpl3d", "jigsaw3d"])
def test_tiny_model_overfits_a_few_volumes(index, tiny_backbone):
    """A fixed batch of 4 volumes at 32^3 is memorised: the loss falls clearly."""
    torch.manual_seed(0)
    task = _tasks()[index]
    images = _images(32, 32, 32, batch=4)
    encoder = tiny_backbone.build_encoder(1)
    heads = task.build_heads(tiny_backbone, encoder)
    batch = task.make_batch(images, torch.Generator().manual_seed(0))
    params = [*encoder.parameters(), *heads.parameters()]
    optimizer = torch.optim.Adam(params, lr=2e-3)
    losses = []
    for _ in range(20):
        loss, _ = task.compute_loss(encoder, heads, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert min(losses[-5:]) < 0.3 * losses[0], losses


def test_random_sets_are_distinct_even_for_small_puzzles():
    perms = random_permutations(720, 6, seed=0)  # every permutation of 6 items
    assert len({tuple(p) for p in perms}) == 720
    with pytest.raises(ValueError, match="only 720"):
        random_permutations(721, 6, seed=0)


def test_patch_padding_suits_the_backbone():
    from medssl_bench_tasks.patches import PatchEmbedder

    patches = torch.ones(2, 1, 7, 9, 39)
    multiple = PatchEmbedder(8, 4, 16, 32, "multiple").pad(patches)
    assert multiple.shape[2:] == (32, 32, 48)  # the backbone's minimum, else the next multiple
    assert multiple.sum() == patches.sum()  # zero padding only
    assert PatchEmbedder(8, 4, 16, 32, "minimum").pad(patches).shape[2:] == (32, 32, 39)
    assert PatchEmbedder(8, 4, 1, 1, "multiple").pad(patches).shape[2:] == (7, 9, 39)
