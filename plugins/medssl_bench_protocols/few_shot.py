"""Few-shot: N labelled cases per class (classification) or N labelled volumes
(segmentation) over many seeds, beside the baseline, evaluated as the spec says: a logistic
probe or a k-NN on the frozen encoder's cached features, or fine-tuning. For one seed the
cases are nested (the 1 per class inside the 5 inside ...) and identical for every task."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from medssl_bench.config import NEUTRAL, PluginConfig
from medssl_bench.context import RunContext
from medssl_bench.engine import label_subset, per_class_subset, train_labels
from medssl_bench.errors import ConfigError
from medssl_bench.interfaces import Protocol
from medssl_bench.plan import Plan, Probe, SweepPlanner


class FewShot(Protocol):
    """N labelled cases per class (or N volumes) over 10 seeds: probe or fine-tune, beside
    scratch."""

    name = "few-shot"
    uses_pretrain_dataset = False

    class Config(PluginConfig):
        shots: list[int] = Field(default=[1, 5, 10, 25], min_length=1,
                                 json_schema_extra=NEUTRAL,
                                 description="Labelled cases per class (classification) or "
                                 "labelled volumes (segmentation).")
        seeds: list[int] = Field(default=list(range(10)), min_length=1,
                                 json_schema_extra=NEUTRAL,
                                 description="Seeds: each draws its own cases.")
        pretrain_seed: int = Field(default=0, description="Seed of the single pretraining.")
        metric: str = Field(default="auto", description="Metric to rank by (auto: the "
                            "dataset's main metric).")
        include_scratch: bool = Field(default=True, json_schema_extra=NEUTRAL,
                                      description="Run the scratch baseline too.")
        evaluation: Literal["auto", "logistic", "knn", "finetune"] = Field(
            default="auto", description="How the labelled cases are used: a logistic probe or "
            "a k-NN on the frozen encoder's features, or fine-tuning (the finetune section); "
            "auto: logistic for classification, finetune for segmentation.")
        pooling: Literal["deepest", "all"] = Field(
            default="deepest", description="Probe features: global average pooling of the "
            "deepest level, or of every level concatenated.")
        c_grid: list[float] = Field(default=[0.001, 0.01, 0.1, 1.0, 10.0, 100.0], min_length=1,
                                    description="Logistic probe: the C values tried on "
                                    "validation.")
        k: int = Field(default=20, ge=1, description="k-NN: neighbours that vote.")
        temperature: float = Field(default=0.07, gt=0, description="k-NN: votes weigh "
                                   "exp(similarity / temperature).")

        @field_validator("shots")
        @classmethod
        def _positive(cls, values: list[int]) -> list[int]:
            if any(v < 1 for v in values):
                raise ValueError("every shot count must be at least 1")
            return sorted(set(values))

    def plan(self, ctx: RunContext) -> Plan:
        cfg, data = self.config, ctx.data("dataset")
        n_train = total = len(data.train)  # total: what a fraction is a share of
        evaluation = cfg.evaluation
        if evaluation == "auto":
            evaluation = "logistic" if data.info.kind == "classification" else "finetune"
        if evaluation != "finetune" and data.info.kind != "classification":
            raise ConfigError(
                f"few-shot with protocol.evaluation={evaluation} probes a classifier; "
                f"{ctx.plugins['dataset'].name!r} is a {data.info.kind} dataset. Use "
                "protocol.evaluation=finetune (or auto) there.")
        if data.info.kind == "classification":
            labels = train_labels(data.train)

            def cases(shots: int, seed: int) -> list[int]:
                return per_class_subset(labels, shots, seed)

            counts = {s: len(cases(s, 0)) for s in cfg.shots}
        else:
            groups = data.train_groups
            n_groups = len(set(groups)) if groups else n_train

            def cases(shots: int, seed: int) -> list[int]:
                return label_subset(n_train, min(shots, n_groups) / n_groups, seed, groups)

            counts = {s: min(s, n_groups) for s in cfg.shots}
            total = n_groups
        # N as the fraction of the training split it labels; an N that labels no more than
        # a smaller one (a small dataset) is dropped
        by_fraction: dict[float, int] = {}
        for shots in cfg.shots:
            by_fraction.setdefault(round(100 * counts[shots] / total, 6), shots)
        probe = None if evaluation == "finetune" else Probe(
            evaluation, pooling=cfg.pooling, k=cfg.k, temperature=cfg.temperature,
            c_grid=tuple(cfg.c_grid))
        return SweepPlanner(ctx, cfg).sweep(
            ["dataset"], fractions=sorted(by_fraction), probe=probe,
            subset=lambda fraction, seed: cases(by_fraction[fraction], seed))
