"""Small pieces shared by dataset plugins."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset as TorchDataset


def stable_hash(payload: Any, length: int = 16) -> str:
    """A short SHA-256 of a JSON-serialisable payload (keys sorted)."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed derived from any parts, stable across processes and platforms."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class LazyCases(TorchDataset):
    """Cases produced on demand by ``make(index)``, optionally memoised in memory."""

    def __init__(
        self,
        count: int,
        make: Callable[[int], Any],
        labeled: bool,
        cache: bool = True,
    ) -> None:
        self.count = count
        self.make = make
        self.labeled = labeled
        self.cache: dict[int, Any] | None = {} if cache else None

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> Any:
        if not 0 <= index < self.count:
            raise IndexError(index)
        if self.cache is not None and index in self.cache:
            item = self.cache[index]
        else:
            item = self.make(index)
            if self.cache is not None:
                self.cache[index] = item
        return item if self.labeled else item[0]


class ArrayCases(TorchDataset):
    """Images held as a uint8 array ``(N, *spatial)`` or ``(N, C, *spatial)``, scaled to [0, 1]
    per item, with optional integer targets."""

    def __init__(self, images: Any, targets: Sequence[int] | None, channel_axis: bool) -> None:
        self.images = images
        self.targets = None if targets is None else torch.as_tensor(targets, dtype=torch.long)
        self.channel_axis = channel_axis

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Any:
        image = torch.from_numpy(self.images[index].astype("float32") / 255.0)
        if not self.channel_axis:
            image = image.unsqueeze(0)
        if self.targets is None:
            return image
        return image, self.targets[index]
