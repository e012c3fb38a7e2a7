"""Whole-volume segmentation helpers used by the engine when a dataset asks for them.

A dataset opts in through ``DatasetInfo.extra``:

- ``patch_size`` (int) and ``patch_overlap`` (even int): the model sees cubes of
  ``patch_size``; fine-tuning crops random patches and evaluation slides overlapping windows
  over the whole volume (torchio GridSampler/GridAggregator), so Dice is computed on the
  full label map, never on a patch.
- ``regions`` ({name: [class indices]}): Dice of unions of classes (BraTS whole tumour,
  tumour core, enhancing tumour), reported as ``dice_<name>`` and their mean ``dice_regions``.

A labeled split opts in to native-resolution evaluation by having a method
``native_target(index) -> NativeTarget``: the case's label map on its original voxel grid
and how its preprocessed volume was made from it. The engine then predicts at the
preprocessed size (by sliding windows when needed), maps the class probabilities back to
the original grid with :func:`to_native` and scores Dice there, one case at a time.

Without these keys the engine behaves exactly as before.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from medssl_bench.device import autocast


def needs_patches(spatial: Sequence[int], patch_size: int | None) -> bool:
    """True when a volume is larger than the model's input along some axis."""
    return bool(patch_size) and any(s > patch_size for s in spatial)  # type: ignore[operator]


def random_patches(images: Tensor, targets: Tensor, patch_size: int,
                   generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """One random ``patch_size`` cube per case (same place in image and label map); axes
    already no larger than the patch are kept whole."""
    if not needs_patches(images.shape[2:], patch_size):
        return images, targets
    out_i, out_t = [], []
    for image, target in zip(images, targets, strict=True):
        slices = []
        for size in image.shape[1:]:
            extent = min(size, patch_size)
            start = int(torch.randint(0, size - extent + 1, (1,), generator=generator))
            slices.append(slice(start, start + extent))
        out_i.append(image[(slice(None), *slices)])
        out_t.append(target[tuple(slices)])
    return torch.stack(out_i), torch.stack(out_t)


@torch.no_grad()
def sliding_window_logits(
    model: nn.Module, images: Tensor, patch_size: int, overlap: int, device: torch.device,
    batch_size: int = 4, amp: bool = True,
) -> Tensor:
    """Logits ``(B, K, *spatial)`` on the CPU for whole volumes, from overlapping windows
    averaged where they overlap (torchio GridSampler + GridAggregator)."""
    import torchio as tio  # lazy: only datasets with a patch size pay the import

    spatial = images.shape[2:]
    pad = [max(0, patch_size - s) for s in spatial]
    if any(pad):  # a volume thinner than the patch along some axis: zero-pad, crop back after
        images = F.pad(images, [p for d in reversed(pad) for p in (0, d)])
    overlap = min(overlap - overlap % 2, patch_size - 2 + patch_size % 2)
    outputs = []
    for image in images:
        subject = tio.Subject(image=tio.ScalarImage(tensor=image.float().cpu()))
        sampler = tio.GridSampler(subject, patch_size, overlap)
        aggregator = tio.GridAggregator(sampler, overlap_mode="average")
        for start in range(0, len(sampler), batch_size):
            patches = [sampler[i] for i in range(start, min(start + batch_size, len(sampler)))]
            x = torch.stack([p["image"][tio.DATA] for p in patches]).to(device, non_blocking=True)
            locations = torch.stack([torch.as_tensor(p[tio.LOCATION]) for p in patches])
            with autocast(device, amp):
                logits = model(x).float().cpu()
            aggregator.add_batch(logits, locations)
        outputs.append(aggregator.get_output_tensor())
    out = torch.stack(outputs)
    return out[(slice(None), slice(None), *(slice(0, s) for s in spatial))]


def region_dice(pred: Tensor, target: Tensor, regions: Mapping[str, Sequence[int]]) -> Tensor:
    """Dice per case of each region (a union of classes), shape ``(N, len(regions))``; a
    region absent from both prediction and reference scores 1, as in ``dice_per_case``."""
    n = pred.shape[0]
    pred, target = pred.reshape(n, -1), target.reshape(n, -1)
    scores = []
    for classes in regions.values():
        members = torch.as_tensor(list(classes), dtype=pred.dtype)
        p, t = torch.isin(pred, members), torch.isin(target, members.to(target.dtype))
        inter = (p & t).sum(1).float()
        total = p.sum(1).float() + t.sum(1).float()
        scores.append(torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(total)))
    return torch.stack(scores, dim=1)


def region_metrics(scores: Tensor, regions: Mapping[str, Sequence[int]]) -> dict[str, float]:
    """``dice_<region>`` per region and their mean ``dice_regions``."""
    means = scores.mean(0)
    out = {f"dice_{name}": float(v) for name, v in zip(regions, means, strict=True)}
    out["dice_regions"] = float(means.mean())
    return out


@dataclass
class NativeTarget:
    """One case's reference on its original voxel grid, and how the preprocessed volume was
    made from that grid (reorient, optionally crop, then resize to the model's size)."""

    #: Class indices ``(X, Y, Z)`` on the original grid, in the file's axis order.
    label: Tensor
    #: Reorientation applied first (nibabel orientation transform): row i is
    #: ``[axis after reorienting, +1 or -1]`` of original axis i; None: none applied.
    orientation: Sequence[Sequence[int]] | None = None
    #: Voxels cut after reorienting, ``(x0, x1, y0, y1, z0, z1)`` (torchio ``Crop``); None: none.
    crop: Sequence[int] | None = None


def to_native(logits: Tensor, target: NativeTarget) -> Tensor:
    """Class indices on ``target``'s original grid from one case's logits ``(K, *size)`` at
    the preprocessed size: softmax, trilinear resampling of the probabilities (voxel centres
    aligned as torchio ``Resize`` aligns them, ``align_corners=False``), cropped voxels
    background, the reorientation undone, argmax. Runs on the logits' device."""
    shape = tuple(target.label.shape)
    ornt = [(int(a), int(f)) for a, f in target.orientation] if target.orientation else \
        [(i, 1) for i in range(len(shape))]
    reoriented = [0] * len(shape)
    for i, (axis, _) in enumerate(ornt):
        reoriented[axis] = shape[i]
    crop = list(target.crop) if target.crop else [0] * (2 * len(shape))
    inner = [s - crop[2 * d] - crop[2 * d + 1] for d, s in enumerate(reoriented)]
    probs = logits.float().softmax(0)
    probs = F.interpolate(probs[None], size=inner, mode="trilinear" if len(shape) == 3 else
                          "bilinear", align_corners=False)[0]
    if any(crop):
        full = probs.new_zeros((probs.shape[0], *reoriented))
        full[0] = 1.0
        full[(slice(None), *(slice(crop[2 * d], crop[2 * d] + n) for d, n in enumerate(inner)))] = probs
        probs = full
    pred = probs.argmax(0)
    pred = pred.permute(*(axis for axis, _ in ornt))
    flips = [i for i, (_, f) in enumerate(ornt) if f < 0]
    return pred.flip(flips) if flips else pred
