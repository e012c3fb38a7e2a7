"""VoCo in 3D (Wu et al., CVPR 2024): predict where random crops lie by contrasting them with
the base crops of their volume.

Each volume is cut into a grid of non-overlapping **base crops** (4 x 4 in the axial plane,
one across the depth, as the authors' code and OpenMind/nnssl do). A few **random crops** of
the same size are taken at uniform integer positions inside the grid; the target of a
random crop is its overlap with every base crop, as a share of its own volume (the shares sum
to one). Crops pass the shared encoder, are pooled and projected (a 3-layer MLP, as the
authors' code); the prediction for random crop ``p`` and base crop ``q_k`` is their cosine
similarity through a ReLU, ``l_k = max(0, cos(p, q_k))``, trained towards the overlap by
``-log(1 - |y_k - l_k|)``. A regulariser pushes the base crops of one volume apart (their
pairwise cosine similarity towards zero), so each base crop stands for its own region.

Everything is batched on the device: base crops are one reshape of the volume, random crops
one gather (``patches.extract_patches``), the overlaps a product of per-axis interval
intersections, the crop augmentations (the code's flips, quarter turns in the first plane and
intensity shifts) ``torch.where`` selections. Crops whose size is not a multiple of the
backbone's ``size_multiple`` are zero-padded symmetrically before the encoder.

Backbone: the paper's, MONAI's Swin UNETR (``swinunetr``), is the default when no
``--backbone`` is given (``preferred_backbone``); any 3D backbone works (the contract tests
run it on each).

Where paper and code differ, the config names each source (see its fields). The released
code's teacher-student variant (from the journal extension; ``teacher_momentum``) keeps an
EMA copy of the encoder and projector in the heads, updated from the student at every step
(so the loop must hand over the encoder itself or a wrapper whose ``parameters()`` are the
encoder's, as DDP and torch.compile do).
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor, nn
from torch.nn import functional as F

from medssl_bench.config import PluginConfig
from medssl_bench.errors import ConfigError
from medssl_bench.interfaces import Backbone, Encoder, ProxyTask, global_pool
from medssl_bench_tasks.patches import extract_patches


def grid_geometry(shape: tuple[int, ...], grid: tuple[int, ...]) -> tuple[int, ...]:
    """The side of every base crop: the volume's side over the grid count, floored (a
    remainder at the far end of an axis belongs to no crop)."""
    return tuple(s // g for s, g in zip(shape, grid, strict=True))


def base_crop_corners(grid: tuple[int, ...], crop: tuple[int, ...], device) -> Tensor:
    """``(K, d)`` first voxel of every base crop, row-major over the grid."""
    axes = [torch.arange(g, device=device) * c for g, c in zip(grid, crop, strict=True)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(grid))


def overlap_shares(starts: Tensor, corners: Tensor, crop: tuple[int, ...]) -> Tensor:
    """Overlap of boxes of side ``crop`` at ``starts`` (``(..., d)``) with boxes at
    ``corners`` (``(K, d)``), as a share of one box's volume: ``(..., K)``."""
    size = torch.tensor(crop, device=starts.device)
    a = starts.unsqueeze(-2)
    lo = torch.maximum(a, corners)
    hi = torch.minimum(a + size, corners + size)
    return (hi - lo).clamp(min=0).prod(-1).float() / float(size.prod())


def split_base_crops(images: Tensor, grid: tuple[int, ...], crop: tuple[int, ...]) -> Tensor:
    """The base crops of ``(B, C, D, H, W)`` images as a ``(B * K, C, *crop)`` view-shaped
    expression (a reshape of a permuted view; copying it out is the only data movement)."""
    b, c = images.shape[:2]
    covered = images[:, :, :grid[0] * crop[0], :grid[1] * crop[1], :grid[2] * crop[2]]
    blocks = covered.reshape(b, c, grid[0], crop[0], grid[1], crop[1], grid[2], crop[2])
    return blocks.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(-1, c, *crop)


