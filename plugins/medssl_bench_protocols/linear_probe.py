"""Linear probe: how good are the frozen encoder's features? On a classification dataset a
logistic regression on the pooled features of the frozen encoder (extracted once, cached),
its regularisation chosen on validation; on a segmentation dataset decoder-only fine-tuning
(the encoder frozen, a fresh decoder trained: ``finetune.freeze: frozen`` in the spec). Over
the label fractions x seeds of data-efficiency, beside the baseline's (a random encoder's)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from medssl_bench.config import NEUTRAL
from medssl_bench.context import RunContext
from medssl_bench.errors import ConfigError
from medssl_bench.interfaces import Protocol
from medssl_bench.plan import Plan, Probe, SweepConfig, SweepPlanner


class LinearProbe(Protocol):
    """Frozen encoder: logistic regression on its features (classification) or a decoder
    trained on it (segmentation), over label fractions beside scratch."""

    name = "linear-probe"
    uses_pretrain_dataset = False

    class Config(SweepConfig):
        pooling: Literal["deepest", "all"] = Field(
            default="deepest", description="Features: global average pooling of the deepest "
            "level, or of every level concatenated (classification datasets).")
        c_grid: list[float] = Field(
            default=[0.001, 0.01, 0.1, 1.0, 10.0, 100.0], min_length=1,
            description="Inverse regularisation strengths C of the logistic regression; the "
            "one with the best validation metric is tested.")
        fractions: list[float] = Field(
            default=[5, 10, 25, 50, 100], min_length=1, json_schema_extra=NEUTRAL,
            description="Percent of the labeled training split to probe on (the subsets of "
            "data-efficiency).")

        @field_validator("c_grid")
        @classmethod
        def _positive(cls, values: list[float]) -> list[float]:
            if any(v <= 0 for v in values):
                raise ValueError("every C must be positive")
            return values

    def plan(self, ctx: RunContext) -> Plan:
        planner = SweepPlanner(ctx, self.config)
        if ctx.data("dataset").info.kind == "segmentation":
            freeze = ctx.run.configs["finetune"].freeze
            if freeze != "frozen":
                raise ConfigError(
                    f"linear-probe on the segmentation dataset {ctx.plugins['dataset'].name!r} "
                    f"trains a decoder on the frozen encoder: finetune.freeze must be frozen, "
                    f"not {freeze!r} (use --protocol data-efficiency to fine-tune everything).")
            return planner.sweep(["dataset"])
        probe = Probe("logistic", pooling=self.config.pooling, c_grid=tuple(self.config.c_grid))
        return planner.sweep(["dataset"], probe=probe)
