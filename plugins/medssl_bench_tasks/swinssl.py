"""Swin UNETR pretraining (Tang et al., CVPR 2022): inpainting, rotation and contrastive coding.

Each volume gives two views; each view is turned by a random multiple of 90 degrees in one
plane (4 classes) and then corrupted by inner cutouts (boxes filled with noise: "masked
volume inpainting"). One encoder pass over both corrupted views feeds three heads, whose
losses are summed with weights 1, 1, 1:

- **inpainting**: a decoder reconstructs the rotated, uncorrupted view; L1 over the whole
  volume (the authors' code), or over the cut-out voxels only (``inpaint_region: masked``);
- **rotation**: a linear classifier of the 4 turns, cross-entropy;
- **contrastive coding**: a linear projection to 512 dimensions; NT-Xent with temperature 0.5
  where each view's positive is the other view of its volume and its negatives are the other
  ``2B - 2`` views of the batch.

Backbone: the paper pretrains a Swin UNETR (Swin transformer encoder): MONAI's
(``swinunetr``) is the default when no ``--backbone`` is given (``preferred_backbone``), and
the task runs on **any 3D backbone** (the contract tests run it on each). On ``swinunetr`` the
pooled deepest features are the Swin transformer's last output. Where the authors' head
reads one token of the deepest Swin features for the rotation head (token 0) and another for
the contrastive head (token 1), both heads here read the globally pooled deepest features
(``global_pool(encoder(x))``). The reconstruction head is the backbone's own decoder without
skip connections (``backbone.build_decoder(encoder, C, skip_connections=False)``), the analogue
of the authors' upsampling head that sees only the deepest features; ``reconstruction_skips``
gives it the skips. Only the encoder transfers (the authors fine-tune from the Swin encoder).

Family: ``restoration``. Of the three terms, inpainting is the only dense one and the one
that, as in Models Genesis' inner cutout, restores a whole corrupted volume (noise-filled
boxes, L1 on every voxel, no mask token), which is restoration rather than masked modelling
(whose loss is on masked patches of a masked input); rotation is a global pretext
classification and contrastive coding a global instance discrimination, each one term of
equal weight beside it.

Facts used (sources):

- Loss weights ``lambda_1 = lambda_2 = lambda_3 = 1`` (Project-MONAI/research-contributions
  ``SwinUNETR/Pretrain/losses/loss.py``, alpha1-3; nnssl ``SwinUNETRTrainer``, "from paper").
- Rotation: 4 classes, 0/90/180/270 degrees, ``rot90`` over the last two spatial axes of each
  sub-volume (``utils/ops.py`` ``rot_rand``: dims (2, 3) of ``(C, H, W, D)``); here the same
  axes by position, (H, W) of our ``(D, H, W)`` volumes, i.e. a turn about D
  (``rotation_axes``). Each view draws its own turn.
- Inner cutout (``utils/ops.py`` ``patch_rand_drop``): a share ``U(0, 0.3)`` of the voxels
  (the paper's 30 % ROI dropping rate, Sec. 5.2 and App. E as cited by nnssl) is dropped in
  boxes placed until their summed volume reaches it, each side in ``[5 %, 25 %)`` of the axis,
  filled with Gaussian noise min-max scaled to [0, 1]. The code then drops as much again
  with the content of another volume of the batch (up to 60 % in all, nnssl notes);
  ``cutout_from_other: true`` does that (default false: the paper's 30 %).
- Contrastive temperature 0.5 and projection size 512 (``losses/loss.py`` ``Contrast``,
  ``models/ssl_head.py``); the denominator holds every other view, the positive included.
- Input 96^3 sub-volumes, batch 2 (``main.py`` roi_x/y/z, batch_size).

Deviations (ours): the noise is drawn per voxel and min-max scaled per view over the dropped
voxels (the code scales per box); boxes are drawn in batched chunks for the whole batch, one
loop over chunks of boxes, never over samples.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn
from torch.nn import functional as F

from medssl_bench.config import PluginConfig, since
from medssl_bench.errors import ConfigError
from medssl_bench.interfaces import Backbone, Encoder, ProxyTask, global_pool
from medssl_bench_tasks.common import gather_with_grad

#: Boxes drawn per chunk while a batch's cutouts are placed.
BOX_CHUNK = 32


class SwinSSLConfig(PluginConfig):
    """Swin UNETR pretraining options: the paper's and the authors' code's values."""

    inpaint_weight: float = Field(
        default=1.0, ge=0, description="Weight of the inpainting L1 loss (paper and code: 1).")
    rotation_weight: float = Field(
        default=1.0, ge=0, description="Weight of the rotation loss (paper and code: 1).")
    contrastive_weight: float = Field(
        default=1.0, ge=0, description="Weight of the contrastive loss (paper and code: 1).")
    temperature: float = Field(
        default=0.5, gt=0,
        description="NT-Xent temperature (code: losses/loss.py Contrast, 0.5; nnssl 0.5).")
    gather_negatives: bool = Field(
        default=True, json_schema_extra=since("0.2"), description="Under DDP, contrast every "
        "view with the views of every rank (the global batch, as one process would), "
        "gathering the projections with gradient for the local part; a no-op in one process.")
    projection_dim: int = Field(
        default=512, ge=1,
        description="Size of the contrastive projection (code: Linear(dim, 512)).")
    rotation_axes: tuple[int, int] = Field(
        default=(1, 2),
        description="Spatial axes (0 = D, 1 = H, 2 = W) of the plane of the 4 turns: (1, 2), "
        "the last two spatial axes as in the code's rot90 over dims (2, 3) of a (C, H, W, D) "
        "sub-volume; a turn about D, our slice axis.")
    drop_fraction: tuple[float, float] = Field(
        default=(0.0, 0.3),
        description="Share of the voxels to drop per cutout pass, uniform in [low, high) "
        "(code: U(0, max_drop = 0.3); paper: 30 % ROI dropping rate).")
    box_fraction: tuple[float, float] = Field(
        default=(0.05, 0.25),
        description="Each cutout box side as a fraction of its axis, uniform in [low, high) "
        "(code: tolr 0.05, max_block_sz 0.25), at least one voxel.")
    cutout_from_other: bool = Field(
        default=False,
        description="Also cut out a second pass filled with another volume of the batch "
        "(code: aug_rand, when the random other index differs; up to 60 % dropped); false: "
        "noise cutouts only (the paper's 30 %).")
    inpaint_region: Literal["all", "masked"] = Field(
        default="all",
        description="all: L1 over every voxel (code: L1Loss(reconstruction, rotated view)); "
        "masked: over the cut-out voxels only (the masked-modelling reading).")
    reconstruction_skips: bool = Field(
        default=False,
        description="Give the reconstruction decoder skip connections (false: it sees only "
        "the deepest features, as the authors' upsampling head does).")

    @model_validator(mode="after")
    def _check(self) -> SwinSSLConfig:
        a, b = self.rotation_axes
        if a == b or not {a, b} <= {0, 1, 2}:
            raise ValueError("rotation_axes needs two different spatial axes among 0, 1, 2")
        if not 0 <= self.drop_fraction[0] <= self.drop_fraction[1] < 1:
            raise ValueError("drop_fraction needs 0 <= low <= high < 1")
        if not 0 < self.box_fraction[0] <= self.box_fraction[1] <= 1:
            raise ValueError("box_fraction needs 0 < low <= high <= 1")
        if self.inpaint_weight + self.rotation_weight + self.contrastive_weight == 0:
            raise ValueError("at least one loss weight must be positive")
        return self