class CropPad(nn.Module):
    """Zero-pads crops symmetrically to the backbone's size multiple and minimum size (no
    parameters; a module so it travels with the heads)."""

    def __init__(self, size_multiple: int, min_size: int) -> None:
        super().__init__()
        self.size_multiple, self.min_size = int(size_multiple), int(min_size)

    def forward(self, x: Tensor) -> Tensor:
        m = self.size_multiple
        pads: list[int] = []
        for size in reversed(x.shape[2:]):
            extra = max(-(-size // m) * m, self.min_size) - size
            pads += [extra // 2, extra - extra // 2]
        return F.pad(x, pads) if any(pads) else x


class Projector(nn.Module):
    """Linear - norm - ReLU, Linear - norm - ReLU, Linear (the authors' projection head;
    the norm without affine parameters or running statistics, as there)."""

    def __init__(self, in_features: int, hidden: int, out_features: int, norm: str) -> None:
        super().__init__()

        def norm_layer() -> nn.Module:
            if norm == "batch":
                return nn.BatchNorm1d(hidden, affine=False, track_running_stats=False)
            if norm == "layer":
                return nn.LayerNorm(hidden, elementwise_affine=False)
            return nn.Identity()

        self.net = nn.Sequential(
            nn.Linear(in_features, hidden), norm_layer(), nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden), norm_layer(), nn.ReLU(inplace=True),
            nn.Linear(hidden, out_features))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class VoCo3D(ProxyTask):
    """VoCo: predict random crops' overlaps with a volume's base crops from feature similarity."""

    name = "voco3d"
    family = "contrastive"
    preferred_backbone = "swinunetr"  # the paper's network (VoCo-B: Swin UNETR, feature 48)
    spatial_dims = 3
    paper_input_size = (384, 384, 96)
    min_input_size = (16, 16, 16)
    presets = {"quick": {"base_grid": [2, 2, 1], "projector_hidden": 64,
                         "projector_dim": 64}}

    class Config(PluginConfig):
        base_grid: list[int] = Field(
            default=[4, 4, 1], description="Base crops per spatial axis, in the tensor's "
            "axis order (D, H, W). Paper and authors' code: 4 x 4 = 16 base crops in the "
            "axial plane and one along the cranio-caudal axis (the code's RAS 384 x 384 x 96 "
            "(x, y, z) volumes give 96^3 crops); OpenMind/nnssl: (4, 4, 1) on 256 x 256 x 64 "
            "patches. The NIfTI datasets here give RAS (x, y, z) tensors, so W is z and the "
            "default matches. The base crop side is the volume side over this count, floored; "
            "random crops have that size.")
        random_crops: int = Field(default=2, ge=1, description="Random crops per volume "
                                  "(authors' code: sw_batch_size 2; nnssl: 4).")
        crop_resize: int = Field(default=0, ge=0, description="Resize every crop to this "
                                 "cubic side (trilinear) before the encoder; 0 keeps the "
                                 "crops' own size. Authors' code: 96^3 crops resized to 64^3; "
                                 "nnssl: no resizing (0).")
        logits: Literal["relu", "cosine"] = Field(
            default="relu", description="How similarity becomes the predicted overlap. relu: "
            "max(0, cos) (authors' code and nnssl); cosine: the plain cosine (nnssl reads the "
            "paper's eq. 1 so); a negative cosine then can make |y - l| exceed 1, where "
            "-log(1 - |y - l|) is clamped.")
        prediction_loss: Literal["paper", "split", "split_weighted"] = Field(
            default="paper", description="paper: -log(1 - |y - l|) averaged over every "
            "(random crop, base crop) pair (eq. 3 as nnssl cites it); split: the CVPR-era "
            "code (nnssl's original_code.py): -log(1 - |y - l|) averaged over the pairs with "
            "overlap plus l^2 averaged over those without; split_weighted: the released "
            "code (Luffy03/VoCo voco_head.py) and nnssl: the first term weighted by the "
            "overlap y instead of counted.")
        detach_bases: bool = Field(default=True, description="No gradient through the base "
                                   "crops' features in the prediction loss (the CVPR-era code, "
                                   "bases.detach(); nnssl); they learn from the regulariser.")
        regulariser: Literal["abs", "relu", "relu_squared"] = Field(
            default="abs", description="Penalty on the cosine similarity of two base crops "
            "of one volume, averaged over the K(K-1)/2 pairs. abs: |cos| (the paper's aim: "
            "orthogonal base-crop features, eq. 5); relu: max(0, cos) (nnssl); "
            "relu_squared: max(0, cos)^2 (authors' code).")
        reg_weight: float = Field(default=1.0, ge=0, description="Weight lambda of the "
                                  "regulariser (authors' code and nnssl: 1).")
        features: Literal["last", "all_scales"] = Field(
            default="last", description="What is projected. last: the deepest features, "
            "pooled (CVPR-era code: the last Swin stage); all_scales: every scale pooled and "
            "concatenated (the released 10k code and nnssl).")
        projector_hidden: int = Field(default=2048, ge=1, description="Hidden width of the "
                                      "projector (authors' code and nnssl: 2048).")
        projector_dim: int = Field(default=2048, ge=1, description="Output size of the "
                                   "projector (authors' code and nnssl: 2048).")
        projector_norm: Literal["batch", "layer", "none"] = Field(
            default="batch", description="Norm after each hidden layer, without affine or "
            "running statistics. batch: BatchNorm1d (authors' code); layer: per-sample "
            "normalisation (nnssl's InstanceNorm1d on (N, C) features amounts to it).")
        flip_p: float = Field(default=0.2, ge=0, le=1, description="Flip probability per axis "
                              "of every crop (authors' code: RandFlipd p 0.2 per axis).")
        rotate_p: float = Field(default=0.2, ge=0, le=1, description="Probability of a quarter "
                                "turn (1-3 x 90 degrees) in the plane of the first two axes "
                                "(authors' code: RandRotate90d p 0.2, max_k 3, in the (x, y) "
                                "plane); skipped when that plane is not square.")
        shift_p: float = Field(default=0.1, ge=0, le=1, description="Probability of an "
                               "intensity shift per crop (authors' code: RandShiftIntensityd "
                               "p 0.1).")
        shift: float = Field(default=0.1, ge=0, description="Intensity shift range +-offset "
                             "(authors' code: 0.1).")
        teacher_momentum: float = Field(
            default=0.0, ge=0, lt=1, description="0: one network, as in the CVPR paper. > 0: "
            "the released code's teacher-student variant (journal extension; momentum 0.9 "
            "there; nnssl issue #22 reports VoCo's loss falls only with it): an EMA teacher "
            "of encoder and projector, the prediction the mean of student-random vs "
            "teacher-base and teacher-random vs student-base similarities (detach_bases "
            "does not apply).")

        @field_validator("base_grid")
        @classmethod
        def _grid(cls, value: list[int]) -> list[int]:
            if len(value) != 3 or min(value) < 1 or value[0] * value[1] * value[2] < 2:
                raise ValueError("base_grid needs three counts >= 1 (D, H, W) giving at "
                                 f"least two base crops, got {value}")
            return value

    @property
    def grid(self) -> tuple[int, int, int]:
        return tuple(self.config.base_grid)  # type: ignore[return-value]

    def check_input(self, image_shape: tuple[int, ...], channels: int) -> None:
        super().check_input(image_shape, channels)
        small = [s for s, g in zip(image_shape, self.grid, strict=True) if s // g < 1]
        if small:
            raise ConfigError(
                f"Task 'voco3d': base_grid {list(self.grid)} does not fit images of shape "
                f"{tuple(image_shape)} (every base crop needs at least one voxel per axis). "
                "Lower task.base_grid.")

    def build_heads(self, backbone: Backbone, encoder: Encoder) -> nn.ModuleDict:
        c = self.config
        width = (sum(encoder.feature_channels) if c.features == "all_scales"
                 else encoder.embed_dim)
        heads = nn.ModuleDict({
            "projector": Projector(width, c.projector_hidden, c.projector_dim,
                                   c.projector_norm),
            "pad": CropPad(backbone.size_multiple(), backbone.min_input_size()),
        })
        if c.teacher_momentum > 0:
            for name, module in (("teacher_encoder", encoder),
                                 ("teacher_projector", heads["projector"])):
                teacher = copy.deepcopy(module)
                teacher.requires_grad_(False)
                heads[name] = teacher
        return heads

    @torch.no_grad()
    def update_teacher(self, encoder: Encoder, heads: nn.ModuleDict) -> None:
        """teacher = m * teacher + (1 - m) * student, parameter by parameter."""
        m = self.config.teacher_momentum
        student = [*encoder.parameters(), *heads["projector"].parameters()]
        teacher = [*heads["teacher_encoder"].parameters(),
                   *heads["teacher_projector"].parameters()]
        if len(student) != len(teacher):
            raise ConfigError(
                "Task 'voco3d': teacher_momentum needs the encoder's parameters, but the "
                f"student shows {len(student)} tensors where the teacher has {len(teacher)} "
                "(a wrapper that hides them?). Set task.teacher_momentum=0.")
        torch._foreach_lerp_(teacher, [p.detach() for p in student], 1 - m)

    def augment(self, crops: Tensor, generator: torch.Generator) -> Tensor:
        """The authors' crop augmentations, per crop: flips, a quarter turn, a shift."""
        c = self.config
        n, device = crops.shape[0], crops.device
        view = (n,) + (1,) * (crops.dim() - 1)
        flips = torch.rand(n, 3, generator=generator, device=device) < c.flip_p
        turn = torch.rand(n, generator=generator, device=device) < c.rotate_p
        quarters = torch.randint(1, 4, (n,), generator=generator, device=device)
        shift_on = torch.rand(n, generator=generator, device=device) < c.shift_p
        offset = (torch.rand(n, generator=generator, device=device) * 2 - 1) * c.shift
        # in place on the chosen crops only (``crops`` is a fresh batch that make_batch owns)
        for axis in range(3):
            index = flips[:, axis].nonzero().flatten()
            if index.numel():
                crops[index] = crops[index].flip(2 + axis)
        if crops.shape[2] == crops.shape[3]:
            for k in (1, 2, 3):
                index = (turn & (quarters == k)).nonzero().flatten()
                if index.numel():
                    crops[index] = torch.rot90(crops[index], k, (2, 3))
        index = shift_on.nonzero().flatten()
        if index.numel():
            crops[index] += offset[index].to(crops.dtype).view(-1, *view[1:])
        return crops

    def make_batch(self, images: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        b, channels, device = images.shape[0], images.shape[1], images.device
        shape = tuple(images.shape[2:])
        grid = self.grid
        crop = grid_geometry(shape, grid)
        r = self.config.random_crops
        k = grid[0] * grid[1] * grid[2]
        crops = torch.empty(b * (k + r), channels, *crop, dtype=images.dtype, device=device)
        crops[:b * k] = split_base_crops(images, grid, crop)
        # random crops at uniform integer positions inside the area the grid covers
        high = torch.tensor([g * s - s + 1 for g, s in zip(grid, crop, strict=True)],
                            device=device)
        starts = (torch.rand(b, r, 3, generator=generator, device=device) * high).long()
        starts = torch.minimum(starts, high - 1)
        crops[b * k:] = extract_patches(images, starts, crop).reshape(b * r, channels, *crop)
        overlap = overlap_shares(starts, base_crop_corners(grid, crop, device), crop)
        crops = self.augment(crops, generator)
        if self.config.crop_resize:
            side = self.config.crop_resize
            crops = F.interpolate(crops, size=(side,) * 3, mode="trilinear",
                                  align_corners=True)
        return {"crops": crops, "overlap": overlap, "starts": starts}

    def embed(self, encoder: Encoder, heads: nn.ModuleDict, crops: Tensor,
              projector: str = "projector") -> Tensor:
        features = encoder(heads["pad"](crops))
        if self.config.features == "all_scales":
            pooled = torch.cat([f.flatten(2).mean(-1) for f in features], 1)
        else:
            pooled = global_pool(features)
        return heads[projector](pooled)

    def prediction(self, random: Tensor, base: Tensor) -> Tensor:
        """``(B, R, K)`` predicted overlaps from ``(B, R, P)`` and ``(B, K, P)`` features."""
        similarity = torch.einsum("brp,bkp->brk", F.normalize(random, dim=-1),
                                  F.normalize(base, dim=-1))
        return F.relu(similarity) if self.config.logits == "relu" else similarity

    def prediction_loss(self, logits: Tensor, target: Tensor) -> Tensor:
        eps = 1e-6
        distance = (target - logits).abs()
        log_term = -torch.log((1 - distance).clamp(min=0) + eps)
        mode = self.config.prediction_loss
        if mode == "paper":
            return log_term.mean()
        positive = (target > 0).float()
        weight = target if mode == "split_weighted" else positive
        pos = (log_term * weight).sum() / weight.sum().clamp(min=eps)
        negative = 1 - positive
        neg = (logits.pow(2) * negative).sum() / negative.sum().clamp(min=1)
        return pos + neg

    def regularisation(self, base: Tensor) -> Tensor:
        """Mean penalty on the cosine similarity of every pair of one volume's base crops."""
        unit = F.normalize(base, dim=-1)
        similarity = unit @ unit.transpose(1, 2)  # (B, K, K)
        k = similarity.shape[-1]
        upper = torch.ones(k, k, device=base.device, dtype=torch.bool).triu(1)
        pairs = similarity[:, upper]
        mode = self.config.regulariser
        if mode == "abs":
            penalty = pairs.abs()
        elif mode == "relu":
            penalty = F.relu(pairs)
        else:
            penalty = F.relu(pairs).pow(2)
        return penalty.mean()

    def compute_loss(self, encoder, heads, batch):
        target = batch["overlap"]
        b, r, k = target.shape
        z = self.embed(encoder, heads, batch["crops"])
        teacher = self.config.teacher_momentum > 0
        if teacher:  # as the released code: update first, then the teacher's features
            self.update_teacher(encoder, heads)
            with torch.no_grad():
                zt = self.embed(heads["teacher_encoder"], heads, batch["crops"],
                                "teacher_projector")
        with torch.autocast(z.device.type, enabled=False):  # fp32 similarities
            z = z.float()
            base, random = z[:b * k].view(b, k, -1), z[b * k:].view(b, r, -1)
            if teacher:
                zt = zt.float()
                base_t, random_t = zt[:b * k].view(b, k, -1), zt[b * k:].view(b, r, -1)
                logits = 0.5 * (self.prediction(random, base_t)
                                + self.prediction(random_t, base))
            else:
                logits = self.prediction(random, base.detach() if self.config.detach_bases
                                         else base)
            pred = self.prediction_loss(logits, target)
            reg = self.regularisation(base)
            loss = pred + self.config.reg_weight * reg
        with torch.no_grad():
            acc = (logits.argmax(-1) == target.argmax(-1)).float().mean()
        return loss, {"acc": acc.item(), "pred": pred.item(), "reg": reg.item()}
