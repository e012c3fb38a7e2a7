"""k-NN: cosine k-nearest neighbours on the frozen encoder's pooled features (extracted
once, cached), temperature-weighted votes as in solo-learn; no training at all. Over the
label fractions x seeds of data-efficiency (the subset is the neighbours' pool), beside the
baseline's (a random encoder's). Classification datasets only."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from medssl_bench.config import NEUTRAL
from medssl_bench.context import RunContext
from medssl_bench.errors import ConfigError
from medssl_bench.interfaces import Protocol
from medssl_bench.plan import Plan, Probe, SweepConfig, SweepPlanner


class KNN(Protocol):
    """Frozen encoder: cosine k-NN on its features (classification), over label fractions
    beside scratch."""

    name = "knn"
    uses_pretrain_dataset = False
    dataset_kinds = ("classification",)

    class Config(SweepConfig):
        k: int = Field(default=20, ge=1, description="Neighbours that vote (solo-learn: 20); "
                       "fewer when the label subset is smaller.")
        temperature: float = Field(default=0.07, gt=0, description="Votes weigh "
                                   "exp(cosine similarity / temperature) (solo-learn: 0.07).")
        pooling: Literal["deepest", "all"] = Field(
            default="deepest", description="Features: global average pooling of the deepest "
            "level, or of every level concatenated.")
        fractions: list[float] = Field(
            default=[5, 10, 25, 50, 100], min_length=1, json_schema_extra=NEUTRAL,
            description="Percent of the labeled training split the neighbours come from (the "
            "subsets of data-efficiency).")

    def plan(self, ctx: RunContext) -> Plan:
        info = ctx.data("dataset").info
        if info.kind not in self.dataset_kinds:
            raise ConfigError(
                f"knn classifies images; {ctx.plugins['dataset'].name!r} is a {info.kind} "
                "dataset. Use a classification dataset (--dataset medmnist3d, phantom2d or "
                "fundus), or --protocol linear-probe, which trains a decoder on the frozen "
                "encoder for segmentation.")
        probe = Probe("knn", pooling=self.config.pooling, k=self.config.k,
                      temperature=self.config.temperature)
        return SweepPlanner(ctx, self.config).sweep(["dataset"], probe=probe)
