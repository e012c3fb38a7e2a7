"""An example medssl-bench plugin package: one proxy task registered via an entry point."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from medssl_bench.config import PluginConfig
from medssl_bench.hookspecs import hookimpl
from medssl_bench.interfaces import ProxyTask, global_pool


def flip_batch(volumes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Flip volume i along spatial axis a when bit a of ``labels[i]`` is set (vectorised)."""
    out = volumes
    for axis in range(3):
        mask = ((labels >> axis) & 1).bool().view(-1, *([1] * (volumes.dim() - 1)))
        out = torch.where(mask, out.flip(axis + 2), out)
    return out


class Flip3D(ProxyTask):
    """Predict which of the three axes a volume was flipped along (8 classes)."""

    name = "flip3d"
    family = "pretext-classification"
    spatial_dims = 3

    class Config(PluginConfig):
        hidden: int = Field(default=256, ge=1, description="Hidden width of the classifier head.")

    def build_heads(self, backbone, encoder) -> nn.ModuleDict:
        return nn.ModuleDict({"classifier": nn.Sequential(
            nn.Linear(encoder.embed_dim, self.config.hidden), nn.ReLU(),
            nn.Linear(self.config.hidden, 8))})

    def make_batch(self, images, generator):
        labels = torch.randint(8, (images.shape[0],), generator=generator, device=images.device)
        return {"inputs": flip_batch(images, labels), "labels": labels}

    def compute_loss(self, encoder, heads, batch):
        logits = heads["classifier"](global_pool(encoder(batch["inputs"]))).float()
        loss = nn.functional.cross_entropy(logits, batch["labels"])
        return loss, {"acc": (logits.argmax(1) == batch["labels"]).float().mean().item()}


@hookimpl
def bench_register_tasks(register):
    register(Flip3D)


@hookimpl
def bench_register_protocols(register):
    from medssl_bench_example.few_cases import FewCases

    register(FewCases)