def rotate_each(volumes: Tensor, turns: Tensor, axes: tuple[int, int]) -> Tensor:
    """Volume ``r`` turned ``turns[r]`` quarter turns in the plane of spatial ``axes``: one
    ``rot90`` per turn present (4 at most), never one per sample. The plane must be square."""
    dims = (axes[0] + 2, axes[1] + 2)
    out = torch.empty_like(volumes)
    for k in range(4):
        rows = (turns == k).nonzero().flatten()
        if rows.numel():
            out[rows] = torch.rot90(volumes[rows], k, dims)
    return out


def cutout_mask(
    batch: int, spatial: tuple[int, ...], drop: tuple[float, float], box: tuple[float, float],
    generator: torch.Generator, device,
) -> Tensor:
    """``(B, *spatial)`` boolean union of cutout boxes: per volume a target share ``U[drop)``
    of the voxels, then boxes (sides ``U[box)`` of each axis, at least 1 voxel, starts uniform
    with the box inside the volume) added until their summed volume (overlaps counted, as the
    code counts them) reaches the target.

    Boxes are drawn in chunks of :data:`BOX_CHUNK` for the whole batch until every volume has
    reached its target; the union is painted in one pass, whatever the number of boxes: +-1 at
    each box's 8 corners (inclusion-exclusion), then a cumulative sum along each axis gives
    every voxel's cover count."""
    starts, ends, active = cutout_boxes(batch, spatial, drop, box, generator, device)
    return paint_boxes(starts, ends, active, spatial)


