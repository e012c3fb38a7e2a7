"""Models Genesis (Zhou et al., MedIA 2021): restore sub-volumes from transformed ones.

Each sample is flipped (input and target alike), then undergoes, each with its own
probability, local pixel shuffling, a non-linear (Bezier) intensity transform and one of
outer- or inner-cutout (mutually exclusive), in the reference code's order. An
encoder-decoder with skip connections restores the original under an MSE loss, and both
encoder and decoder transfer: segmentation fine-tuning starts from the pretrained decoder
with only its output layer replaced.

Output: the decoder's single-channel-per-input-channel map goes through a sigmoid before
the MSE, as in the reference PyTorch U-Net (targets are in [0, 1]); the sigmoid is not part
of the decoder, so the transferred weights are those of the plain decoder.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import Tensor, nn
from torch.nn import functional as F

from medssl_bench.config import PluginConfig
from medssl_bench.interfaces import Backbone, Encoder, ProxyTask
from medssl_bench_tasks.restoration import (
    box_mask,
    code_cutout_boxes,
    local_shuffle,
    nonlinear_intensity,
    paper_cutout_boxes,
    rand,
    random_flips,
    shuffle_window_sides,
)

Transform = Literal["nonlinear", "local_shuffle", "outer_cutout", "inner_cutout", "identity"]
ALL_TRANSFORMS: list[str] = ["nonlinear", "local_shuffle", "outer_cutout", "inner_cutout"]


class GenesisConfig(PluginConfig):
    """Models Genesis options: paper defaults; the reference code's values where it differs
    (reference/proxy-tasks.md, section 3) are documented alternatives."""

    transforms: list[Transform] = Field(
        default_factory=lambda: list(ALL_TRANSFORMS),
        description="Transformations in play: the combined scheme uses all four (paper); one "
        "name is an individual scheme of the paper's ablation; [] or [identity] is the "
        "identity mapping (input = target, flips only).",
    )
    flip_rate: float = Field(
        default=0.4, ge=0, le=1,
        description="Flip again while U[0,1) < flip_rate (reference config.flip_rate 0.4); "
        "flips apply to input and target alike (augmentation, not a transformation).")
    max_flips: int = Field(default=3, ge=0, description="At most this many flips (reference: 3).")
    flip_axes: list[int | None] = Field(
        default_factory=lambda: [None, 0, 1],
        description="Each flip picks uniformly from these spatial axes; null is a no-op. The "
        "reference picks numpy axis 0-2 of a (channel, x, y, z) cube: channel (a no-op for "
        "1-channel CT), x or y, hence [null, 0, 1].")
    local_shuffle_rate: float = Field(
        default=0.5, ge=0, le=1, description="Probability of local pixel shuffling "
        "(reference config.local_rate 0.5; the paper gives no value).")
    shuffle_windows: int = Field(
        default=1000, ge=1, description="Windows shuffled per sample: 1,000 in the paper, "
        "10,000 in the reference code (utils.py local_pixel_shuffling).")
    shuffle_max_side: float = Field(
        default=0.1, gt=0, le=1, description="Largest window side as a fraction of each axis "
        "(reference code: U{1..dim//10}; the paper only says smaller than the receptive field).")
    shuffle_permutation: Literal["separable", "full"] = Field(
        default="separable", description="separable: permute a window's rows, columns and "
        "slices (the paper's P W P'); full: any permutation of its voxels (the reference "
        "code's flatten-and-shuffle).")
    nonlinear_rate: float = Field(
        default=0.9, ge=0, le=1, description="Probability of the Bezier intensity transform "
        "(reference config.nonlinear_rate 0.9).")
    decreasing_rate: float = Field(
        default=0.5, ge=0, le=1, description="Share of Bezier curves inverted to decreasing "
        "(reference: 0.5; the paper shows both).")
    bezier_points: int = Field(
        default=2048, ge=16, description="Points sampled on each Bezier curve before the "
        "look-up table is interpolated from them (reference: 100,000 points fed to np.interp "
        "per voxel; ours feeds a per-sample table, so fewer points suffice).")
    bezier_table: int = Field(
        default=2048, ge=16, description="Entries of the per-sample intensity look-up table, "
        "linearly interpolated per voxel (ours; the reference interpolates its 100,000 curve "
        "points directly).")
    paint_rate: float = Field(
        default=0.9, ge=0, le=1, description="Probability of a cutout (reference "
        "config.paint_rate 0.9).")
    inner_rate: float = Field(
        default=0.2, ge=0, le=1, description="Among cutouts, the share that is inner-cutout, "
        "the rest outer-cutout (reference config.inpaint_rate 0.2).")
    cutout_scheme: Literal["paper", "code"] = Field(
        default="paper", description="paper: <= cutout_max_windows superimposed windows "
        "masking a fraction inside inner/outer_cutout_fraction (paper: under 1/4); code: the "
        "reference code's boxes (inner <= 5 boxes of sides d/6-d/3, ~5.5% masked; outer 1-5 "
        "kept boxes of sides 3d/7-4d/7, ~68% masked).")
    cutout_max_windows: int = Field(
        default=10, ge=1, description="Most windows per cutout in the paper scheme (paper: "
        "an arbitrary number <= 10).")
    inner_cutout_fraction: tuple[float, float] = Field(
        default=(0.1, 0.25), description="Masked fraction range of inner-cutout, paper "
        "scheme (paper: under 1/4, 'around 25%'; the lower bound is ours).")
    outer_cutout_fraction: tuple[float, float] = Field(
        default=(0.1, 0.25), description="Masked fraction range of outer-cutout, paper "
        "scheme (paper: under 1/4; the lower bound is ours).")

    @field_validator("transforms")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))

    @field_validator("inner_cutout_fraction", "outer_cutout_fraction")
    @classmethod
    def _fraction(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 < value[0] <= value[1] < 1:
            raise ValueError("need 0 < low <= high < 1")
        return value

    @model_validator(mode="after")
    def _identity_alone(self) -> GenesisConfig:
        if "identity" in self.transforms and len(self.transforms) > 1:
            raise ValueError("'identity' excludes every other transform; use [identity] or []")
        return self


class Genesis3D(ProxyTask):
    """Models Genesis: restore 3D sub-volumes after non-linear, shuffling and cutout transforms."""

    name = "genesis3d"
    family = "restoration"
    spatial_dims = 3
    transfers = ("encoder", "decoder")
    paper_input_size = (64, 64, 32)
    min_input_size = (16, 16, 16)
    Config = GenesisConfig

    def build_heads(self, backbone: Backbone, encoder: Encoder) -> nn.ModuleDict:
        decoder = backbone.build_decoder(encoder, encoder.in_channels, skip_connections=True)
        return nn.ModuleDict({"decoder": decoder})

    def transform(self, images: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(transformed input, target) for a ``(B, C, D, H, W)`` batch in [0, 1]."""
        cfg = self.config
        batch, device = images.shape[0], images.device
        spatial = tuple(images.shape[2:])
        target = random_flips(images, cfg.flip_rate, cfg.max_flips, cfg.flip_axes, generator)
        x = target
        chosen = set(cfg.transforms) - {"identity"}
        if "local_shuffle" in chosen:
            active = rand((batch,), generator, device) < cfg.local_shuffle_rate
            sides = shuffle_window_sides(spatial, cfg.shuffle_max_side)
            x = local_shuffle(x, cfg.shuffle_windows, sides, generator, active,
                              cfg.shuffle_permutation == "separable")
        if "nonlinear" in chosen:
            gate = rand((batch,), generator, device) < cfg.nonlinear_rate
            x, _, _ = nonlinear_intensity(x, generator, cfg.bezier_points, cfg.bezier_table,
                                          cfg.decreasing_rate, gate)
        kinds = [k for k in ("inner", "outer") if f"{k}_cutout" in chosen]
        if kinds:
            mask = self.cutout_mask(batch, spatial, kinds, generator, device)[0][:, None]
            mask = mask.expand_as(x)
            # U[0,1) noise only where masked (the reference fills cutouts with uniform noise).
            noise = rand((int(mask.sum()),), generator, device).to(x.dtype)
            x = x.masked_scatter(mask, noise)
        return x, target

    def cutout_mask(
        self, batch: int, spatial: tuple[int, ...], kinds: list[str], generator, device
    ) -> tuple[Tensor, Tensor]:
        """``(B, D, H, W)`` voxels replaced by noise, and per sample which cutout made them
        (0 none, 1 inner, 2 outer): with ``paint_rate`` a cutout, inner with share
        ``inner_rate`` when both are in play, else outer; one choice per sample, so the two
        never both apply."""
        cfg = self.config
        paint = rand((batch,), generator, device) < cfg.paint_rate
        share = cfg.inner_rate if len(kinds) == 2 else float(kinds == ["inner"])
        inner = rand((batch,), generator, device) < share
        boxes = {}
        for kind in ("inner", "outer"):
            if cfg.cutout_scheme == "code":
                boxes[kind] = code_cutout_boxes(batch, spatial, kind, generator, device)
            else:
                low, high = getattr(cfg, f"{kind}_cutout_fraction")
                window = (low, high) if kind == "inner" else (1 - high, 1 - low)
                boxes[kind] = paper_cutout_boxes(batch, spatial, window, cfg.cutout_max_windows,
                                                 generator, device)
        k = max(boxes["inner"][0].shape[1], boxes["outer"][0].shape[1])
        picked = []
        for part_in, part_out in zip(boxes["inner"], boxes["outer"], strict=True):
            part_in, part_out = _pad_boxes(part_in, k), _pad_boxes(part_out, k)
            sel = inner.view(-1, *([1] * (part_in.dim() - 1)))
            picked.append(torch.where(sel, part_in, part_out))
        windows = box_mask(*picked, spatial)
        masked = torch.where(inner[:, None, None, None], windows, ~windows)
        kind = torch.where(paint, torch.where(inner, 1, 2), 0)
        return masked & paint[:, None, None, None], kind

    def make_batch(self, images: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        with torch.autocast(images.device.type, enabled=False):
            inputs, targets = self.transform(images.float(), generator)
        return {"inputs": inputs, "targets": targets}

    def compute_loss(self, encoder, heads, batch):
        restored = torch.sigmoid(heads["decoder"](encoder(batch["inputs"])).float())
        loss = F.mse_loss(restored, batch["targets"].float())
        return loss, {}


def _pad_boxes(part: Tensor, k: int) -> Tensor:
    """Pad a ``(B, K, ...)`` box tensor to ``k`` boxes (padding boxes are unused/empty)."""
    if part.shape[1] == k:
        return part
    pad = torch.zeros((part.shape[0], k - part.shape[1], *part.shape[2:]), dtype=part.dtype,
                      device=part.device)
    return torch.cat([part, pad], 1)
