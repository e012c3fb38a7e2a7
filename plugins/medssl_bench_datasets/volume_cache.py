"""The on-disk cache of preprocessed volumes, filled once by worker processes and read back
memory-mapped.

An entry is a folder ``<root>/<dataset>/<key>/`` with ``image.npy`` (float16, C x S^3),
``label.npy`` (int16 raw label values, S^3; labeled entries only), ``meta.json`` and, for
the val and test cases evaluated at the native resolution, ``native_label.npy`` (int16, the
label map on its original grid, added when first needed). The key
hashes the source files (absolute path, size, modification time), the preprocessing
settings, the mode and :data:`PREPROCESS_VERSION`, so editing a file or a setting makes a new
entry and an unchanged rerun reads the old one. Arrays are plain ``.npy`` opened with
``mmap_mode="r"``: nothing is ever unpickled, and workers of a DataLoader share the pages.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch.utils.data import Dataset as TorchDataset

from medssl_bench.errors import DataError
from medssl_bench_datasets.common import stable_hash
from medssl_bench_datasets.preprocess import (
    PREPROCESS_VERSION,
    CaseMeta,
    CaseSource,
    Mode,
    Prep,
    native_label,
    preprocess_case,
    write_entry,
    write_native_label,
)

T = TypeVar("T")
R = TypeVar("R")


def cache_root(configured: str = "") -> Path:
    """``dataset.cache_dir`` if set, else ``$BENCH_CACHE_DIR/data``, else
    ``.medssl_bench/cache/data`` (beside the pretrained-encoder cache of ``bench run``)."""
    if configured:
        return Path(configured).expanduser()
    return Path(os.environ.get("BENCH_CACHE_DIR") or ".medssl_bench/cache") / "data"


def file_fingerprint(paths: Sequence[str]) -> list[tuple[str, int, int]]:
    """(absolute path, size, mtime in ns) of each file: cheap, and changes when a file does."""
    out = []
    for path in paths:
        st = Path(path).stat()
        out.append((str(Path(path).resolve()), st.st_size, st.st_mtime_ns))
    return out


@dataclass(frozen=True)
class Job:
    """One cache entry to make: a case, the settings and where it goes."""

    source: CaseSource
    prep: Prep
    mode: Mode
    directory: str


def entry_key(source: CaseSource, prep: Prep, mode: Mode) -> str:
    files = [*source.images, *([source.label] if source.label and mode == "labeled" else [])]
    try:
        fingerprint = file_fingerprint(files)
    except OSError:
        fingerprint = [(f, -1, -1) for f in files]  # missing: reading reports it by name
    source_fields = asdict(source) | {"case_id": "", "patient": ""}
    if mode == "pretrain":
        source_fields["label"] = None
    return stable_hash({"v": PREPROCESS_VERSION, "files": fingerprint, "source": source_fields,
                        "prep": asdict(prep), "mode": mode}, length=24)


def _build(job: Job) -> CaseMeta:
    image, label, meta = preprocess_case(job.source, job.prep, job.mode)
    write_entry(Path(job.directory), image, label, meta)
    return meta


def _init_worker() -> None:
    torch.set_num_threads(1)  # one process per core; intra-op threads would oversubscribe


def default_workers(configured: int) -> int:
    return configured if configured > 0 else max(1, min(4, os.cpu_count() or 1))


def run_parallel(fn: Callable[[T], R], items: Sequence[T], workers: int) -> list[R | DataError]:
    """``fn`` over ``items`` in worker processes (in order); a :class:`DataError` is returned
    in its item's place, so a caller can stop at the first or list them all."""

    def guarded(item: T) -> R | DataError:
        try:
            return fn(item)
        except DataError as exc:
            return exc

    if workers <= 1 or len(items) <= 1:
        return [guarded(item) for item in items]
    # fork is cheap (no re-import of torch); elsewhere spawn is the only safe start method
    context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    results: list[R | DataError] = []
    with ProcessPoolExecutor(min(workers, len(items)), mp_context=context,
                             initializer=_init_worker) as pool:
        futures = [pool.submit(fn, item) for item in items]
        for future in futures:
            try:
                results.append(future.result())
            except DataError as exc:
                results.append(exc)
    return results


@dataclass
class CacheStats:
    """How a load used the cache (tests and the benchmark script read it)."""

    computed: int = 0
    reused: int = 0
    seconds: float = 0.0
    #: Native-resolution label maps added to entries (val/test with evaluate_at: native).
    native_computed: int = 0


