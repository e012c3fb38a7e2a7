"""Data efficiency (Taleb et al. 2020, Figs. 3-4): pretrain on the dataset's unlabeled pool,
fine-tune on nested label fractions over seeds beside the baseline, test on the held-out split."""

from __future__ import annotations

from medssl_bench.context import RunContext
from medssl_bench.interfaces import Protocol
from medssl_bench.plan import Plan, SweepConfig, SweepPlanner


class DataEfficiency(Protocol):
    """Pretrain on the unlabeled pool, fine-tune on nested label fractions beside scratch."""

    name = "data-efficiency"
    uses_pretrain_dataset = False

    class Config(SweepConfig):
        pass

    def plan(self, ctx: RunContext) -> Plan:
        return SweepPlanner(ctx, self.config).sweep(["dataset"])
