"""Optimizer and learning-rate schedule, both chosen by config.

- ``optimizer``: ``adam`` (the default, what the papers used), ``adamw`` (decoupled weight
  decay) or ``sgd`` (Nesterov momentum, 0.99 by default, as nnU-Net).
- ``schedule``: the learning rate of each epoch. ``constant`` (the default); ``poly``
  (nnU-Net: ``lr * (1 - epoch / epochs) ** 0.9``); ``cosine`` (``lr * (1 + cos(pi *
  epoch / epochs)) / 2``). ``lr_warmup_epochs`` first ramps the rate up linearly
  (``lr * (epoch + 1) / lr_warmup_epochs``) and the schedule then runs over the epochs
  after the warm-up.

:class:`PretrainConfig` and :class:`FinetuneConfig` (in :mod:`medssl_bench.engine`) carry
the same fields, made by the factories below; every one is marked ``since("0.2")``, so runs
at the defaults keep their 0.1 keys.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from pydantic import Field

from medssl_bench.config import since

OptimizerName = Literal["adam", "adamw", "sgd"]
ScheduleName = Literal["constant", "poly", "cosine"]

#: nnU-Net's polynomial decay exponent.
POLY_POWER = 0.9


def optimizer_field() -> Any:
    return Field(default="adam", json_schema_extra=since("0.2"),
                 description="adam (the papers), adamw (decoupled weight decay) or sgd "
                 "(Nesterov momentum, see momentum; nnU-Net's choice with schedule=poly).")


def momentum_field() -> Any:
    return Field(default=0.99, ge=0, lt=1, json_schema_extra=since("0.2"),
                 description="SGD momentum (nnU-Net: 0.99), Nesterov when above 0; only "
                 "optimizer=sgd uses it.")


def schedule_field() -> Any:
    return Field(default="constant", json_schema_extra=since("0.2"),
                 description="Learning rate per epoch: constant (the papers); poly, nnU-Net's "
                 "lr*(1-epoch/epochs)^0.9; cosine, lr*(1+cos(pi*epoch/epochs))/2. After "
                 "lr_warmup_epochs, if any.")


def lr_warmup_field() -> Any:
    return Field(default=0, ge=0, json_schema_extra=since("0.2"),
                 description="Epochs of linear learning-rate warm-up (lr*(epoch+1)/N) before "
                 "the schedule, which then runs over the remaining epochs. Not the frozen-"
                 "encoder warm-up of fine-tuning (finetune.warmup_epochs).")


class OptimSettings(Protocol):
    """The config fields :func:`build_optimizer` and :func:`schedule_of` read."""

    lr: float
    weight_decay: float
    optimizer: OptimizerName
    momentum: float
    schedule: ScheduleName
    lr_warmup_epochs: int
    epochs: int


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimSettings) -> torch.optim.Optimizer:
    """The configured optimizer over ``params`` at the configured (peak) learning rate.
    ``weight_decay`` is L2 for adam and sgd, decoupled for adamw. On CUDA the fused kernels
    (:func:`fused_kernels`); elsewhere torch's default implementation."""
    params = list(params)
    fused = {"fused": True} if fused_kernels(params) else {}
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.momentum > 0, weight_decay=cfg.weight_decay, **fused)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")  # the config's Literal refuses it


def fused_kernels(params: list[torch.nn.Parameter]) -> bool:
    """Whether the optimizer step runs as torch's fused kernels: when every parameter is a
    floating-point CUDA tensor. One kernel per step instead of one (foreach) per operation:
    the step of a U-Net's ~100 parameter tensors is launch-bound on a fast GPU (issue 13:
    fused Adam was one of the levers that took the 128^3 fine-tuning step from 26 to 35
    volumes/s on an H200). Not on the CPU, where the results pinned by the regression sweep
    were computed with the default implementation (fused arithmetic differs in the last bits)."""
    return bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)


@dataclass(frozen=True)
class Schedule:
    """The learning rate of each epoch (0-based) of an ``epochs``-epoch training."""

    kind: ScheduleName
    lr: float
    epochs: int
    warmup_epochs: int = 0

    def __call__(self, epoch: int) -> float:
        if epoch < self.warmup_epochs:
            return self.lr * (epoch + 1) / self.warmup_epochs
        if self.kind == "constant":
            return self.lr
        span = max(self.epochs - self.warmup_epochs, 1)
        t = min((epoch - self.warmup_epochs) / span, 1.0)
        if self.kind == "poly":
            return self.lr * (1 - t) ** POLY_POWER
        if self.kind == "cosine":
            return self.lr * (1 + math.cos(math.pi * t)) / 2
        raise ValueError(f"unknown schedule {self.kind!r}")

    def apply(self, optimizer: torch.optim.Optimizer, epoch: int) -> float:
        """Set every parameter group's learning rate for ``epoch``; return it."""
        lr = self(epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr


def schedule_of(cfg: OptimSettings) -> Schedule:
    return Schedule(cfg.schedule, cfg.lr, cfg.epochs, cfg.lr_warmup_epochs)
