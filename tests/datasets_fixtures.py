"""Tiny datasets written in exactly the layouts the real downloads use
(../shared/reference/datasets.md), for the dataset tests (and a tiny APTOS 2019 fundus folder)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

AFFINE = np.diag([0.8, 0.8, 2.5, 1.0])
SHAPE = (24, 20, 16)


def blob_case(rng: np.random.Generator, shape=SHAPE, values=(1, 2), lo=-1000.0, hi=400.0):
    """A noisy body with a labeled blob (and a smaller blob inside for the second label)."""
    image = rng.uniform(lo, hi, shape).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    c = [s // 2 + int(rng.integers(-2, 3)) for s in shape]
    label[c[0] - 5:c[0] + 5, c[1] - 4:c[1] + 4, c[2] - 4:c[2] + 4] = values[0]
    if len(values) > 1:
        label[c[0] - 2:c[0] + 2, c[1] - 2:c[1] + 2, c[2] - 2:c[2] + 2] = values[1]
    image[label > 0] += 300
    return image, label


def save_nifti(path: Path, array: np.ndarray, affine=AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def write_msd(root: Path, ids=(1, 4, 5, 10, 12, 290), test_ids=(2, 7), channels: int = 1,
              seed: int = 0, shape=SHAPE, affine=AFFINE) -> Path:
    """An MSD task folder with the real dataset.json quirks: a trailing space in `reference`
    and in one path, `test` as plain strings, macOS ``._`` files beside every volume."""
    rng = np.random.default_rng(seed)
    modality = {"0": "CT"} if channels == 1 else {str(i): f"MR{i}" for i in range(channels)}

    def image_array(image):
        if channels == 1:
            return image.astype(np.int16)
        return np.stack([image * (i + 1) for i in range(channels)], axis=-1).astype(np.float32)

    for i in ids:
        image, label = blob_case(rng, shape)
        save_nifti(root / "imagesTr" / f"pancreas_{i:03d}.nii.gz", image_array(image), affine)
        save_nifti(root / "labelsTr" / f"pancreas_{i:03d}.nii.gz", label, affine)
        for folder in ("imagesTr", "labelsTr"):
            (root / folder / f"._pancreas_{i:03d}.nii.gz").write_bytes(b"\x00\x05\x16\x07Mac OS X")
    for i in test_ids:
        image, _ = blob_case(rng, shape)
        save_nifti(root / "imagesTs" / f"pancreas_{i:03d}.nii.gz", image_array(image), affine)
        (root / "imagesTs" / f"._pancreas_{i:03d}.nii.gz").write_bytes(b"\x00\x05\x16\x07")
    training = [{"image": f"./imagesTr/pancreas_{i:03d}.nii.gz",
                 "label": f"./labelsTr/pancreas_{i:03d}.nii.gz"} for i in ids]
    training[0]["image"] += " "  # stray whitespace, as in hand-edited copies
    meta = {
        "name": "Pancreas", "description": "Pancreas and cancer segmentation",
        "reference": "Memorial Sloan Kettering Cancer Center ", "licence": "CC-BY-SA 4.0",
        "relase": "1.0 04/05/2018", "tensorImageSize": "3D" if channels == 1 else "4D",
        "modality": modality, "labels": {"0": "background", "1": "pancreas", "2": "cancer"},
        "numTraining": len(ids), "numTest": len(test_ids), "training": training,
        "test": [f"./imagesTs/pancreas_{i:03d}.nii.gz" for i in test_ids],
    }
    (root / "dataset.json").write_text(json.dumps(meta, indent=4))
    return root


def write_brats(root: Path, year: int = 2018, seed: int = 0) -> Path:
    """BraTS 2018 (HGG/LGG, one patient scanned twice) or 2021 (flat) training folder."""
    rng = np.random.default_rng(seed)
    if year == 2018:
        cases = [("HGG", "Brats18_TCIA01_131_1"), ("HGG", "Brats18_TCIA01_131_2"),
                 ("HGG", "Brats18_2013_2_1"), ("LGG", "Brats18_TCIA10_103_1"),
                 ("LGG", "Brats18_2013_9_1")]
        (root / "survival_data.csv").parent.mkdir(parents=True, exist_ok=True)
        (root / "survival_data.csv").write_text("BraTS18ID,Age,Survival,ResectionStatus\n")
    else:
        cases = [("", f"BraTS2021_{i:05d}") for i in (0, 2, 3, 5, 6)]
    for grade, case in cases:
        folder = root / grade / case if grade else root / case
        image, label = blob_case(rng, values=(2, 4), lo=0, hi=500)
        label[label.shape[0] // 2, label.shape[1] // 2, :3] = 1
        for k, modality in enumerate(("flair", "t1", "t1ce", "t2")):
            save_nifti(folder / f"{case}_{modality}.nii.gz", (image * (1 + k)).astype(np.int16))
        save_nifti(folder / f"{case}_seg.nii.gz", label)
    return root


def write_luna(root: Path, n: int = 3, seed: int = 0) -> Path:
    """LUNA16 subsetN/<seriesuid>.mhd + .raw written by SimpleITK (MET_SHORT, HU)."""
    import SimpleITK as sitk

    rng = np.random.default_rng(seed)
    for i in range(n):
        array = rng.integers(-1024, 400, (16, 24, 24)).astype(np.int16)  # (z, y, x)
        array[0, 0, 0], array[0, 0, 1] = -3024, 3000  # outside the HU window
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((0.7, 0.7, 2.5))
        image.SetOrigin((-180.0, -170.0, -300.0))
        uid = f"1.3.6.1.4.1.14519.5.2.1.6279.6001.{100 + i}"
        folder = root / f"subset{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(image, str(folder / f"{uid}.mhd"))
    (root / "annotations.csv").write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n")
    return root


def write_folder(images: Path, labels: Path | None, n: int = 4, seed: int = 0,
                 formats=(".nii.gz", ".nrrd", ".mha")) -> None:
    """A folder of volumes in mixed formats, label maps matched by name."""
    import SimpleITK as sitk

    rng = np.random.default_rng(seed)
    for i in range(n):
        image, label = blob_case(rng, values=(1,), lo=0, hi=200)
        suffix = formats[i % len(formats)]
        name = f"subj{i:02d}{suffix}"
        if suffix.startswith(".nii"):
            save_nifti(images / name, image)
            if labels is not None:
                save_nifti(labels / name, label)
        else:
            images.mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(sitk.GetImageFromArray(image.transpose(2, 1, 0)), str(images / name))
            if labels is not None:
                labels.mkdir(parents=True, exist_ok=True)
                sitk.WriteImage(sitk.GetImageFromArray(label.transpose(2, 1, 0)), str(labels / name))


def fundus_picture(seed: int, grade: int):
    """A phantom fundus (PIL image) in a wide black frame, as camera images are."""
    from PIL import Image

    from medssl_bench_datasets.phantom2d import generate_case

    image, _ = generate_case(24, seed, grade)
    pixels = (image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    framed = np.zeros((30, 40, 3), np.uint8)
    framed[3:27, 8:32] = pixels
    return Image.fromarray(framed)


def write_aptos(root: Path, per_grade: int = 2, unlabeled: int = 0) -> list[tuple[str, int]]:
    """An APTOS 2019 folder: train.csv (id_code,diagnosis), train_images/, test_images/."""
    import csv

    (root / "train_images").mkdir(parents=True)
    rows = [(f"{g}{i:03d}abc", g) for g in range(5) for i in range(per_grade)]
    for n, (image_id, grade) in enumerate(rows):
        fundus_picture(n, grade).save(root / "train_images" / f"{image_id}.png")
    with (root / "train.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id_code", "diagnosis"])
        writer.writerows(rows)
    if unlabeled:
        (root / "test_images").mkdir()
        for i in range(unlabeled):
            fundus_picture(100 + i, 0).save(root / "test_images" / f"t{i}.png")
    return rows
