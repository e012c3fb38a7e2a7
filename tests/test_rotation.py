"""rotation3d against the reference facts: the 10-class table, distinct rotations, and labels
that undo exactly."""

from __future__ import annotations

import numpy as np
import torch

from medssl_bench_tasks.rotation import ROTATIONS_3D, Rotation3D, rotate, rotate_batch


def _cube(batch: int = 1, channels: int = 1, size: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.rand((batch, channels, size, size, size), generator=torch.Generator().manual_seed(seed))


def test_table_matches_the_reference_code():
    # ../shared/reference/proxy-tasks.md: 0 = identity; 1-3 = rot90 k=1,2,3 in axes (0,1);
    # 4-6 = k=3,2,1 in (1,2); 7-9 = k=3,2,1 in (0,2) (preprocess_rotation.py)
    expected = [(0, None)]
    expected += [(k, (0, 1)) for k in (1, 2, 3)]
    expected += [(k, (1, 2)) for k in (3, 2, 1)]
    expected += [(k, (0, 2)) for k in (3, 2, 1)]
    assert len(ROTATIONS_3D) == 10
    assert ROTATIONS_3D[0][0] == 0
    assert [(k, axes) for k, axes in ROTATIONS_3D[1:]] == expected[1:]


def test_rotate_agrees_with_numpy_rot90_on_spatial_axes():
    volume = _cube(channels=2)
    for label, (k, (a, b)) in enumerate(ROTATIONS_3D):
        reference = np.rot90(volume.numpy(), k, axes=(a + 2, b + 2))
        assert np.array_equal(rotate(volume, label).numpy(), reference), label


def test_the_ten_rotations_of_a_random_cube_are_distinct():
    volume = _cube()
    rotated = [rotate(volume, label) for label in range(10)]
    for i in range(10):
        for j in range(i + 1, 10):
            assert not torch.equal(rotated[i], rotated[j]), (i, j)


def test_undoing_the_labelled_rotation_restores_the_input_copies():
    task = Rotation3D(Rotation3D.Config(copies_per_volume=4))
    images = _cube(batch=3, channels=2)
    batch = task.make_batch(images, torch.Generator().manual_seed(0))
    assert batch["inputs"].shape == (12, 2, 6, 6, 6) and batch["labels"].shape == (12,)
    assert batch["sources"].bincount().tolist() == [4, 4, 4]  # every image, 4 copies
    assert batch["labels"].tolist() == sorted(batch["labels"].tolist())  # class blocks
    for i, label in enumerate(batch["labels"].tolist()):
        restored = rotate(batch["inputs"][i : i + 1], label, inverse=True)
        source = int(batch["sources"][i])
        assert torch.equal(restored, images[source : source + 1])


def test_rotated_copies_with_scattered_classes_keep_their_rows():
    """Labels in any order (each class's rows not one block) take the scatter path."""
    from medssl_bench_tasks.rotation import rotated_copies

    images = _cube(batch=3, size=8)
    labels = torch.tensor([4, 0, 4, 9, 1, 9, 6, 6, 2, 5, 4, 7])
    out = rotated_copies(images, labels, copies=4)
    for row, label in enumerate(labels.tolist()):
        assert torch.equal(out[row : row + 1], rotate(images[row // 4 : row // 4 + 1], label))


def test_rotate_batch_applies_each_sample_its_own_class():
    volumes = _cube(batch=10)
    labels = torch.arange(10)
    out = rotate_batch(volumes, labels)
    for i in range(10):
        assert torch.equal(out[i : i + 1], rotate(volumes[i : i + 1], i))


def test_every_class_is_drawn_and_seeds_repeat():
    task = Rotation3D()
    images = _cube(batch=64, size=4)
    a = task.make_batch(images, torch.Generator().manual_seed(1))
    b = task.make_batch(images, torch.Generator().manual_seed(1))
    assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["inputs"], b["inputs"])
    assert set(a["labels"].tolist()) == set(range(10))