def cutout_boxes(
    batch: int, spatial: tuple[int, ...], drop: tuple[float, float], box: tuple[float, float],
    generator: torch.Generator, device,
) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """The boxes of :func:`cutout_mask`: per axis ``(B, N)`` starts and ends (exclusive), and
    ``(B, N)`` which of them are placed."""
    voxels = 1
    for dim in spatial:
        voxels *= dim
    low, high = drop
    target = (low + (high - low) * torch.rand(batch, generator=generator, device=device)) * voxels
    done = torch.zeros(batch, device=device)
    all_starts: list[list[Tensor]] = [[] for _ in spatial]
    all_ends: list[list[Tensor]] = [[] for _ in spatial]
    all_active: list[Tensor] = []
    while True:
        sizes = []
        for axis, dim in enumerate(spatial):
            frac = box[0] + (box[1] - box[0]) * torch.rand(
                (batch, BOX_CHUNK), generator=generator, device=device)
            size = (frac * dim).long().clamp(1, dim)
            start = (torch.rand((batch, BOX_CHUNK), generator=generator, device=device)
                     * (dim - size + 1)).long().minimum(dim - size)
            sizes.append(size)
            all_starts[axis].append(start)
            all_ends[axis].append(start + size)
        volume = sizes[0] * sizes[1] * sizes[2]
        before = done[:, None] + volume.cumsum(1) - volume  # summed volume before each box
        active = before < target[:, None]
        done = done + (volume * active).sum(1)
        all_active.append(active)
        if not bool((done < target).any()):
            break
    return ([torch.cat(x, 1) for x in all_starts], [torch.cat(x, 1) for x in all_ends],
            torch.cat(all_active, 1))


def paint_boxes(
    starts: list[Tensor], ends: list[Tensor], active: Tensor, spatial: tuple[int, ...]
) -> Tensor:
    """``(B, *spatial)`` union of the active boxes ``[start, end)`` per axis, in one pass."""
    batch, device = active.shape[0], active.device
    active = active.long()
    d, h, w = (dim + 1 for dim in spatial)
    corners = torch.zeros((batch, d * h * w), dtype=torch.long, device=device)
    for pick in range(8):
        ends_taken = [(pick >> axis) & 1 for axis in range(3)]
        at = [ends[a] if e else starts[a] for a, e in enumerate(ends_taken)]
        sign = -1 if sum(ends_taken) % 2 else 1
        corners.scatter_add_(1, (at[0] * h + at[1]) * w + at[2], sign * active)
    cover = corners.view(batch, d, h, w).cumsum(1).cumsum(2).cumsum(3)
    return cover[:, :-1, :-1, :-1] > 0


