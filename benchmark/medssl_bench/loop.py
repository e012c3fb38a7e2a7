"""The one training loop, shared by pretraining and fine-tuning.

Per epoch: the learning rate from the schedule, train mode, the caller's epoch-start hook
(fine-tuning freezes the encoder during its warm-up), then per batch ``prepare`` (outside
autocast: device placement, batch construction in full precision), the model's forward
under the runtime's autocast, the NaN check, backward, gradient clipping and the optimizer
step (every ``grad_accumulation`` micro-batches), and the step's logs added up on the
device. A non-finite loss stops the training: noticed at once on the CPU, on CUDA through a
flag kept on the device and read at the epoch's end (no host synchronisation per step; see
``Runtime.nan_check``). At the epoch's end the means are read once, then the epoch-end hook (fine-tuning:
validation and best-epoch selection) and the checkpoint hook run. Progress goes to a sink
as typed events (:mod:`medssl_bench.events`).

Everything device-, precision- or process-specific is asked of the
:class:`~medssl_bench.runtime.Runtime`; what a step computes is the model's ``forward``:
``model(inputs) -> (loss, logs)``, a module that owns every trained parameter, so a wrapper
(DDP, ``torch.compile``) sees the whole step.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from medssl_bench.errors import TrainingError
from medssl_bench.events import (
    EpochEnded,
    EpochStarted,
    Sink,
    Stage,
    StepEnded,
    TrainingEnded,
    discard,
)
from medssl_bench.optim import Schedule
from medssl_bench.runtime import EpochLoader, Runtime

#: What a step's forward returns beside the loss: scalar logs, Python floats or 0-dim
#: tensors (tensors are added up on the device and read once per epoch).
Logs = Mapping[str, float | Tensor]


def _same(value: Any) -> Any:
    return value


def diverged(where: str, value: float, lr: float) -> TrainingError:
    """The message of a diverged training, naming the fix."""
    return TrainingError(
        f"{where}: the loss became {value}. Training diverged; lower the learning rate "
        f"(now {lr:g}, e.g. --set pretrain.lr=... or finetune.lr=...), enable grad_clip, or "
        "check the input images for NaN values."
    )


def check_finite(loss: Tensor, where: str, lr: float) -> None:
    """Stop a diverged training now (reading the flag is a host synchronisation)."""
    if not torch.isfinite(loss):
        raise diverged(where, loss.item(), lr)


class FiniteWatch:
    """The first non-finite loss of an epoch, noted on the loss's device without a host
    synchronisation; :meth:`check` reads it once, at the epoch's end, before its logs are
    used or a checkpoint is written (so no diverged weights are saved)."""

    def __init__(self) -> None:
        self.step: Tensor | None = None  # the first bad step, -1 while none
        self.value: Tensor | None = None

    def note(self, loss: Tensor, step: int) -> None:
        loss = loss.detach().float()
        if self.step is None:
            self.step = torch.full((), -1, dtype=torch.long, device=loss.device)
            self.value = torch.zeros((), device=loss.device)
        first = (self.step < 0) & ~torch.isfinite(loss)
        self.step = torch.where(first, step, self.step)
        self.value = torch.where(first, loss, self.value)

    def check(self, where: Callable[[int], str], lr: float) -> None:
        if self.step is not None and int(self.step) >= 0:
            raise diverged(where(int(self.step)), float(self.value), lr)


class Meter:
    """Sums of an epoch's step logs: tensors on their device (no synchronisation per step),
    Python floats as floats; both in float64, added in step order."""

    def __init__(self) -> None:
        self.steps = 0
        self.keys: dict[str, None] = {}  # first-seen order
        self.tensors: dict[str, Tensor] = {}
        self.floats: dict[str, float] = {}

    def add(self, logs: Logs) -> None:
        self.steps += 1
        for key, value in logs.items():
            self.keys.setdefault(key)
            if isinstance(value, Tensor):
                value = value.detach().to(torch.float64)
                if key in self.floats:  # a key that changed kind: rare, so read it here
                    self.floats[key] += float(value)
                elif key in self.tensors:
                    self.tensors[key].add_(value)
                else:
                    self.tensors[key] = torch.zeros_like(value).add_(value)
            elif key in self.tensors:
                self.tensors[key].add_(float(value))
            else:
                self.floats[key] = self.floats.get(key, 0.0) + float(value)

    def sums(self) -> list[float]:
        """The sums in key order (one read from the device for all tensors)."""
        read = dict(zip(self.tensors, torch.stack(list(self.tensors.values())).tolist(),
                        strict=True)) if self.tensors else {}
        return [read[k] if k in read else self.floats[k] for k in self.keys]

    def means(self, totals: list[float] | None = None, steps: float | None = None) -> dict[str, float]:
        """Mean per step of every log (``totals``/``steps``: sums already read, e.g. over
        processes); empty before the first step."""
        totals = self.sums() if totals is None else totals
        steps = self.steps if steps is None else steps
        return {k: v / max(steps, 1) for k, v in zip(self.keys, totals, strict=True)}


@dataclass
class Loop:
    """One training: ``model`` (``forward(inputs) -> (loss, logs)``) optimised on the batches
    of ``batches``, epoch by epoch. Hooks receive 0-based epochs:

    - ``on_epoch_start(epoch) -> frozen``: after ``model.train()``; sets what trains this
      epoch and returns whether the encoder is frozen (shown in progress).
    - ``on_epoch_end(epoch, logs)``: ``logs`` are the epoch's mean step logs (``loss`` first).
    - ``on_checkpoint(epoch)``: after ``on_epoch_end``, in the main process only.
    """

    what: str
    stage: Stage
    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    batches: EpochLoader
    runtime: Runtime
    #: Gradients clipped together (default: the model's parameters).
    params: list[nn.Parameter] | None = None
    #: A loader batch -> the model's inputs (outside autocast, full precision).
    prepare: Callable[[Any], Any] = _same
    #: The loader's seed for an epoch: epoch ``e`` draws the same batches whatever ran before.
    epoch_seed: Callable[[int], int] = _same
    grad_clip: float | None = None
    #: Where a NaN loss happened, for its message: (epoch, step), both 0-based.
    where: Callable[[int, int], str] = field(
        default=lambda epoch, step: f"Training (epoch {epoch + 1}, step {step + 1})")
    on_epoch_start: Callable[[int], bool] | None = None
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None
    on_checkpoint: Callable[[int], None] | None = None
    progress: Sink = discard

    def run(self, epochs: int, start_epoch: int = 0) -> float:
        """Train epochs ``start_epoch .. epochs-1``; return the seconds it took."""
        runtime = self.runtime
        emit = self.progress if runtime.is_main else discard
        params = list(self.model.parameters()) if self.params is None else self.params
        net = runtime.wrap(self.model)
        t0 = time.perf_counter()
        for epoch in range(start_epoch, epochs):
            self.schedule.apply(self.optimizer, epoch)
            self.model.train()
            frozen = bool(self.on_epoch_start(epoch)) if self.on_epoch_start else False
            loader = self.batches.epoch(self.epoch_seed(epoch))
            steps = len(loader)
            emit(EpochStarted(self.what, self.stage, epoch + 1, epochs, steps, frozen))
            meter, watch = Meter(), FiniteWatch()
            for step, batch in enumerate(loader):
                self._step(net, params, self.prepare(batch), epoch, step, steps, meter, watch)
                emit(StepEnded(self.what, self.stage, step + 1, steps,
                               time.perf_counter() - t0, meter.means))
            watch.check(lambda step, epoch=epoch: self.where(epoch, step), self.schedule.lr)
            totals = runtime.reduce_sum([*meter.sums(), float(meter.steps)])
            logs = meter.means(totals[:-1], totals[-1])
            emit(EpochEnded(self.what, self.stage, epoch + 1, epochs, logs,
                            time.perf_counter() - t0, frozen))
            if self.on_epoch_end:
                self.on_epoch_end(epoch, logs)
            if self.on_checkpoint and runtime.is_main:
                self.on_checkpoint(epoch)
        seconds = time.perf_counter() - t0
        if epochs > start_epoch:
            emit(TrainingEnded(self.what, self.stage, seconds))
        return seconds

    def _step(self, net: nn.Module, params: list[nn.Parameter], inputs: Any, epoch: int,
              step: int, steps: int, meter: Meter, watch: FiniteWatch) -> None:
        """One micro-batch; the optimizer steps after every ``grad_accumulation`` of them
        (and after an epoch's last). Each micro-batch's loss is divided by the number of
        micro-batches of its optimizer step, so the gradient is their mean."""
        runtime, every = self.runtime, self.runtime.grad_accumulation
        first = step % every == 0
        last = (step + 1) % every == 0 or step + 1 == steps
        group = min(every, steps - (step - step % every))
        with contextlib.nullcontext() if last else runtime.no_sync(net):
            with runtime.autocast():
                loss, logs = net(inputs)
            if runtime.nan_check_every_step:
                check_finite(loss, self.where(epoch, step), self.schedule.lr)
            else:
                watch.note(loss, step)
            if first:
                self.optimizer.zero_grad(set_to_none=True)
            (loss / group if group > 1 else loss).backward()
        if last:
            if self.grad_clip:
                nn.utils.clip_grad_norm_(params, self.grad_clip)
            self.optimizer.step()
        meter.add({"loss": loss.detach(), **logs})
