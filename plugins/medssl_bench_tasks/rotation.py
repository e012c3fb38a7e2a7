"""Rotation prediction (Gidaris et al.; 3D version of Taleb et al. 2020, section 3.4)."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from medssl_bench.config import PluginConfig
from medssl_bench.errors import ConfigError
from medssl_bench.interfaces import Backbone, Encoder, ProxyTask
from medssl_bench_tasks.common import MLPHead, classification_loss, randint

#: The 10 classes of the reference code (preprocess_rotation.py): (k, spatial axes) for
#: ``torch.rot90``; class 0 is the identity. Axes index the spatial dims (D, H, W).
ROTATIONS_3D: tuple[tuple[int, tuple[int, int]], ...] = (
    (0, (0, 1)),
    (1, (0, 1)), (2, (0, 1)), (3, (0, 1)),
    (3, (1, 2)), (2, (1, 2)), (1, (1, 2)),
    (3, (0, 2)), (2, (0, 2)), (1, (0, 2)),
)


def rotate(volumes: Tensor, label: int, inverse: bool = False) -> Tensor:
    """Rotate ``(N, C, D, H, W)`` volumes by rotation class ``label`` (or undo it)."""
    k, (a, b) = ROTATIONS_3D[label]
    return torch.rot90(volumes, -k if inverse else k, dims=(a + 2, b + 2))


def rotate_batch(volumes: Tensor, labels: Tensor) -> Tensor:
    """Rotate each volume by its own class; one ``rot90`` per class present, not per sample."""
    out = torch.empty_like(volumes)
    for label in range(len(ROTATIONS_3D)):
        index = (labels == label).nonzero().flatten()
        if index.numel():
            out[index] = rotate(volumes[index], label)
    return out


class Rotation3D(ProxyTask):
    """3D rotation prediction: 10 classes of multiples of 90 degrees about the three axes."""

    name = "rotation3d"
    spatial_dims = 3

    class Config(PluginConfig):
        copies_per_volume: int = Field(
            default=4, ge=1, le=10,
            description="Rotated copies of each volume per step, each with its own random class "
            "(the paper creates multiple rotated versions per scan; the reference code uses 1).",
        )
        hidden: int = Field(
            default=1024, ge=1,
            description="Width of the hidden ReLU layer before the classifier (appendix).",
        )

    def check_input(self, image_shape, channels) -> None:
        super().check_input(image_shape, channels)
        if len(set(image_shape)) != 1:
            raise ConfigError(
                f"Task 'rotation3d' rotates by 90 degrees about every axis and needs cubic "
                f"volumes, but the dataset gives {tuple(image_shape)}. Resize the dataset to a cube."
            )

    def build_heads(self, backbone: Backbone, encoder: Encoder) -> nn.ModuleDict:
        return nn.ModuleDict(
            {"classifier": MLPHead(encoder.embed_dim, self.config.hidden, len(ROTATIONS_3D))}
        )

    def make_batch(self, images: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        copies = images.repeat_interleave(self.config.copies_per_volume, dim=0)
        labels = randint(len(ROTATIONS_3D), (copies.shape[0],), generator, images.device)
        return {"inputs": rotate_batch(copies, labels), "labels": labels}

    def compute_loss(self, encoder, heads, batch):
        logits = heads["classifier"](encoder.embed(batch["inputs"]))
        return classification_loss(logits, batch["labels"])
