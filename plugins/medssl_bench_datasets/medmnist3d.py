"""MedMNIST v2 3D (OrganMNIST3D, NoduleMNIST3D, FractureMNIST3D, AdrenalMNIST3D,
VesselMNIST3D, SynapseMNIST3D) read from the official ``.npz`` file, at 28^3 or 64^3."""

from __future__ import annotations

import hashlib
import zipfile
import zlib
from pathlib import Path

import numpy as np
from pydantic import Field

from medssl_bench.config import DATA_FILE, PluginConfig
from medssl_bench.errors import DataError
from medssl_bench.interfaces import Dataset, DatasetInfo, DataSplits
from medssl_bench_datasets.common import ArrayCases

SPLITS = ("train", "val", "test")


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """The six arrays of a MedMNIST 3D file, checked, with messages naming the file."""
    if not path.is_file():
        raise DataError(
            f"MedMNIST file {str(path)!r} does not exist. Set dataset.path to a MedMNIST v2 3D "
            ".npz file, e.g. --set dataset.path=/data/adrenalmnist3d.npz"
        )
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, zlib.error) as exc:
        raise DataError(
            f"MedMNIST file {str(path)!r} cannot be read ({type(exc).__name__}: {exc}); it is "
            "truncated or not an .npz. Download it again."
        ) from None
    missing = [f"{s}_{k}" for s in SPLITS for k in ("images", "labels") if f"{s}_{k}" not in arrays]
    if missing:
        raise DataError(
            f"MedMNIST file {str(path)!r} lacks the keys {', '.join(missing)}; expected "
            "train/val/test _images and _labels as in the official MedMNIST v2 files."
        )
    for split in SPLITS:
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 4 or len(set(images.shape[1:])) != 1:
            raise DataError(
                f"MedMNIST file {str(path)!r}: {split}_images has shape {images.shape}; a 3D "
                "MedMNIST file holds (N, S, S, S) volumes. Is this a 2D MedMNIST file?"
            )
        if labels.shape[0] != images.shape[0] or labels.reshape(len(labels), -1).shape[1] != 1:
            raise DataError(
                f"MedMNIST file {str(path)!r}: {split}_labels has shape {labels.shape} for "
                f"{images.shape[0]} images; expected ({images.shape[0]}, 1)."
            )
        if len(images) == 0:
            raise DataError(f"MedMNIST file {str(path)!r}: the {split} split is empty.")
    return arrays


class MedMNIST3D(Dataset):
    """MedMNIST v2 3D classification from its .npz (official splits; AUC and ACC)."""

    name = "medmnist3d"
    spatial_dims = 3

    class Config(PluginConfig):
        path: str = Field(
            json_schema_extra=DATA_FILE,
            default="",
            description="Path of a MedMNIST v2 3D .npz file (any of the six datasets, 28^3 or "
            "64^3), e.g. adrenalmnist3d.npz or organmnist3d_64.npz. Nothing is downloaded.",
        )
        unlabeled_splits: list[str] = Field(
            default=["train"],
            description="Splits whose images (labels ignored) form the pretraining pool. The "
            "test split never joins it.",
        )

    def load(self) -> DataSplits:
        if not self.config.path:
            raise DataError(
                "Dataset 'medmnist3d' needs the path of a .npz file: "
                "--set dataset.path=/data/adrenalmnist3d.npz"
            )
        if "test" in self.config.unlabeled_splits or not set(self.config.unlabeled_splits) <= {
            "train", "val"
        }:
            raise DataError(
                "dataset.unlabeled_splits may only name 'train' and 'val' (the test split is held out)."
            )
        path = Path(self.config.path).expanduser()
        arrays = read_npz(path)
        labels = {s: arrays[f"{s}_labels"].reshape(-1).astype(np.int64) for s in SPLITS}
        num_classes = int(max(v.max() for v in labels.values())) + 1
        size = arrays["train_images"].shape[1]
        info = DatasetInfo(
            kind="classification",
            num_classes=max(num_classes, 2),
            channels=1,
            image_size=(size,) * 3,
            class_names=tuple(str(i) for i in range(max(num_classes, 2))),
            metrics=("auc", "acc"),
            main_metric="auc",
            extra={"file": path.name},
        )
        cases = {s: ArrayCases(arrays[f"{s}_images"], labels[s], channel_axis=False) for s in SPLITS}
        pool = np.concatenate([arrays[f"{s}_images"] for s in self.config.unlabeled_splits])
        return DataSplits(
            info=info,
            unlabeled=ArrayCases(pool, None, channel_axis=False),
            train=cases["train"],
            val=cases["val"],
            test=cases["test"],
            split_hash=_file_sha256(path)[:16],
            train_ids=[f"train-{i:05d}" for i in range(len(labels["train"]))],
        )
