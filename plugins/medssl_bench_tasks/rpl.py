"""Relative patch location (Doersch et al.; 3D version of Taleb et al. 2020, section 3.2).

A 3x3x3 grid of jittered patches is cut from each volume; the network sees the centre patch
and one query patch and predicts which of the 26 other cells the query came from.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor, nn

from medssl_bench.config import PluginConfig
from medssl_bench.interfaces import Backbone, Encoder, ProxyTask
from medssl_bench_tasks.common import MLPHead, classification_loss, randint
from medssl_bench_tasks.patches import PatchEmbedder, PatchGrid, extract_grid_patches


def query_cells(labels: Tensor, centre: int) -> Tensor:
    """Row-major cell index of each query label: labels skip the centre cell, so label
    ``centre`` and above map one cell further (26 labels over the 27 cells of a 3^3 grid)."""
    return labels + (labels >= centre).long()


class RelativePatchLocation3D(ProxyTask):
    """3D relative patch location: 26-way position of a query patch relative to the centre."""

    name = "rpl3d"
    family = "pretext-classification"
    spatial_dims = 3
    min_input_size = (16, 16, 16)

    class Config(PluginConfig):
        grid: int = Field(
            default=3, ge=3, le=7,
            description="Cells per side of the patch grid; odd so there is a centre cell "
            "(Taleb et al. appendix: 3x3x3, giving 26 classes).",
        )
        jitter: int = Field(
            default=3, ge=0,
            description="Random gap per axis between neighbouring patches: each patch is "
            "(cell - jitter) voxels, cropped at an offset 0..jitter inside its cell (appendix: 3; "
            "cell 42 and patch 39 at 128^3).",
        )
        embed_dim: int = Field(
            default=64, ge=1,
            description="Size of each patch's embedding before the two are concatenated "
            "(appendix: 64 for all patch-based tasks).",
        )
        hidden: int = Field(
            default=1024, ge=1,
            description="Width of the hidden ReLU layer of the classifier head (appendix).",
        )
        queries_per_volume: int = Field(
            default=1, ge=1, le=26,
            description="Query patches per volume per step, each with its own random position "
            "(the paper and reference code use one query per centre patch).",
        )
        patch_padding: Literal["multiple", "minimum"] = Field(
            default="multiple",
            description="How patches are zero-padded for the backbone: to the next multiple of "
            "its size multiple (what every backbone accepts) or only up to one multiple (enough "
            "for the pooling U-Net; the reference code fed unpadded 39^3 patches).",
        )

        @field_validator("grid")
        @classmethod
        def _odd(cls, value: int) -> int:
            if value % 2 == 0:
                raise ValueError(f"grid must be odd so there is a centre cell, got {value}")
            return value

    def _grid(self, spatial: tuple[int, ...]) -> PatchGrid:
        return PatchGrid.for_size(spatial, self.config.grid, self.config.jitter)

    @property
    def num_classes(self) -> int:
        return self.config.grid**self.spatial_dims - 1

    def check_input(self, image_shape: tuple[int, ...], channels: int) -> None:
        super().check_input(image_shape, channels)
        self._grid(tuple(image_shape))

    def build_heads(self, backbone: Backbone, encoder: Encoder) -> nn.ModuleDict:
        cfg = self.config
        return nn.ModuleDict({
            "patch_embed": PatchEmbedder.for_backbone(
                backbone, encoder, cfg.embed_dim, cfg.patch_padding
            ),
            "classifier": MLPHead(2 * cfg.embed_dim, cfg.hidden, self.num_classes),
        })

    def make_batch(self, images: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        """``patches`` ``(B, 1 + Q, C, *patch)``: the centre patch, then Q queries whose
        positions are ``labels`` ``(B, Q)``; ``starts`` are the patches' corner voxels."""
        geometry = self._grid(tuple(images.shape[2:]))
        batch = images.shape[0]
        labels = randint(self.num_classes, (batch, self.config.queries_per_volume),
                         generator, images.device)
        centre = torch.full((batch, 1), geometry.centre, dtype=torch.long, device=images.device)
        cells = torch.cat([centre, query_cells(labels, geometry.centre)], dim=1)
        patches, starts = extract_grid_patches(
            images, self.config.grid, self.config.jitter, generator, cells
        )
        return {"patches": patches, "labels": labels, "starts": starts}

    def compute_loss(self, encoder, heads, batch):
        patches = batch["patches"]
        batch_size, count = patches.shape[:2]
        embeddings = heads["patch_embed"](encoder, patches.flatten(0, 1))
        embeddings = embeddings.view(batch_size, count, -1)
        centre = embeddings[:, :1].expand(-1, count - 1, -1)
        pairs = torch.cat([centre, embeddings[:, 1:]], dim=-1).flatten(0, 1)
        logits = heads["classifier"](pairs)
        return classification_loss(logits, batch["labels"].flatten())
