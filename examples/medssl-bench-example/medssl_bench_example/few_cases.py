"""An example protocol: fine-tune on a handful of labelled cases (1, 2, 4, ...) per seed,
beside the baseline. Its spec, ``few-cases.yaml``, sits beside this module; that is where
medssl-bench looks for it (``Protocol.spec_path``)."""

from __future__ import annotations

from pydantic import Field

from medssl_bench.config import NEUTRAL, PluginConfig
from medssl_bench.interfaces import Protocol
from medssl_bench.plan import Plan, SweepPlanner


class FewCases(Protocol):
    """Fine-tune on N labelled cases (not a percentage) over seeds, beside scratch."""

    name = "few-cases"
    uses_pretrain_dataset = False

    class Config(PluginConfig):
        cases: list[int] = Field(default=[1, 2, 4], min_length=1, json_schema_extra=NEUTRAL,
                                 description="Labelled training cases per fine-tune.")
        seeds: list[int] = Field(default=[0, 1, 2, 3, 4], min_length=1,
                                 json_schema_extra=NEUTRAL,
                                 description="Seeds: each draws its own cases.")
        pretrain_seed: int = Field(default=0, description="Seed of the single pretraining.")
        metric: str = Field(default="auto", description="Metric to rank by (auto: the "
                            "dataset's main metric).")
        include_scratch: bool = Field(default=True, json_schema_extra=NEUTRAL,
                                      description="Run the scratch baseline too.")

    def plan(self, ctx) -> Plan:
        n = len(ctx.data("dataset").train)
        # N cases of n are the fraction 100 N / n: nested subsets, as every sweep draws them
        fractions = sorted({100 * min(k, n) / n for k in self.config.cases})
        return SweepPlanner(ctx, self.config).sweep(["dataset"], fractions=fractions)
