"""Medical Segmentation Decathlon tasks, read from their ``dataset.json``.

Layout (Task07_Pancreas, the documented example)::

    Task07_Pancreas/dataset.json
    Task07_Pancreas/imagesTr/pancreas_001.nii.gz   labelsTr/pancreas_001.nii.gz
    Task07_Pancreas/imagesTs/pancreas_002.nii.gz   (no labels: joins the pretraining pool)

Quirks handled: ``test`` is a list of plain strings; strings may carry stray spaces; the
tars ship macOS ``._pancreas_*.nii.gz`` resource forks, which are skipped (nnUNet#240);
multi-modality tasks (Task01_BrainTumour, Task05_Prostate) store modalities as the 4th
NIfTI axis and become channels; CT tasks (``modality`` "CT") are clipped to a HU window.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medssl_bench.errors import DataError
from medssl_bench_datasets.preprocess import CaseSource, is_junk, volume_stem
from medssl_bench_datasets.volumes import Catalog, VolumeConfig, VolumeDataset


def _path(root: Path, entry: Any, where: str) -> Path:
    if not isinstance(entry, str) or not entry.strip():
        raise DataError(f"{root / 'dataset.json'}: {where} holds {entry!r}; expected a file path.")
    return (root / entry.strip()).resolve()


def read_dataset_json(root: Path) -> dict[str, Any]:
    path = root / "dataset.json"
    if not path.is_file():
        raise DataError(f"{path}: no dataset.json; dataset.root must be an MSD task folder such as "
                        "Task07_Pancreas/ (holding dataset.json, imagesTr/, labelsTr/).")
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc}).") from None
    if not isinstance(data, dict) or not isinstance(data.get("training"), list):
        raise DataError(f"{path}: lacks the `training` list of {{image, label}} entries.")
    return data


def _case_id(path: Path) -> str:
    return volume_stem(path) or path.name


class MSD(VolumeDataset):
    """Medical Segmentation Decathlon task from its dataset.json (e.g. Task07_Pancreas)."""

    name = "msd"

    class Config(VolumeConfig):
        pass

    def catalog(self) -> Catalog:
        root = self.root()
        data = read_dataset_json(root)
        json_path = root / "dataset.json"
        modality = data.get("modality") or {"0": "unknown"}
        if not isinstance(modality, dict):
            raise DataError(f"{json_path}: `modality` must map channel index to a name.")
        channels = len(modality)
        ct = any(str(m).strip().upper() == "CT" for m in modality.values())
        try:
            labels = {int(str(k).strip()): str(v).strip() for k, v in (data.get("labels") or {}).items()}
        except ValueError:
            raise DataError(f"{json_path}: `labels` keys must be integers, got "
                            f"{list(data.get('labels'))}.") from None
        if not labels or 0 not in labels:
            raise DataError(f"{json_path}: `labels` must list the label values, 0 included, e.g. "
                            '{"0": "background", "1": "pancreas", "2": "cancer"}.')
        allowed = tuple(sorted(labels))
        labeled, problems = [], []
        for i, entry in enumerate(data["training"]):
            if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
                problems.append(f"{json_path}: training[{i}] is {entry!r}; expected "
                                '{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}.')
                continue
            image = _path(root, entry["image"], f"training[{i}].image")
            label = _path(root, entry["label"], f"training[{i}].label")
            if is_junk(image):
                continue
            if not image.is_file():
                problems.append(f"{image}: listed in dataset.json training[{i}] but missing.")
                continue
            if not label.is_file():
                problems.append(f"{image}: its label {label} (dataset.json training[{i}]) is missing.")
                continue
            case = _case_id(image)
            labeled.append(CaseSource(case, case, (str(image),), str(label), ct, channels, allowed))
        unlabeled = []
        for i, entry in enumerate(data.get("test") or []):
            if isinstance(entry, dict):  # some re-packaged copies use {"image": ...}
                entry = entry.get("image")
            image = _path(root, entry, f"test[{i}]")
            if is_junk(image):
                continue
            if not image.is_file():
                problems.append(f"{image}: listed in dataset.json test[{i}] but missing.")
                continue
            unlabeled.append(CaseSource(f"test/{_case_id(image)}", _case_id(image), (str(image),),
                                        None, ct, channels))
        if not labeled and not unlabeled and not problems:
            problems.append(f"{json_path}: lists no training or test images.")
        # BraTS-style regions for the brain tumour task (relabelled 1 edema, 2 non-enh., 3 enh.)
        regions = None
        task = str(data.get("name", "")).lower()
        if set(labels) == {0, 1, 2, 3} and ("brats" in task or "tumo" in task):
            regions = {"wt": [1, 2, 3], "tc": [2, 3], "et": [3]}
        return Catalog(labeled, unlabeled, labels, regions, problems)
