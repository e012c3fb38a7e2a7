"""3D Exemplar networks with a triplet loss (Taleb et al. 2020, section 3.5; appendix).

Each volume is an anchor; its positive is a randomly transformed copy (flips, rotations,
brightness/contrast, zoom) and its negative another volume. Negatives reuse the anchors'
own embeddings (the negative of anchor i is the un-augmented volume j, whose embedding is
anchor j's), so a step encodes 2B volumes, not 3B as the reference does.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.nn import functional as F

from medssl_bench.config import PluginConfig, since
from medssl_bench.interfaces import Backbone, Encoder, ProxyTask, global_pool
from medssl_bench_tasks.augment import (
    AffineParams,
    apply_affine,
    apply_factored,
    color_jitter,
    sample_affine_factors,
)
from medssl_bench_tasks.common import (
    all_reduce_sum,
    gather_detached,
    gather_with_grad,
    process_group,
)


def derangement(n: int, generator: torch.Generator, device) -> Tensor:
    """A random permutation without fixed points (a random cyclic shift of a random order);
    for ``n == 1`` the identity, which callers must treat as "no negative"."""
    if n < 2:
        return torch.zeros(n, dtype=torch.long, device=device)
    order = torch.randperm(n, generator=generator, device=device)
    shift = torch.randint(1, n, (1,), generator=generator, device=device)
    result = torch.empty_like(order)
    result[order] = order[(torch.arange(n, device=device) + shift) % n]
    return result


def fingerprint(images: Tensor) -> Tensor:
    """A cheap content hash per volume (float64 sum of a strided subsample): identical
    volumes get identical values, so a volume is never used as its own negative even when it
    appears twice in a batch or sits in the memory bank from an earlier epoch."""
    flat = images.flatten(1)
    step = max(1, flat.shape[1] // 4096)
    weights = torch.arange(1, flat[:, ::step].shape[1] + 1, device=images.device,
                           dtype=torch.float64)
    return (flat[:, ::step].double() * weights).sum(1)


def same_volume(a: Tensor, b: Tensor) -> Tensor:
    return (a - b).abs() <= 1e-9 * (a.abs() + b.abs() + 1)


class EmbeddingBank(nn.Module):
    """A FIFO queue of detached anchor embeddings and their fingerprints from earlier steps
    (negatives "from the whole dataset", paper section 3.5). Buffers, so it lives on the
    device and is saved with the heads for resumed pretraining."""

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("embeddings", torch.zeros(size, dim))
        self.register_buffer("fingerprints", torch.zeros(size, dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def push(self, embeddings: Tensor, prints: Tensor) -> None:
        size = self.embeddings.shape[0]
        n = min(embeddings.shape[0], size)
        slots = (self.count + torch.arange(n, device=self.count.device)) % size
        self.embeddings[slots] = embeddings[-n:].detach().float()
        self.fingerprints[slots] = prints[-n:]
        self.count += n

    def filled(self) -> int:
        return int(min(self.count.item(), self.embeddings.shape[0]))


class Exemplar3D(ProxyTask):
    """3D Exemplar: triplet loss pulling augmented copies together and other volumes apart."""

    name = "exemplar3d"
    family = "contrastive"
    spatial_dims = 3
    paper_input_size = (128, 128, 128)
    min_input_size = (16, 16, 16)

    class Config(PluginConfig):
        code_size: int = Field(default=1024, ge=1, description="Embedding size (appendix: "
                               "code size 1024 for 3D-CPC and 3D-Exe).")
        activation: Literal["sigmoid", "l2norm", "none"] = Field(
            default="sigmoid", description="Output of the embedding layer. sigmoid: the "
            "reference code's Dense(1024, sigmoid), whose bounded output keeps a fixed margin "
            "meaningful (the paper is silent); l2norm: unit-length embeddings as in FaceNet, "
            "which the paper follows for the distance; none: a plain linear layer.")
        margin: float = Field(default=1.0, ge=0, description="Triplet margin alpha (paper "
                              "and appendix: 1).")
        distance: Literal["l2", "msd"] = Field(
            default="l2", description="l2: Euclidean distance (the paper, after FaceNet); msd: "
            "mean squared difference (the reference code's metrics.py).")
        negatives: Literal["batch", "memory_bank"] = Field(
            default="batch", description="batch: another volume of the same batch via a "
            "random derangement (the paper's simple option; reference 'batch'); memory_bank: "
            "a stored embedding of another volume from earlier steps (the paper's 'whole "
            "dataset' option; the reference draws a random other file instead).")
        gather_negatives: bool = Field(
            default=True, json_schema_extra=since("0.2"), description="Under DDP, draw batch "
            "negatives from every rank's anchors (the global batch, as one process would) and "
            "push every rank's anchors into the memory bank, so the banks of all ranks agree; "
            "a no-op in one process.")
        bank_size: int = Field(default=1024, ge=1, description="Embeddings kept in the memory "
                               "bank (our choice; the papers do not use one).")
        hard_negatives: bool = Field(default=False, description="With memory_bank: use the "
                                     "closest stored embedding of another volume instead of a "
                                     "random one (hard-negative mining; our option).")
        flip_p: float = Field(default=0.5, ge=0, le=1, description="Flip probability per axis "
                              "(reference code).")
        rotate_p: float = Field(default=0.5, ge=0, le=1, description="Rotation probability per "
                                "plane, alpha (appendix and reference: 0.5).")
        quarter_p: float = Field(default=0.5, ge=0, le=1, description="Share of rotations that "
                                 "are multiples of 90 degrees; the rest are U(0, 360) degrees "
                                 "(reference code: 0.5).")
        color_p: float = Field(default=0.5, ge=0, le=1, description="Brightness/contrast "
                               "probability, beta (appendix and reference: 0.5).")
        brightness: float = Field(default=0.125, ge=0, description="Brightness shift range "
                                  "+-delta (reference code: 0.125).")
        contrast_min: float = Field(default=0.5, gt=0, description="Lower contrast factor "
                                    "(reference code: 0.5).")
        contrast_max: float = Field(default=1.5, gt=0, description="Upper contrast factor "
                                    "(reference code: 1.5).")
        zoom_p: float = Field(default=0.2, ge=0, le=1, description="Zoom probability, gamma "
                              "(appendix: 0.2; reference code: 0.15).")
        zoom_min: float = Field(default=0.8, gt=0, description="Smallest zoom factor per axis "
                                "(reference code: 0.8).")
        zoom_max: float = Field(default=1.2, gt=0, description="Largest zoom factor per axis "
                                "(reference code: 1.2).")
        resampling: Literal["per_plane", "composed"] = Field(
            default="per_plane", description="per_plane: flips and quarter turns as exact index "
            "ops and one bilinear pass per arbitrary-angle plane rotation (zoom merged into the "
            "last), each a 2D resampling with the third axis as channels; like the reference "
            "code, which calls ndimage.rotate once per plane, corners rotated out by one plane "
            "are lost for the next. Identical to 'composed' when at most one plane draws an "
            "arbitrary angle, and about 10x faster on the CPU. composed: all transforms of a "
            "sample composed and resampled once (one trilinear pass, no intermediate loss).")

    def affine_params(self) -> AffineParams:
        c = self.config
        return AffineParams(c.flip_p, c.rotate_p, c.quarter_p, c.zoom_p, c.zoom_min, c.zoom_max)

    def build_heads(self, backbone: Backbone, encoder: Encoder) -> nn.ModuleDict:
        heads = {"embedding": nn.Linear(encoder.embed_dim, self.config.code_size)}
        if self.config.negatives == "memory_bank":
            heads["bank"] = EmbeddingBank(self.config.bank_size, self.config.code_size)
        return nn.ModuleDict(heads)

    def augment(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """The positives: one composed affine resampling, then brightness and contrast."""
        c = self.config
        factors = sample_affine_factors(images.shape[0], tuple(images.shape[2:]),
                                        self.affine_params(), generator, images.device)
        if c.resampling == "per_plane":
            positives = apply_factored(images, factors)
        else:
            positives = apply_affine(images, factors.compose())
        return color_jitter(positives, c.color_p, generator, c.brightness,
                            (c.contrast_min, c.contrast_max), inplace=True)

    def make_batch(self, images: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        n = images.shape[0]
        positives = self.augment(images, generator)  # drawn first, as in one process before
        rank, world = self._pool()
        if world == 1:
            negatives = derangement(n, generator, images.device)
        else:  # any other anchor of the global batch (this rank's rows start at rank * n)
            draw = torch.randint(0, world * n - 1, (n,), generator=generator, device=images.device)
            negatives = draw.add_(draw >= torch.arange(n, device=images.device) + rank * n)
        batch = {
            "anchors": images,
            "positives": positives,
            "negative_index": negatives,
            "fingerprints": fingerprint(images),
        }
        if self.config.negatives == "memory_bank" and not self.config.hard_negatives:
            batch["bank_noise"] = torch.rand(n, self.config.bank_size, generator=generator,
                                             device=images.device)
        return batch

    def _pool(self) -> tuple[int, int]:
        """(rank, world) whose anchors are negatives: every process's with
        ``gather_negatives`` under DDP, else this one's alone."""
        return process_group() if self.config.gather_negatives else (0, 1)

    def embed(self, encoder: Encoder, heads: nn.ModuleDict, x: Tensor) -> Tensor:
        z = heads["embedding"](global_pool(encoder(x))).float()
        if self.config.activation == "sigmoid":
            return torch.sigmoid(z)
        if self.config.activation == "l2norm":
            return F.normalize(z, dim=1)
        return z

    def distance(self, a: Tensor, b: Tensor) -> Tensor:
        if self.config.distance == "msd":
            return (a - b).pow(2).mean(-1)
        return ((a - b).pow(2).sum(-1) + 1e-12).sqrt()

    def _bank_negatives(self, bank: EmbeddingBank, z_a: Tensor, prints: Tensor,
                        noise: Tensor | None) -> tuple[Tensor, Tensor]:
        """A stored embedding of another volume per anchor, random or the closest one."""
        filled = bank.filled()
        stored, stored_prints = bank.embeddings[:filled], bank.fingerprints[:filled]
        usable = ~same_volume(prints[:, None], stored_prints[None, :])
        if self.config.hard_negatives:
            score = -torch.cdist(z_a.detach(), stored)
        else:
            score = noise[:, :filled]
        score = score.masked_fill(~usable, -torch.inf)
        pick = score.argmax(1)
        return stored[pick], usable.any(1)

    def compute_loss(self, encoder, heads, batch):
        anchors, positives = batch["anchors"], batch["positives"]
        n = anchors.shape[0]
        z = self.embed(encoder, heads, torch.cat([anchors, positives]))
        z_a, z_p = z[:n], z[n:]
        prints = batch["fingerprints"]
        index = batch["negative_index"]
        pool, pool_prints = z_a, prints
        if self._pool()[1] > 1:
            pool, pool_prints = gather_with_grad(z_a)[0], gather_detached(prints)
        z_n = pool[index]
        valid = ~same_volume(prints, pool_prints[index])
        if self.config.negatives == "memory_bank":
            bank = heads["bank"]
            if bank.filled():
                z_n, valid = self._bank_negatives(bank, z_a, prints, batch.get("bank_noise"))
            bank.push(pool, pool_prints)
        d_pos, d_neg = self.distance(z_a, z_p), self.distance(z_a, z_n)
        hinge = F.relu(d_pos - d_neg + self.config.margin)
        weight = valid.float()
        # the mean over the usable triplets of the global batch: each of the ``world``
        # processes scales its sum so that DDP's average of their losses (and gradients) is
        # one process's over the global batch, however the usable triplets fall between them
        world, usable = self._pool()[1], weight.sum()
        if world > 1:
            usable = all_reduce_sum(usable) / world
        # a batch without any usable negative (e.g. one volume) still yields a finite loss
        loss = (hinge * weight).sum() / usable.clamp(min=1 / world)
        with torch.no_grad():
            acc = ((d_pos < d_neg).float() * weight).sum() / usable.clamp(min=1 / world)
        return loss, {"triplet_acc": acc.item(), "d_pos": d_pos.mean().item(),
                      "d_neg": d_neg.mean().item()}