class SwinSSL3D(ProxyTask):
    """Swin UNETR pretraining: masked-volume inpainting, 4-class rotation and contrastive coding."""

    name = "swinssl3d"
    family = "restoration"
    preferred_backbone = "swinunetr"  # the paper's network (Tang et al. 2022)
    spatial_dims = 3
    paper_input_size = (96, 96, 96)
    min_input_size = (16, 16, 16)
    Config = SwinSSLConfig
    presets = {"quick": {"projection_dim": 128}, "paper": {}}

    def check_input(self, image_shape, channels) -> None:
        super().check_input(image_shape, channels)
        a, b = self.config.rotation_axes
        if image_shape[a] != image_shape[b]:
            raise ConfigError(
                f"Task 'swinssl3d' turns volumes by 90 degrees in the plane of spatial axes "
                f"{a} and {b}, which must be equal, but the dataset gives {tuple(image_shape)}. "
                f"Set task.rotation_axes to a square plane or resize the dataset.")

    def build_heads(self, backbone: Backbone, encoder: Encoder) -> nn.ModuleDict:
        cfg = self.config
        decoder = backbone.build_decoder(encoder, encoder.in_channels,
                                         skip_connections=cfg.reconstruction_skips)
        return nn.ModuleDict({
            "reconstruction": decoder,
            "rotation": nn.Linear(encoder.embed_dim, 4),
            "projection": nn.Linear(encoder.embed_dim, cfg.projection_dim),
        })

    def make_batch(self, images: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        """Rows ``r`` and ``r + B`` of every entry are the two views of image ``sources[r]``:
        ``targets`` the view turned by ``rotations``, ``inputs`` it after the cutouts,
        ``masks`` ``(2B, *spatial)`` the cut-out voxels."""
        cfg = self.config
        batch, device = images.shape[0], images.device
        spatial = tuple(images.shape[2:])
        with torch.autocast(device.type, enabled=False):
            sources = torch.arange(batch, device=device).repeat(2)
            rotations = torch.randint(4, (2 * batch,), generator=generator, device=device)
            targets = rotate_each(images.float()[sources], rotations, cfg.rotation_axes)
            inputs, masks = self._cutout(targets, spatial, generator)
        return {"inputs": inputs, "targets": targets, "masks": masks, "rotations": rotations,
                "sources": sources}

    def _cutout(self, views: Tensor, spatial, generator) -> tuple[Tensor, Tensor]:
        cfg = self.config
        n, device = views.shape[0], views.device
        mask = cutout_mask(n, spatial, cfg.drop_fraction, cfg.box_fraction, generator, device)
        noise = torch.randn(views.shape, generator=generator, device=device)
        wide = mask[:, None].expand_as(views)
        flat = noise.masked_fill(~wide, float("inf")).flatten(1)
        lo = flat.min(1).values
        hi = noise.masked_fill(~wide, float("-inf")).flatten(1).max(1).values
        ok = torch.isfinite(lo) & (hi > lo)
        scale = torch.where(ok, hi - lo, 1.0)
        noise = (noise - torch.where(ok, lo, 0.0).view(-1, *[1] * (views.dim() - 1))) \
            / scale.view(-1, *[1] * (views.dim() - 1))
        inputs = torch.where(wide, noise.clamp(0, 1), views)
        if cfg.cutout_from_other:
            # The code draws the other volume uniformly over the batch and skips when it
            # draws the volume itself.
            other = torch.randint(n, (n,), generator=generator, device=device)
            second = cutout_mask(n, spatial, cfg.drop_fraction, cfg.box_fraction, generator,
                                 device)
            second &= (other != torch.arange(n, device=device))[:, None, None, None]
            inputs = torch.where(second[:, None], inputs[other], inputs)
            mask = mask | second
        return inputs, mask

    def compute_loss(self, encoder, heads, batch):
        cfg = self.config
        features = encoder(batch["inputs"])
        pooled = global_pool(features)
        logs: dict[str, float] = {}
        loss = torch.zeros((), device=batch["inputs"].device)
        if cfg.inpaint_weight:
            recon = heads["reconstruction"](features).float()
            inpaint = inpaint_loss(recon, batch["targets"].float(), batch["masks"],
                                   cfg.inpaint_region)
            loss = loss + cfg.inpaint_weight * inpaint
            logs["inpaint"] = inpaint.item()
        if cfg.rotation_weight:
            logits = heads["rotation"](pooled).float()
            rotation = F.cross_entropy(logits, batch["rotations"])
            loss = loss + cfg.rotation_weight * rotation
            logs["rotation"] = rotation.item()
            logs["acc"] = (logits.argmax(1) == batch["rotations"]).float().mean().item()
        if cfg.contrastive_weight:
            contrast = nt_xent(heads["projection"](pooled).float(), cfg.temperature,
                               cfg.gather_negatives)
            loss = loss + cfg.contrastive_weight * contrast
            logs["contrast"] = contrast.item()
        return loss, logs


def inpaint_loss(recon: Tensor, target: Tensor, masks: Tensor, region: str) -> Tensor:
    """Mean absolute error over every voxel, or over the cut-out voxels only."""
    if region == "all":
        return F.l1_loss(recon, target)
    wide = masks[:, None].expand_as(target).to(recon.dtype)
    return ((recon - target).abs() * wide).sum() / wide.sum().clamp(min=1)


def nt_xent(embeddings: Tensor, temperature: float, gather: bool = False) -> Tensor:
    """NT-Xent over ``2B`` embeddings whose rows ``r`` and ``r + B`` are positives: for each
    row, cross-entropy of its cosine similarities / temperature to every other row (of this
    rank, or of every rank when ``gather`` under DDP), the positive being the target (the
    code's Contrast loss, written as a cross-entropy)."""
    n = embeddings.shape[0]
    half = n // 2
    z = F.normalize(embeddings, dim=1)
    keys, offset = gather_with_grad(z) if gather else (z, 0)
    sim = z @ keys.t() / temperature
    rows = torch.arange(n, device=z.device)
    own = torch.zeros_like(sim, dtype=torch.bool)
    own[rows, rows + offset] = True
    sim = sim.masked_fill(own, float("-inf"))
    return F.cross_entropy(sim, (rows + half) % n + offset)
