"""Transfer: pretrain on corpus A (``--pretrain-dataset``), fine-tune on dataset B, beside
pretraining on B itself and the baseline."""

from __future__ import annotations

from pydantic import Field

from medssl_bench.config import NEUTRAL
from medssl_bench.context import RunContext
from medssl_bench.interfaces import Protocol
from medssl_bench.plan import Plan, SweepConfig, SweepPlanner


class Transfer(Protocol):
    """Pretrain on corpus A, fine-tune on dataset B; beside pretraining on B and scratch."""

    name = "transfer"
    uses_pretrain_dataset = True

    class Config(SweepConfig):
        include_same_dataset: bool = Field(
            default=True, json_schema_extra=NEUTRAL,
            description="Also pretrain on the target dataset's own unlabeled pool "
            "(the data-efficiency set-up), so the table shows A -> B next to B -> B.")

    def plan(self, ctx: RunContext) -> Plan:
        target, source = ctx.data("dataset"), ctx.data("pretrain_dataset")
        if source.info.channels != target.info.channels:
            ctx.echo(f"Channels differ ({ctx.plugins['pretrain_dataset'].name}: "
                     f"{source.info.channels}, {ctx.plugins['dataset'].name}: "
                     f"{target.info.channels}): the first layer is adapted by "
                     f"{ctx.run.configs['finetune'].channel_adaptation}.")
        corpora = ["pretrain_dataset"] + (["dataset"] if self.config.include_same_dataset else [])
        # every entry names its corpus: A -> B and B -> B sit in one table
        return SweepPlanner(ctx, self.config).sweep(corpora, always_name_corpus=True)
