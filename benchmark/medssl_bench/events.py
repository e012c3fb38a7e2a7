"""Typed progress events of a training, and the sink they go to.

The training loop (:mod:`medssl_bench.loop`) emits them; whoever shows progress renders them
(the CLI: rich bars on a terminal, plain lines in a log). Nothing is parsed back from text:
a renderer reads fields, and the few texts every renderer shares are built here.

A sink is any callable taking one event; :func:`discard` (the default) drops them all.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

#: Which kind of training an event belongs to.
Stage = Literal["pretrain", "finetune"]


def _title(what: str, stage: str) -> str:
    """``pretrain rotation3d`` for a pretraining, the fine-tune's own label otherwise."""
    return f"pretrain {what}" if stage == "pretrain" else what


def _description(what: str, stage: str, epoch: int, epochs: int, frozen: bool) -> str:
    return (f"{_title(what, stage)} epoch {epoch}/{epochs}"
            + (" (encoder frozen)" if frozen else ""))


@dataclass(frozen=True)
class EpochStarted:
    """An epoch begins. ``what``: the task being pretrained (``rotation3d``) or the
    fine-tune's label (``rotation3d 10% seed 0``); ``epoch`` counts from 1 (``epoch`` of
    ``epochs``); ``steps``: batches in the epoch; ``frozen``: the encoder does not train."""

    what: str
    stage: Stage
    epoch: int
    epochs: int
    steps: int
    frozen: bool = False

    @property
    def description(self) -> str:
        """``pretrain rotation3d epoch 3/10``, ``x 10% seed 0 epoch 1/5 (encoder frozen)``."""
        return _description(self.what, self.stage, self.epoch, self.epochs, self.frozen)


def _no_logs() -> dict[str, float]:
    return {}


@dataclass(frozen=True)
class StepEnded:
    """A training step (one batch) ended: ``step`` of ``steps`` (from 1) of the current epoch,
    ``seconds`` since the training began. ``running()`` gives the epoch's mean logs so far
    (``loss`` and the task's logs); it reads them from the device, so call it only when they
    are shown, not on every step."""

    what: str
    stage: Stage
    step: int
    steps: int
    seconds: float
    running: Callable[[], dict[str, float]] = field(default=_no_logs, compare=False, repr=False)


@dataclass(frozen=True)
class EpochEnded:
    """An epoch's training steps ended (before its validation, if any): ``logs`` are the
    means over its steps (``loss`` and the task's logs), ``seconds`` counts since the
    training began."""

    what: str
    stage: Stage
    epoch: int
    epochs: int
    logs: Mapping[str, float]
    seconds: float
    frozen: bool = False

    @property
    def description(self) -> str:
        return _description(self.what, self.stage, self.epoch, self.epochs, self.frozen)

    @property
    def last(self) -> bool:
        return self.epoch == self.epochs


@dataclass(frozen=True)
class TrainingEnded:
    """A training ran its last epoch, ``seconds`` after it began (in this process)."""

    what: str
    stage: Stage
    seconds: float


Event = EpochStarted | StepEnded | EpochEnded | TrainingEnded
Sink = Callable[[Event], None]


def discard(event: Event) -> None:
    """The default sink: no output."""