def prepare(
    sources: Sequence[CaseSource], prep: Prep, mode: Mode, directory: Path, workers: int,
    stats: CacheStats,
) -> list[tuple[Path, CaseMeta]]:
    """The cache entry of every source, preprocessing the missing ones in parallel. Raises
    the first :class:`DataError` (in case order) after all workers finish."""
    import time

    t0 = time.perf_counter()
    entries = [directory / entry_key(s, prep, mode) for s in sources]
    missing = [Job(s, prep, mode, str(e)) for s, e in zip(sources, entries, strict=True)
               if not (e / "meta.json").is_file()]
    results = run_parallel(_build, missing, default_workers(workers))
    for result in results:
        if isinstance(result, DataError):
            raise result
    stats.computed += len(missing)
    stats.reused += len(sources) - len(missing)
    stats.seconds += time.perf_counter() - t0
    return [(e, CaseMeta.from_json((e / "meta.json").read_text())) for e in entries]


def _build_native(job: Job) -> None:
    write_native_label(Path(job.directory), native_label(job.source))


def ensure_native(sources: Sequence[CaseSource], entries: Sequence[Path], workers: int,
                  stats: CacheStats) -> None:
    """Give every labeled entry its ``native_label.npy`` (read in parallel where missing)."""
    missing = [Job(s, Prep(), "labeled", str(e)) for s, e in zip(sources, entries, strict=True)
               if not (Path(e) / "native_label.npy").is_file()]
    for result in run_parallel(_build_native, missing, default_workers(workers)):
        if isinstance(result, DataError):
            raise result
    stats.native_computed += len(missing)


class CachedVolumes(TorchDataset):
    """Cached cases, memory-mapped per access: ``image`` or ``(image, label)``.

    ``lut`` maps raw label values to class indices (e.g. BraTS 4 -> 3).
    """

    def __init__(self, entries: Sequence[Path], labeled: bool, lut: np.ndarray | None = None,
                 ids: Sequence[str] = ()) -> None:
        self.entries = [Path(e) for e in entries]
        self.labeled = labeled
        self.lut = lut
        self.ids = list(ids)

    def __len__(self) -> int:
        return len(self.entries)

    def image(self, index: int) -> torch.Tensor:
        array = np.load(self.entries[index] / "image.npy", mmap_mode="r")
        return torch.from_numpy(np.asarray(array, dtype=np.float32))

    def __getitem__(self, index: int) -> Any:
        if not 0 <= index < len(self.entries):
            raise IndexError(index)
        image = self.image(index)
        if not self.labeled:
            return image
        raw = np.load(self.entries[index] / "label.npy", mmap_mode="r")
        label = self.lut[np.asarray(raw)] if self.lut is not None else np.asarray(raw, dtype=np.int64)
        return image, torch.from_numpy(np.ascontiguousarray(label, dtype=np.int64))


class NoLabels(TorchDataset):
    """A labeled split that cannot be used: the labeled splits of a pretraining-only corpus
    (LUNA16, an unlabeled folder), or a split left empty because there are too few patients.

    Asking for its length or an item raises a :class:`DataError` with ``message``, so a
    protocol that fine-tunes on it stops with that message instead of a confusing empty run.
    Protocols that only pretrain on a corpus check ``info.extra["pretraining_only"]`` first.
    """

    def __init__(self, message: str) -> None:
        self.message = message

    def __len__(self) -> int:
        raise DataError(self.message)

    def __getitem__(self, index: int) -> Any:
        raise DataError(self.message)


class NativeVolumes(CachedVolumes):
    """Labeled cached cases that are evaluated on their original voxel grid: the engine
    calls :meth:`native_target` per case (see :mod:`medssl_bench.volumetric`)."""

    def native_target(self, index: int) -> Any:
        from medssl_bench.volumetric import NativeTarget

        entry = self.entries[index]
        meta = CaseMeta.from_json((entry / "meta.json").read_text())
        raw = np.load(entry / "native_label.npy", mmap_mode="r")
        label = self.lut[np.asarray(raw)] if self.lut is not None else np.asarray(raw, dtype=np.int64)
        return NativeTarget(torch.from_numpy(np.ascontiguousarray(label, dtype=np.int64)),
                            meta.orientation or None, meta.crop)
