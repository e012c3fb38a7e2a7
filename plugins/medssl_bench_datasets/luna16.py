"""LUNA16 chest CT (888 scans) as an unlabeled pretraining corpus in Hounsfield units.

Layout: ``dataset.root`` holds ``subset0/ ... subset9/``, each with ``<seriesuid>.mhd`` and
its ``<seriesuid>.raw`` (the CSV files and ``seg-lungs-LUNA16/`` beside them are ignored).
Scans are clipped to the HU window ([-1000, 1000]) and scaled to [0, 1].

LUNA16 has no segmentation labels here, so the dataset is a *pretraining corpus only*:
``load()`` returns the scans as ``unlabeled`` and labeled splits that raise a DataError
when used, with ``info.extra["pretraining_only"] = True`` for protocols to check. Use it as
the pretraining side of the transfer protocol and fine-tune on ``msd`` or ``brats``.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from medssl_bench.errors import DataError
from medssl_bench_datasets.preprocess import CaseSource, is_junk
from medssl_bench_datasets.volumes import Catalog, VolumeConfig, VolumeDataset


def _data_file(header: Path) -> Path | None:
    """The ``ElementDataFile`` a MetaImage header points at (None: inline or unreadable)."""
    try:
        for line in header.read_text(errors="replace").splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "ElementDataFile":
                value = value.strip()
                return None if value.upper() == "LOCAL" or "%" in value else header.parent / value
    except OSError:
        return None
    return None


class LUNA16(VolumeDataset):
    """LUNA16 chest CT scans (subset0..9/*.mhd): an unlabeled pretraining corpus in HU."""

    name = "luna16"

    class Config(VolumeConfig):
        subsets: list[int] = Field(default=list(range(10)), min_length=1, description=(
            "Which subsetN folders to read (0-9); fewer for a quick run."))

    def catalog(self) -> Catalog:
        root = self.root()
        scans: list[CaseSource] = []
        problems: list[str] = []
        folders = [root / f"subset{i}" for i in self.config.subsets]
        present = [f for f in folders if f.is_dir()]
        if not present:
            raise DataError(f"{root}: no subset0 ... subset9 folders; dataset.root must be the "
                            "LUNA16 folder holding subsetN/<seriesuid>.mhd files.")
        for folder in present:
            for header in sorted(folder.glob("*.mhd")):
                if is_junk(header):
                    continue
                uid = header.stem
                data_file = _data_file(header)
                if data_file is not None and not data_file.is_file():
                    problems.append(f"{header}: its data file {data_file.name} is missing.")
                    continue
                scans.append(CaseSource(uid, uid, (str(header),), None, True, 1))
        if not scans:
            raise DataError(f"{root}: the subset folders hold no .mhd scans.")
        return Catalog([], scans, None, None, problems,
                       "Use it for pretraining in the transfer protocol and fine-tune on a "
                       "labeled dataset (e.g. --dataset msd).")
