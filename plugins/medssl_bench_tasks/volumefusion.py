"""Volume Fusion (Wang et al. 2023, MIS-FM): segment the fusion coefficient of every voxel.

A foreground and a background volume are fused voxel by voxel, ``x = a * fg + (1 - a) * bg``,
with ``a`` taken from the discrete set ``{0, 1/K, ..., 1}`` and constant over random regions;
the network predicts, for every voxel, which of the ``K + 1`` coefficients made it. This is a
segmentation pretext (a pseudo-segmentation with ``K + 1`` classes under Dice + cross-entropy),
so an encoder-decoder with skip connections is trained and **both encoder and decoder
transfer**, as in Models Genesis: segmentation fine-tuning starts from the pretrained decoder
with only its output layer replaced.

Family: ``pretext-classification``. The target is a class per voxel, not intensities (the
nnssl implementation, MIC-DKFZ/nnssl ``VolumeFusionTrainer``, likewise notes that the
coefficients are classified, their order ignored); it is neither a restoration nor a masked
reconstruction nor contrastive.

Facts used (sources):

- Paper (arXiv 2306.16925, as quoted in nnssl ``VolumeFusionTrainer``): ``K = 4``, so the
  coefficients are ``{0, .25, .5, .75, 1}`` (5 classes); the foreground regions are boxes
  generated sequentially at various scales and aspect ratios, ``M ~ U(10, 40)`` of them, later
  boxes overwriting earlier ones (so each class's region can be irregular); at the paper's
  patch of 64 x 128 x 128 a box's depth is ``U(8, 40)`` and its height and width ``U(8, 80)``,
  i.e. 12.5-62.5 % of the depth and 6.25-62.5 % of height and width (the fractions are our
  defaults, so any input size works).
- Authors' code (HiLab-git/PyMIC ``pymic/transform/crop4vf.py``, ``VolumeFusion``): a
  different region scheme, offered as ``region_scheme: code``: one block size per sample
  (each side ``U[8, 32]`` voxels), the volume tiled by those blocks from a random offset, 70 %
  of the blocks (``foreground_ratio``) fused with a coefficient ``U{1..K}``, the rest
  background (class 0). Its foreground and background are two crops of the *same* scan
  (``Crop4VolumeFusion``); nnssl fuses two *different* scans (the two halves of a batch).
- Loss: Dice + cross-entropy, weighted 0.5 / 0.5 in the authors' PyMIC configs
  (``loss_type = [DiceLoss, CrossEntropyLoss]``, ``loss_weight = [0.5, 0.5]``); nnssl weighs
  them 1 / 1, which only rescales the loss.

Pairing (ours, documented in ``pairing``): by default fused volume ``i`` has image ``i`` as
background and image ``(i + 1) mod B`` as foreground, so every image serves once as each and
the batch keeps its size; ``halves`` is nnssl's pairing (first half foreground, second half
background, half as many fused volumes). A batch of one volume fuses it with its own mirror
image (flipped along every axis), never with itself.

Batch construction is batched torch on the images' device, no per-sample loop: the paper
scheme gives every box one bit and finds each voxel's top box as the highest bit of the AND of
its three axes' bit sets (a few whole-volume operations whatever the number of boxes; a loop
over boxes beyond 52); the code scheme gathers each voxel's block class.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import Tensor, nn
from torch.nn import functional as F

from medssl_bench.config import PluginConfig
from medssl_bench.errors import ConfigError
from medssl_bench.interfaces import Backbone, Encoder, ProxyTask

Triple = tuple[float, float, float]

#: Up to this many boxes, the paper scheme paints them at once with one bit per box.
BITMASK_BOXES = 52


class VolumeFusionConfig(PluginConfig):
    """Volume Fusion options: the MIS-FM paper's values; the authors' PyMIC code as options."""

    num_classes: int = Field(
        default=5, ge=2,
        description="Fusion coefficients {0, 1/K, ..., 1} with K = num_classes - 1, one class "
        "each (paper: K = 4, 5 classes; PyMIC VolumeFusion cls_num 5; nnssl 5).")
    region_scheme: Literal["paper", "code"] = Field(
        default="paper",
        description="paper: num_regions boxes drawn one after another, each with a random "
        "coefficient of the whole set (0 included), later boxes overwriting earlier ones; "
        "code: the authors' PyMIC VolumeFusion, a grid of equal blocks with foreground_ratio "
        "of them fused with a coefficient in 1..K.")
    num_regions: tuple[int, int] = Field(
        default=(10, 40),
        description="paper scheme: boxes per volume, uniform over low..high inclusive (paper: "
        "M ~ U(10, 40); nnssl draws 10..39).")
    region_min_fraction: Triple = Field(
        default=(0.125, 0.0625, 0.0625),
        description="paper scheme: smallest box side per axis (D, H, W) as a fraction of the "
        "input (paper: 8 voxels of 64 x 128 x 128).")
    region_max_fraction: Triple = Field(
        default=(0.625, 0.625, 0.625),
        description="paper scheme: largest box side per axis (D, H, W) as a fraction of the "
        "input (paper: 40 x 80 x 80 voxels of 64 x 128 x 128).")
    block_size: tuple[int, int] = Field(
        default=(8, 32),
        description="code scheme: each block side in voxels, uniform over low..high "
        "inclusive, one size per volume and axis (PyMIC patchsize_min/max 8 / 32), capped "
        "at the input's size.")
    foreground_ratio: float = Field(
        default=0.7, gt=0, le=1,
        description="code scheme: share of the blocks fused (PyMIC foreground_ratio 0.7).")
    pairing: Literal["next", "halves"] = Field(
        default="next",
        description="next: fused volume i = image (i+1) mod B over image i (every image is "
        "foreground once and background once; ours); halves: the first half of the batch "
        "over the second half, B // 2 fused volumes (nnssl).")
    dice_weight: float = Field(
        default=0.5, ge=0,
        description="Weight of the soft Dice loss (PyMIC configs: 0.5; nnssl: 1).")
    ce_weight: float = Field(
        default=0.5, ge=0,
        description="Weight of the cross-entropy loss (PyMIC configs: 0.5; nnssl: 1).")

    @field_validator("num_regions", "block_size")
    @classmethod
    def _range(cls, value: tuple[int, int]) -> tuple[int, int]:
        if not 1 <= value[0] <= value[1]:
            raise ValueError("need 1 <= low <= high")
        return value

    @model_validator(mode="after")
    def _fractions(self) -> VolumeFusionConfig:
        for low, high in zip(self.region_min_fraction, self.region_max_fraction, strict=True):
            if not 0 < low <= high <= 1:
                raise ValueError("region fractions need 0 < min <= max <= 1 on every axis")
        if self.dice_weight == 0 and self.ce_weight == 0:
            raise ValueError("dice_weight and ce_weight cannot both be 0")
        return self


def _uniform_int(low: Tensor | int, high: Tensor | int, size, generator, device) -> Tensor:
    """Integers uniform over ``low..high`` inclusive (tensors broadcast), from ``generator``."""
    u = torch.rand(size, generator=generator, device=device)
    low = torch.as_tensor(low, device=device)
    high = torch.as_tensor(high, device=device)
    return (low + (u * (high - low + 1).float()).floor().long()).minimum(high)


def paper_regions(
    batch: int, spatial: tuple[int, int, int], cfg: VolumeFusionConfig, generator, device
) -> Tensor:
    """``(B, D, H, W)`` class map of the paper's scheme: ``M_b ~ U{low..high}`` boxes per
    volume, each with a uniform class of ``0..K``, drawn in order, later ones on top."""
    low, high = cfg.num_regions
    count = _uniform_int(low, high, (batch,), generator, device)
    sizes, starts = [], []
    for axis, dim in enumerate(spatial):
        lo = max(1, round(cfg.region_min_fraction[axis] * dim))
        hi = max(lo, min(dim, round(cfg.region_max_fraction[axis] * dim)))
        size = _uniform_int(lo, hi, (batch, high), generator, device)
        start = _uniform_int(0, dim - size, (batch, high), generator, device)
        sizes.append(size)
        starts.append(start)
    classes = _uniform_int(0, cfg.num_classes - 1, (batch, high), generator, device)
    placed = torch.arange(high, device=device)[None] < count[:, None]
    coords = [torch.arange(dim, device=device) for dim in spatial]
    inside = [(c[None, None] >= s[..., None]) & (c[None, None] < (s + z)[..., None])
              for c, s, z in zip(coords, starts, sizes, strict=True)]  # (B, M, dim) per axis
    inside[0] &= placed[..., None]
    if high <= BITMASK_BOXES:
        # One bit per box: a voxel's boxes are the AND of its three axes' bit sets, and the
        # box on top is the highest set bit (exact in float64 below 2**53).
        bit = (2 ** torch.arange(high, device=device, dtype=torch.float64)).long()
        masks = [(x.long() * bit[None, :, None]).sum(1) for x in inside]  # (B, dim)
        cover = masks[0][:, :, None, None] & masks[1][:, None, :, None] & masks[2][:, None, None]
        top = cover.double().clamp(min=1).log2().floor().long()
        labels = torch.gather(classes, 1, top.flatten(1)).view(batch, *spatial)
        return torch.where(cover > 0, labels, 0)
    labels = torch.zeros((batch, *spatial), dtype=torch.long, device=device)
    for j in range(high):
        box = (inside[0][:, j, :, None, None] & inside[1][:, j, None, :, None]
               & inside[2][:, j, None, None])
        labels = torch.where(box, classes[:, j, None, None, None], labels)
    return labels


def code_regions(
    batch: int, spatial: tuple[int, int, int], cfg: VolumeFusionConfig, generator, device
) -> Tensor:
    """``(B, D, H, W)`` class map of the authors' PyMIC scheme: per volume one block size, the
    volume tiled by it from a random offset in ``0..dim % side``, ``int(n * ratio)`` of the
    ``n`` whole blocks fused with a class in ``1..K``, every other voxel class 0."""
    per_axis, counts = [], []
    for dim in spatial:
        lo, hi = min(cfg.block_size[0], dim), min(cfg.block_size[1], dim)
        side = _uniform_int(lo, hi, (batch,), generator, device)
        offset = _uniform_int(0, dim % side, (batch,), generator, device)
        n = dim // side
        pos = torch.arange(dim, device=device)[None] - offset[:, None]
        index = torch.div(pos, side[:, None], rounding_mode="floor")
        valid = (pos >= 0) & (index < n[:, None])
        per_axis.append((torch.minimum(index.clamp(min=0), (n - 1)[:, None]), valid))
        counts.append(n)
    (i_d, v_d), (i_h, v_h), (i_w, v_w) = per_axis
    n_d, n_h, n_w = counts
    block = (i_d[:, :, None, None] * (n_h * n_w)[:, None, None, None]
             + i_h[:, None, :, None] * n_w[:, None, None, None] + i_w[:, None, None, :])
    valid = v_d[:, :, None, None] & v_h[:, None, :, None] & v_w[:, None, None, :]
    total = n_d * n_h * n_w
    most = int(total.max())
    # Exactly int(total * ratio) foreground blocks per volume, chosen uniformly: the blocks
    # with the smallest random keys (keys past a volume's own block count never win).
    keys = torch.rand((batch, most), generator=generator, device=device)
    ids = torch.arange(most, device=device)[None]
    keys = torch.where(ids < total[:, None], keys, 2.0)
    rank = keys.argsort(1).argsort(1)
    chosen = rank < (total.double() * cfg.foreground_ratio).long()[:, None]
    classes = _uniform_int(1, cfg.num_classes - 1, (batch, most), generator, device)
    per_block = torch.where(chosen, classes, 0)
    labels = torch.gather(per_block, 1, block.flatten(1)).view(batch, *spatial)
    return torch.where(valid, labels, 0)


class VolumeFusion3D(ProxyTask):
    """Volume Fusion (MIS-FM): segment the discrete fusion coefficient of two fused volumes."""

    name = "volumefusion3d"
    family = "pretext-classification"
    spatial_dims = 3
    transfers = ("encoder", "decoder")
    paper_input_size = (64, 128, 128)
    min_input_size = (16, 16, 16)
    Config = VolumeFusionConfig
    presets = {"quick": {}, "paper": {}}

    def check_input(self, image_shape, channels) -> None:
        super().check_input(image_shape, channels)
        if self.config.region_scheme == "code" and min(image_shape) < self.config.block_size[0]:
            raise ConfigError(
                f"Task 'volumefusion3d' (region_scheme code) tiles blocks of at least "
                f"{self.config.block_size[0]} voxels, but the input is {tuple(image_shape)}. "
                f"Lower task.block_size or use region_scheme paper.")

    def build_heads(self, backbone: Backbone, encoder: Encoder) -> nn.ModuleDict:
        decoder = backbone.build_decoder(encoder, self.config.num_classes, skip_connections=True)
        return nn.ModuleDict({"decoder": decoder})

    def pair(self, batch: int, device) -> tuple[Tensor, Tensor]:
        """(foreground, background) image indices of each fused volume."""
        if self.config.pairing == "halves" and batch >= 2:
            half = batch // 2
            return torch.arange(half, device=device), torch.arange(half, 2 * half, device=device)
        background = torch.arange(batch, device=device)
        return (background + 1) % batch, background

    def make_batch(self, images: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        """``inputs`` = ``a * images[foreground] + (1 - a) * images[background]`` with
        ``a = labels / K`` per voxel (the same for every channel); ``labels`` ``(N, D, H, W)``."""
        cfg = self.config
        device = images.device
        foreground, background = self.pair(images.shape[0], device)
        spatial = tuple(images.shape[2:])
        regions = paper_regions if cfg.region_scheme == "paper" else code_regions
        labels = regions(len(foreground), spatial, cfg, generator, device)
        with torch.autocast(device.type, enabled=False):
            alpha = (labels.float() / (cfg.num_classes - 1))[:, None]
            fg, bg = images[foreground].float(), images[background].float()
            # A volume fused with itself would hide every coefficient: alone in its batch,
            # its foreground is its own mirror image (PyMIC fuses two crops of one scan).
            same = (foreground == background).view(-1, 1, 1, 1, 1)
            fg = torch.where(same, fg.flip((2, 3, 4)), fg)
            inputs = alpha * fg + (1 - alpha) * bg
        return {"inputs": inputs, "labels": labels, "foreground": foreground,
                "background": background}

    def compute_loss(self, encoder, heads, batch):
        logits = heads["decoder"](encoder(batch["inputs"])).float()
        labels = batch["labels"]
        cfg = self.config
        ce = F.cross_entropy(logits, labels)
        dice = soft_dice_loss(logits, labels)
        loss = cfg.ce_weight * ce + cfg.dice_weight * dice
        with torch.no_grad():
            acc = (logits.argmax(1) == labels).float().mean().item()
        return loss, {"acc": acc, "ce": ce.item(), "dice_loss": dice.item()}


def soft_dice_loss(logits: Tensor, labels: Tensor, smooth: float = 1e-5) -> Tensor:
    """1 - soft Dice of the softmax over every class (background included: no class is
    background here), per volume and class, then averaged (nnssl: batch_dice False,
    do_bg True, smooth 1e-5)."""
    probs = logits.softmax(1)
    onehot = F.one_hot(labels, logits.shape[1]).movedim(-1, 1).to(probs.dtype)
    dims = tuple(range(2, logits.dim()))
    inter = (probs * onehot).sum(dims)
    total = probs.sum(dims) + onehot.sum(dims)
    return 1 - ((2 * inter + smooth) / (total + smooth)).mean()
