"""BraTS 2018 and 2021 brain tumour segmentation, four MRI modalities as channels.

Layouts (``dataset.root`` is the training folder)::

    MICCAI_BraTS_2018_Data_Training/{HGG,LGG}/<ID>/<ID>_{flair,t1,t1ce,t2,seg}.nii.gz
    BraTS2021_Training_Data/BraTS2021_00000/BraTS2021_00000_{flair,t1,t1ce,t2,seg}.nii.gz

Labels are {0, 1 NCR/NET, 2 edema, 4 enhancing}; 3 is unused, and a 3 in a label map is
reported as an unknown value (BraTS 2023 files, which use ET = 3, need their own plugin).
Classes are 0..3 internally (4 -> 3). Metrics are the BraTS regions: whole tumour {1,2,4},
tumour core {1,4}, enhancing tumour {4}; the main metric is their mean, ``dice_regions``.
A folder without any ``_seg`` file (the validation release) is an unlabeled corpus; in a
training folder a case without its ``_seg`` is an error. Patients: BraTS 2018 ids end with a
time-point (``Brats18_TCIA01_131_1``), and the split keeps one patient's scans together.
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import Field

from medssl_bench.errors import DataError
from medssl_bench_datasets.preprocess import CaseSource, is_junk
from medssl_bench_datasets.volumes import Catalog, VolumeConfig, VolumeDataset

MODALITIES = ("flair", "t1", "t1ce", "t2")
LABELS = {0: "background", 1: "ncr_net", 2: "edema", 4: "enhancing"}
REGIONS = {"wt": [1, 2, 4], "tc": [1, 4], "et": [4]}


def _find(folder: Path, case: str, suffix: str) -> Path | None:
    for ext in (".nii.gz", ".nii"):
        path = folder / f"{case}_{suffix}{ext}"
        if path.is_file():
            return path
    return None


def patient_of(case: str) -> str:
    """``Brats18_TCIA01_131_1`` -> ``Brats18_TCIA01_131``; 2021 ids are patients already."""
    match = re.fullmatch(r"(Brats1[78]_.+)_\d+", case)
    return match.group(1) if match else case


class BraTS(VolumeDataset):
    """BraTS 2018 (HGG/LGG) or 2021 glioma segmentation; Dice of WT, TC and ET regions."""

    name = "brats"

    class Config(VolumeConfig):
        modalities: list[str] = Field(default=list(MODALITIES), min_length=1, description=(
            "Modalities stacked as channels, in this order (file suffixes: flair, t1, t1ce, t2)."))
        grades: list[str] = Field(default=["HGG", "LGG"], min_length=1, description=(
            "BraTS 2018 grade folders to read (ignored for the flat 2021 layout)."))

    def case_folders(self, root: Path) -> list[Path]:
        grade_dirs = [root / g for g in ("HGG", "LGG") if (root / g).is_dir()]
        if grade_dirs:
            parents = [root / g for g in self.config.grades if (root / g).is_dir()]
        else:
            parents = [root]
        return sorted(p for parent in parents for p in parent.iterdir()
                      if p.is_dir() and not is_junk(p))

    def catalog(self) -> Catalog:
        root = self.root()
        folders = self.case_folders(root)
        if not folders:
            raise DataError(f"{root}: no BraTS case folders. Expected HGG/<ID>/ and LGG/<ID>/ "
                            "(BraTS 2018) or BraTS2021_xxxxx/ folders (2021), each holding "
                            "<ID>_{flair,t1,t1ce,t2,seg}.nii.gz.")
        has_seg = {f: _find(f, f.name, "seg") for f in folders}
        validation = not any(has_seg.values())
        cases: list[CaseSource] = []
        unlabeled: list[CaseSource] = []
        problems: list[str] = []
        for folder in folders:
            case = folder.name
            images = [_find(folder, case, m) for m in self.config.modalities]
            missing = [m for m, p in zip(self.config.modalities, images, strict=True) if p is None]
            if missing:
                problems.append(f"{folder}: missing modality file(s) "
                                + ", ".join(f"{case}_{m}.nii.gz" for m in missing) + ".")
                continue
            label = has_seg[folder]
            if label is None and not validation:
                problems.append(f"{images[0]}: image without its label ({case}_seg.nii.gz is "
                                "missing).")
                continue
            source = CaseSource(case, patient_of(case), tuple(str(p) for p in images),
                                str(label) if label else None, False, len(images),
                                tuple(LABELS))
            (unlabeled if label is None else cases).append(source)
        return Catalog(cases, unlabeled, LABELS, REGIONS, problems,
                       "This is a BraTS validation folder (no _seg files): point dataset.root at "
                       "the training folder to fine-tune.")
