"""The built-in phantom and the MedMNIST reader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medssl_bench.errors import DataError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "medmnist3d"


def _phantom(registry, **kw):
    cls = registry.get("dataset", "phantom3d")
    return cls(cls.Config(**(dict(size=32, n_unlabeled=3, n_train=6, n_val=2, n_test=2) | kw))).load()


def test_phantom_deterministic_labeled_and_varied(registry):
    a, b = _phantom(registry), _phantom(registry)
    assert a.split_hash == b.split_hash
    img, lab = a.train[0]
    torch.testing.assert_close(img, b.train[0][0])
    assert img.shape == (1, 32, 32, 32) and 0 <= img.min() and img.max() <= 1
    assert set(lab.unique().tolist()) <= {0, 1, 2}
    organ = [(a.train[i][1] == 1).sum().item() for i in range(6)]
    assert min(organ) > 0 and len(set(organ)) == 6  # present, and varies between cases
    assert any((a.train[i][1] == 2).any() for i in range(6))
    assert not torch.equal(a.unlabeled[0], a.train[0][0])  # the pool is other cases
    assert _phantom(registry, seed=1).split_hash != a.split_hash
    two = _phantom(registry, channels=2)
    assert two.train[0][0].shape[0] == 2 and not torch.equal(two.train[0][0][0], two.train[0][0][1])


@pytest.mark.skipif(not SHARED.exists(), reason="../shared/data/medmnist3d is not beside the checkout")
def test_medmnist_official_file(registry):
    cls = registry.get("dataset", "medmnist3d")
    data = cls(cls.Config(path=str(SHARED / "adrenalmnist3d.npz"))).load()
    assert (len(data.train), len(data.val), len(data.test)) == (1188, 98, 298)
    assert len(data.unlabeled) == 1188
    image, label = data.test[0]
    assert image.shape == (1, 28, 28, 28) and image.dtype == torch.float32 and image.max() <= 1
    assert data.info.kind == "classification" and data.info.num_classes == 2
    assert data.info.main_metric == "auc"


def _write_npz(path: Path, n_classes=3, size=8, **override):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 9), ("val", 3), ("test", 6)):
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, size, size, size), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % n_classes).astype(np.uint8)[:, None]
    arrays.update(override)
    np.savez_compressed(path, **arrays)


def test_medmnist_any_file_multiclass(registry, tmp_path):
    path = tmp_path / "organmnist3d_like.npz"
    _write_npz(path, n_classes=4)
    cls = registry.get("dataset", "medmnist3d")
    data = cls(cls.Config(path=str(path))).load()
    assert data.info.num_classes == 4 and len(data.test) == 6


def test_medmnist_bad_files(registry, tmp_path):
    cls = registry.get("dataset", "medmnist3d")
    missing = tmp_path / "nope.npz"
    with pytest.raises(DataError, match=str(missing)):
        cls(cls.Config(path=str(missing))).load()
    with pytest.raises(DataError, match="dataset.path"):
        cls(cls.Config()).load()
    truncated = tmp_path / "trunc.npz"
    _write_npz(truncated)
    truncated.write_bytes(truncated.read_bytes()[:100])
    with pytest.raises(DataError, match="trunc.npz.*cannot be read"):
        cls(cls.Config(path=str(truncated))).load()
    flat = tmp_path / "flat.npz"
    _write_npz(flat, train_images=np.zeros((9, 8, 8), dtype=np.uint8))
    with pytest.raises(DataError, match="2D MedMNIST"):
        cls(cls.Config(path=str(flat))).load()
