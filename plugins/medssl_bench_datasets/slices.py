"""The 2D slices of any 3D dataset along one axis, for the paper's comparison of 3D tasks
with 2D tasks trained on slices (Taleb et al. 2020).

Every split of the source dataset becomes a split of slices, so the slices of one volume
never cross splits; segmentation targets are the matching label-map slices, classification
targets the volume's label.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field
from torch.utils.data import Dataset as TorchDataset

from medssl_bench.config import PluginConfig, validate_section
from medssl_bench.errors import ConfigError
from medssl_bench.interfaces import Dataset, DatasetInfo, DataSplits
from medssl_bench_datasets.common import stable_hash


class SliceView(TorchDataset):
    """Slices ``0, stride, 2*stride, ...`` along ``axis`` of every case of a 3D split."""

    def __init__(self, volumes: TorchDataset, depth: int, axis: int, stride: int,
                 labeled: bool) -> None:
        self.volumes = volumes
        self.axis = axis
        self.positions = list(range(0, depth, stride))
        self.labeled = labeled

    def __len__(self) -> int:
        return len(self.volumes) * len(self.positions)  # type: ignore[arg-type]

    def case_of(self, index: int) -> tuple[int, int]:
        """(volume index, slice position) of slice ``index``."""
        volume, k = divmod(index, len(self.positions))
        return volume, self.positions[k]

    def __getitem__(self, index: int) -> Any:
        if not 0 <= index < len(self):
            raise IndexError(index)
        volume, position = self.case_of(index)
        item = self.volumes[volume]
        image = item[0] if self.labeled else item
        image = image.select(self.axis + 1, position)  # dim 0 holds the channels
        if not self.labeled:
            return image
        target = item[1]
        if target.dim() == 3:  # a label map: its matching slice
            target = target.select(self.axis, position)
        return image, target


class Slices(Dataset):
    """2D slices of a 3D dataset along one axis (the 3D-against-2D comparison)."""

    name = "slices"
    spatial_dims = 2

    class Config(PluginConfig):
        source: str = Field(default="phantom3d",
                            description="Name of the 3D dataset to slice (see `bench plugins`).")
        source_config: dict[str, Any] = Field(
            default_factory=dict,
            description="The source dataset's settings, validated by its own Config "
            "(e.g. {size: 64} for phantom3d, {path: ...} for medmnist3d).")
        source_preset: Literal["quick", "paper"] | None = Field(
            default=None,
            description="Apply the source dataset's own preset under source_config (the "
            "adapter's presets set it, so --preset reaches the source).")
        axis: int = Field(default=0, ge=0, le=2,
                          description="Spatial axis to slice along (0 = the first of D, H, W).")
        stride: int = Field(default=1, ge=1,
                            description="Keep every stride-th slice (neighbours are nearly "
                            "identical; 1 keeps all).")
        label_unit: Literal["volume", "slice"] = Field(
            default="volume",
            description="What a label fraction counts: 'volume' = that share of the annotated "
            "training volumes with all their slices (a fair comparison with the 3D tasks: the "
            "same annotation effort), 'slice' = that share of the individual slices.")

    presets = {"quick": {"source_preset": "quick", "stride": 4},
               "paper": {"source_preset": "paper"}}

    def __init__(self, config: PluginConfig | None = None) -> None:
        super().__init__(config)
        self.source = self._build_source()

    def _build_source(self) -> Dataset:
        from medssl_bench.plugins import get_registry

        cfg = self.config
        cls = get_registry().get("dataset", cfg.source)
        if cls is Slices or getattr(cls, "spatial_dims", None) != 3:
            raise ConfigError(
                f"dataset.source {cfg.source!r} is not a 3D dataset; the slices adapter needs "
                "one (e.g. phantom3d, medmnist3d)."
            )
        values = dict(cls.presets.get(cfg.source_preset, {})) if cfg.source_preset else {}
        values.update(cfg.source_config)
        return cls(validate_section(cls.Config, values, "dataset.source_config"))

    def load(self) -> DataSplits:
        cfg = self.config
        data = self.source.load()
        info = data.info
        if len(info.image_size) != 3:
            raise ConfigError(f"dataset.source {cfg.source!r} gives {info.image_size}, not 3D.")
        depth = info.image_size[cfg.axis]
        size = tuple(s for i, s in enumerate(info.image_size) if i != cfg.axis)

        def view(split: TorchDataset, labeled: bool) -> SliceView:
            return SliceView(split, depth, cfg.axis, cfg.stride, labeled)

        train = view(data.train, True)
        volume_ids = data.train_ids or [str(i) for i in range(len(data.train))]
        train_ids = [f"{volume_ids[v]}/{cfg.axis}:{p}"
                     for v, p in map(train.case_of, range(len(train)))]
        return DataSplits(
            info=DatasetInfo(
                kind=info.kind, num_classes=info.num_classes, channels=info.channels,
                image_size=size, class_names=info.class_names, metrics=info.metrics,
                main_metric=info.main_metric,
                extra={**info.extra, "source": cfg.source, "axis": cfg.axis},
            ),
            unlabeled=view(data.unlabeled, False),
            train=train,
            val=view(data.val, True),
            test=view(data.test, True),
            split_hash=stable_hash({"source": cfg.source, "split": data.split_hash,
                                    "axis": cfg.axis, "stride": cfg.stride}),
            train_ids=train_ids,
            train_groups=([volume_ids[train.case_of(i)[0]] for i in range(len(train))]
                          if cfg.label_unit == "volume" else []),
        )
