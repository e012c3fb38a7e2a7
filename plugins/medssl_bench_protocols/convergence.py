"""Convergence (Taleb et al. Fig. 5): the same sweep, read per epoch: how fast does each
start reach a share of the baseline's final validation score (see
:mod:`medssl_bench.analysis`)."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from medssl_bench.config import NEUTRAL
from medssl_bench.context import RunContext
from medssl_bench.interfaces import Protocol
from medssl_bench.plan import Plan, SweepConfig, SweepPlanner


class Convergence(Protocol):
    """Validation metric per epoch, pretrained vs scratch: epochs and time to reach a share
    of scratch's final score (Taleb et al. Fig. 5)."""

    name = "convergence"
    uses_pretrain_dataset = False
    figures = ("convergence",)

    class Config(SweepConfig):
        fractions: list[float] = Field(default=[100], min_length=1, json_schema_extra=NEUTRAL,
                                       description="Label fractions (percent); convergence is "
                                       "usually read at 100 %.")
        target: float = Field(default=0.95, gt=0, le=1.5, json_schema_extra=NEUTRAL,
                              description="Share of scratch's final validation score a run "
                              "must reach (0.95 = 95 %).")

    def plan(self, ctx: RunContext) -> Plan:
        return SweepPlanner(ctx, self.config).sweep(["dataset"])

    def summarize(self, ctx: RunContext, records: list[Any]) -> None:
        from medssl_bench.analysis import convergence_table

        try:
            rows = convergence_table(ctx.store, protocol=self.name,
                                     dataset=ctx.plugins["dataset"].name)
        except Exception as exc:  # a summary must never lose the finished runs
            ctx.echo(f"[yellow]No convergence summary[/yellow]: {exc}")
            return
        for row in rows:
            ctx.echo(row.describe())
