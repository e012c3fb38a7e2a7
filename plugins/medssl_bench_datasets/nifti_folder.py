"""Any folder of NIfTI, NRRD or MHA volumes (a UK Biobank-style corpus), optionally with a
folder of label maps matched by name.

Without ``labels`` the folder is a pretraining corpus only (labeled splits raise a
DataError; ``info.extra["pretraining_only"]``). With ``labels`` it is a segmentation
dataset: the images with the label map of the same case id are split deterministically by
patient (the case id, or the part ``patient_regex`` captures). An image without a label map
is an error by default; with ``unlabeled_images: pretrain`` it joins the pretraining pool
only (never a train/val/test case), unless its patient has labeled cases in a held-out split
(test, or val when val is not in ``pool``): such scans are left out of pretraining.
Case ids are file names without the volume suffix and without ``image_suffix`` /
``label_suffix``, so ``brain1_image.nrrd`` and ``brain1_label.nrrd`` (one folder, suffixes
``_image`` and ``_label``) are the case ``brain1``. Classes are the label values found
(0 always background) unless ``class_names`` declares them; any other value is an error.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field

from medssl_bench.config import DATA_FOLDER
from medssl_bench.errors import DataError
from medssl_bench_datasets.preprocess import CaseSource, is_junk, volume_stem
from medssl_bench_datasets.volumes import Catalog, VolumeConfig, VolumeDataset


def _volumes(folder: Path, suffix: str, recursive: bool) -> dict[str, Path]:
    """Case id -> file, for the volumes in ``folder`` whose stem ends with ``suffix``."""
    found: dict[str, Path] = {}
    for path in sorted(folder.rglob("*") if recursive else folder.iterdir()):
        stem = volume_stem(path)
        if stem is None or is_junk(path) or not path.is_file() or not stem.endswith(suffix):
            continue
        case = stem[: len(stem) - len(suffix)] if suffix else stem
        if recursive:
            case = str(path.parent.relative_to(folder) / case)
        found[case] = path
    return found


class NiftiFolder(VolumeDataset):
    """A folder of NIfTI/NRRD/MHA volumes as a corpus, optionally with label maps by name."""

    name = "nifti-folder"

    class Config(VolumeConfig):
        root: str = Field(default="", json_schema_extra=DATA_FOLDER,
                          description="Folder of the images (.nii.gz, .nii, .nrrd, "
                          ".nhdr, .mha, .mhd), one volume per case; the case id is the file name "
                          "without extension and image_suffix. Nothing is downloaded.")
        labels: str = Field(default="", description="Folder of label maps matched to the images "
                            "by case id (may be dataset.root itself, with suffixes); empty: an "
                            "unlabeled pretraining corpus.")
        image_suffix: str = Field(default="", description="Text ending an image's name before "
                                  "the extension, removed to get the case id (e.g. _image).")
        label_suffix: str = Field(default="", description="Text ending a label map's name before "
                                  "the extension (e.g. _label, _seg).")
        modality: str = Field(default="MRI", description="CT: clip to dataset.ct_window (HU) "
                              "before scaling; anything else: per-volume percentile scaling.")
        class_names: dict[int, str] | None = Field(
            default=None, description="Label value -> class name, 0 included; null: the values "
            "found, named label_<value>.")
        patient_regex: str = Field(default="", description="Regex whose first group is the "
                                   "patient of a case id (keeps a patient's scans in one split); "
                                   "empty: every case is its own patient.")
        recursive: bool = Field(default=False, description="Also read volumes in subfolders.")
        unlabeled_images: Literal["error", "pretrain"] = Field(
            default="error", description="With `labels`: what an image without a label map is. "
            "error: a problem, reported by name. pretrain: an unlabeled scan for the "
            "pretraining pool only (never a train/val/test case; scans of a patient whose "
            "labeled cases are held out, in test or in val when val is not in `pool`, are left "
            "out of the pool).")

    def catalog(self) -> Catalog:
        cfg = self.config
        root = self.root()
        ct = cfg.modality.strip().upper() == "CT"
        images = _volumes(root, cfg.image_suffix, cfg.recursive)
        if cfg.labels:
            label_dir = Path(cfg.labels).expanduser()
            if not label_dir.is_dir():
                raise DataError(f"{label_dir}: dataset.labels is not a folder.")
            labels = _volumes(label_dir, cfg.label_suffix, cfg.recursive)
            if label_dir.resolve() == root.resolve() and cfg.image_suffix == cfg.label_suffix:
                raise DataError(f"{root}: images and label maps share a folder; set "
                                "dataset.image_suffix and dataset.label_suffix to tell them apart.")
            # label maps found again among the images (a shared folder without image_suffix,
            # or the labels folder inside a recursive root) are never images
            label_paths = {Path(p).resolve() for p in labels.values()}
            images = {c: p for c, p in images.items() if Path(p).resolve() not in label_paths}
        else:
            labels = {}
        if not images:
            raise DataError(f"{root}: no NIfTI/NRRD/MHA volumes"
                            + (f" whose names end with {cfg.image_suffix!r}" if cfg.image_suffix else "")
                            + " (.nii.gz, .nii, .nrrd, .nhdr, .mha, .mhd); the folder is empty.")
        allowed = tuple(sorted(cfg.class_names)) if cfg.class_names else None
        pattern = re.compile(cfg.patient_regex) if cfg.patient_regex else None
        cases, unlabeled, problems = [], [], []
        for case, image in images.items():
            match = pattern.search(case) if pattern else None
            patient = match.group(1) if match and match.groups() else case
            if cfg.labels and case not in labels:
                if cfg.unlabeled_images == "pretrain":
                    unlabeled.append(CaseSource(case, patient, (str(image),), None, ct, 0))
                    continue
                problems.append(f"{image}: image without its label (no label map named "
                                f"{case}{cfg.label_suffix}.* in {cfg.labels}); add it, or set "
                                "dataset.unlabeled_images=pretrain to pretrain on images "
                                "without labels.")
                continue
            label = str(labels[case]) if cfg.labels else None
            cases.append(CaseSource(case, patient, (str(image),), label, ct, 0, allowed))
        for case, label in labels.items():
            if case not in images:
                problems.append(f"{label}: label map without its image (case {case!r}).")
        hint = ("Give the folder of label maps with --set dataset.labels=DIR to fine-tune on it, or "
                "use it for pretraining in the transfer protocol.")
        if cfg.labels:
            return Catalog(cases, unlabeled, cfg.class_names, None, problems, hint)
        return Catalog([], cases, None, None, problems, hint)
