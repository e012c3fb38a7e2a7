"""Reading, checking and preprocessing 3D volumes (torchio), one case at a time.

Every function here works on one case and is a plain top-level function of picklable
arguments, so the cache (``volume_cache.py``) can run it in worker processes. Reading and
checking raise :class:`DataError` naming the file and the problem; a bare traceback from
nibabel or SimpleITK never reaches the user.

Preprocessing follows Taleb et al. (appendix): foreground crop for pretraining volumes only,
resize to a unified cubic size (128^3), intensities scaled to [0, 1]; CT channels are
clipped to a Hounsfield window first, so every CT volume shares one intensity scale.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from medssl_bench.errors import DataError

#: Bump when the output of :func:`preprocess_case` changes: it enters every cache key.
#: 2: meta.json records the reorientation and crop (to map predictions to the native grid).
PREPROCESS_VERSION = 2
#: Voxel-to-world matrices of an image and its label may differ by this much (mm).
AFFINE_TOLERANCE = 1e-3
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")

Mode = Literal["pretrain", "labeled"]


@dataclass(frozen=True)
class Prep:
    """The preprocessing settings that determine a cached array (hashed into its key)."""

    size: int = 128
    foreground_crop: bool = True
    foreground_threshold: float = 0.05
    ct_window: tuple[float, float] = (-1000.0, 1000.0)
    percentiles: tuple[float, float] = (0.0, 100.0)


@dataclass(frozen=True)
class CaseSource:
    """One case as found on disk: its image file(s), optional label map, and identity.

    ``images`` holds one file per modality (BraTS) or a single file with every modality
    (MSD 4D NIfTI). ``channels`` is the expected channel count (0: whatever the file has).
    """

    case_id: str
    patient: str
    images: tuple[str, ...]
    label: str | None = None
    ct: bool = False
    channels: int = 0
    #: Raw label values that may occur; None accepts any non-negative integer.
    allowed_labels: tuple[int, ...] | None = None


@dataclass
class CaseMeta:
    """What checking a case found: written beside its cached arrays, shown by data check."""

    case_id: str
    shape: list[int]
    channels: int
    spacing: list[float]
    label_values: list[int] = field(default_factory=list)
    out_shape: list[int] = field(default_factory=list)
    #: The reorientation to RAS applied before resizing, as a nibabel orientation transform:
    #: row i is ``[axis of the reoriented volume, +1 or -1 (flipped)]`` of original axis i.
    orientation: list[list[int]] = field(default_factory=list)
    #: torchio ``Crop`` amounts ``(x0, x1, y0, y1, z0, z1)`` cut after reorienting
    #: (pretraining volumes only; fine-tuning volumes are never cropped), or None.
    crop: list[int] | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> CaseMeta:
        return cls(**json.loads(text))


def volume_stem(path: Path) -> str | None:
    """The name without a volume suffix, or None for files that are not volumes."""
    name = path.name
    for suffix in VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return None


def is_junk(path: Path) -> bool:
    """macOS resource forks (``._x.nii.gz``, shipped inside the MSD tars) and hidden files."""
    return path.name.startswith(".")


# --------------------------------------------------------------------------- reading


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


def _read_nifti(file: Path) -> tuple[torch.Tensor, np.ndarray]:
    """NIfTI through nibabel alone: torchio falls back to SimpleITK when nibabel fails, and
    SimpleITK zero-fills a truncated .nii.gz without a word."""
    import nibabel as nib

    image = nib.load(str(file), mmap=False)
    data = np.asarray(image.get_fdata(dtype=np.float32))
    if data.ndim == 5 and data.shape[3] == 1:  # (X, Y, Z, 1, C)
        data = data[:, :, :, 0]
    if data.ndim == 4:  # (X, Y, Z, C): MSD multi-modality tasks
        data = data.transpose(3, 0, 1, 2)
    elif data.ndim == 3:
        data = data[np.newaxis]
    return torch.from_numpy(np.ascontiguousarray(data)), np.asarray(image.affine, dtype=np.float64)


def read_volume(path: str, what: str) -> tuple[torch.Tensor, np.ndarray]:
    """``(data (C, X, Y, Z) float32, affine 4x4)`` of a NIfTI/NRRD/MHA file, or a DataError.

    Non-NIfTI files are read by torchio (SimpleITK), whose affine is RAS like nibabel's.
    """
    import torchio as tio  # imported here: 1 s that `bench plugins` should not pay

    file = Path(path)
    if not file.is_file():
        raise DataError(f"{path}: the {what} file does not exist.")
    if file.stat().st_size == 0:
        raise DataError(f"{path}: the {what} file is empty (0 bytes); copy or download it again.")
    try:
        if file.name.lower().endswith((".nii", ".nii.gz")):
            data, affine = _read_nifti(file)
        else:
            image = tio.ScalarImage(file)
            data = image.data.float()
            affine = np.asarray(image.affine, dtype=np.float64)
    except Exception as exc:  # nibabel, SimpleITK, gzip and zlib all raise their own types
        raise DataError(
            f"{path}: the {what} cannot be read; the file is corrupt, truncated or not a "
            f"NIfTI/NRRD/MHA volume ({_short(exc)}). Copy or download it again."
        ) from None
    if data.ndim != 4 or min(data.shape[1:]) < 1:
        raise DataError(f"{path}: the {what} has shape {tuple(data.shape)}; expected a 3D volume.")
    return data, affine


def _spacing(affine: np.ndarray) -> list[float]:
    return [round(float(v), 5) for v in np.linalg.norm(affine[:3, :3], axis=0)]


def _check_finite(data: torch.Tensor, path: str, what: str) -> None:
    bad = ~torch.isfinite(data)
    if bad.any():
        n_nan = int(torch.isnan(data).sum())
        raise DataError(
            f"{path}: the {what} holds {n_nan} NaN and {int(bad.sum()) - n_nan} infinite "
            f"intensities (of {data.numel()} voxels); fix or remove this case."
        )


def _check_geometry(path: str, what: str, shape, affine, ref_path: str, ref_shape, ref_affine) -> None:
    if tuple(shape) != tuple(ref_shape):
        raise DataError(
            f"{path}: the {what} has shape {tuple(shape)} but {ref_path} has {tuple(ref_shape)}; "
            "an image and its label (and all modalities) must share one voxel grid."
        )
    if not np.allclose(affine, ref_affine, atol=AFFINE_TOLERANCE, rtol=1e-4):
        raise DataError(
            f"{path}: the {what}'s affine (origin, spacing, direction) differs from {ref_path}'s "
            f"(largest difference {float(np.abs(affine - ref_affine).max()):.4g}); resample one "
            "onto the other's grid."
        )


def read_case(source: CaseSource) -> tuple[torch.Tensor, torch.Tensor | None, np.ndarray, CaseMeta]:
    """Read and check one case: ``(image (C,X,Y,Z), label (1,X,Y,Z) or None, affine, meta)``."""
    parts, affine, first = [], None, source.images[0]
    for path in source.images:
        data, aff = read_volume(path, "image")
        _check_finite(data, path, "image")
        if affine is None:
            affine = aff
        else:
            _check_geometry(path, "image", data.shape[1:], aff, first, parts[0].shape[1:], affine)
        parts.append(data)
    assert affine is not None
    image = torch.cat(parts) if len(parts) > 1 else parts[0]
    if source.channels and image.shape[0] != source.channels:
        raise DataError(
            f"{first}: the image has {image.shape[0]} channel(s) but {source.channels} modalities "
            "are expected (dataset.json `modality`, or the dataset's modality files)."
        )
    meta = CaseMeta(source.case_id, list(image.shape[1:]), int(image.shape[0]), _spacing(affine))
    label = None
    if source.label is not None:
        label, laff = read_volume(source.label, "label map")
        if label.shape[0] != 1:
            raise DataError(f"{source.label}: the label map has {label.shape[0]} channels; expected 1.")
        _check_geometry(source.label, "label map", label.shape[1:], laff, first, image.shape[1:], affine)
        _check_finite(label, source.label, "label map")
        values = torch.unique(label)
        if not torch.equal(values, values.round()) or (values < 0).any():
            odd = [float(v) for v in values if v != v.round() or v < 0][:5]
            raise DataError(
                f"{source.label}: the label map holds non-integer or negative values {odd}; a "
                "label map holds class indices 0, 1, 2, ..."
            )
        found = [int(v) for v in values]
        if source.allowed_labels is not None:
            unknown = sorted(set(found) - set(source.allowed_labels))
            if unknown:
                raise DataError(
                    f"{source.label}: unknown label value(s) {unknown}; this dataset's labels are "
                    f"{list(source.allowed_labels)}."
                )
        if max(found) > np.iinfo(np.int16).max:
            raise DataError(f"{source.label}: label value {max(found)} is too large for a label map.")
        meta.label_values = found
    return image, label, affine, meta


# --------------------------------------------------------------------------- preprocessing


def scale_intensity(image: torch.Tensor, ct: bool, prep: Prep) -> torch.Tensor:
    """To [0, 1] per channel: CT by a fixed HU window (so HU keep one meaning across scans),
    MRI by its own percentiles (its units are arbitrary). ``tio.RescaleIntensity`` would pool
    the channels, hence the loop."""
    out = torch.empty_like(image)
    for c, channel in enumerate(image):
        if ct:
            lo, hi = prep.ct_window
        elif prep.percentiles == (0.0, 100.0):
            lo, hi = float(channel.min()), float(channel.max())
        else:
            lo, hi = (float(v) for v in np.percentile(channel.numpy(), prep.percentiles))
        out[c] = ((channel - lo) / (hi - lo)).clamp(0, 1) if hi > lo else torch.zeros_like(channel)
    return out


def foreground_bounds(image: torch.Tensor, threshold: float) -> tuple[int, ...] | None:
    """torchio ``Crop`` amounts that cut the empty border (no voxel of any channel above
    ``threshold``), or None when nothing is above it."""
    mask = (image > threshold).any(0)
    if not mask.any():
        return None
    bounds: list[int] = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = torch.nonzero(mask.any(dim=other)).flatten()
        bounds += [int(hits[0]), int(mask.shape[axis] - 1 - hits[-1])]
    return tuple(bounds)


def preprocess_case(
    source: CaseSource, prep: Prep, mode: Mode
) -> tuple[np.ndarray, np.ndarray | None, CaseMeta]:
    """Read, check and preprocess one case: ``(image float16 (C,S,S,S), label int16 or None,
    meta)``. ``pretrain`` mode crops the empty border first (Taleb et al.: pretraining only)
    and drops the label."""
    import torchio as tio

    image, label, affine, meta = read_case(source)
    subject_items: dict[str, Any] = {"image": tio.ScalarImage(tensor=image, affine=affine)}
    if label is not None and mode == "labeled":
        subject_items["label"] = tio.LabelMap(tensor=label.to(torch.int16), affine=affine)
    meta.orientation = canonical_orientation(affine)
    subject = tio.ToCanonical()(tio.Subject(**subject_items))
    subject.image.set_data(scale_intensity(subject.image.data.float(), source.ct, prep))
    if mode == "pretrain" and prep.foreground_crop:
        bounds = foreground_bounds(subject.image.data, prep.foreground_threshold)
        if bounds is not None and any(bounds):
            subject = tio.Crop(bounds)(subject)
            meta.crop = list(bounds)
    with warnings.catch_warnings():  # torchio warns when it fixes a one-voxel rounding
        warnings.simplefilter("ignore", RuntimeWarning)
        subject = tio.Resize(prep.size)(subject)
    out = subject.image.data.numpy().astype(np.float16)
    meta.out_shape = list(out.shape[1:])
    lab = subject["label"].data[0].numpy().astype(np.int16) if "label" in subject else None
    return out, lab, meta


def canonical_orientation(affine: np.ndarray) -> list[list[int]]:
    """The orientation transform ``tio.ToCanonical`` applies to a volume with ``affine``
    (nibabel ``ornt_transform`` from its orientation to RAS)."""
    import nibabel as nib

    ornt = nib.orientations.ornt_transform(nib.orientations.io_orientation(affine),
                                           nib.orientations.axcodes2ornt("RAS"))
    return [[int(axis), int(flip)] for axis, flip in ornt]


def native_label(source: CaseSource) -> np.ndarray:
    """The label map of a case on its original voxel grid and axis order, int16 raw values:
    the reference of native-resolution evaluation. Only the label file is read; the case
    was checked whole when its cache entry (keyed by the same files) was made."""
    if source.label is None:
        raise DataError(f"{source.images[0]}: case {source.case_id!r} has no label map.")
    label, _ = read_volume(source.label, "label map")
    _check_finite(label, source.label, "label map")
    return label[0].round().numpy().astype(np.int16)


def write_native_label(directory: Path, label: np.ndarray) -> None:
    """Add ``native_label.npy`` to a cache entry atomically (a finished entry gains it later,
    when its case is first evaluated at the native resolution)."""
    tmp = directory / f"native_label.tmp{os.getpid()}.npy"
    np.save(tmp, label)
    os.replace(tmp, directory / "native_label.npy")


def write_entry(directory: Path, image: np.ndarray, label: np.ndarray | None, meta: CaseMeta) -> None:
    """Write one cache entry atomically: the files appear under their final names only once
    complete (a crash leaves a ``.tmp`` folder, never a half-written entry)."""
    tmp = directory.with_name(f"{directory.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    np.save(tmp / "image.npy", image)
    if label is not None:
        np.save(tmp / "label.npy", label)
    (tmp / "meta.json").write_text(meta.to_json())
    try:
        os.replace(tmp, directory)
    except OSError:  # another process finished the same entry first: keep theirs
        for child in tmp.iterdir():
            child.unlink()
        tmp.rmdir()
