"""The hooks a medssl-bench plugin implements.

A plugin is a module (or object) with functions named like the hooks below, decorated with
:data:`hookimpl`. Built-in plugins are registered by module name; a third-party package
registers a module under the entry-point group ``medssl_bench``::

    [project.entry-points.medssl_bench]
    my_tasks = "my_package.plugin"

Each hook receives a ``register`` callback. Call it once per class you provide; the class
must subclass the matching base in :mod:`medssl_bench.interfaces` and define ``name``,
a docstring and a nested pydantic ``Config``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

PROJECT_NAME = "medssl_bench"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

Register = Callable[[type], Any]


@hookspec
def bench_register_tasks(register: Register) -> None:
    """Register proxy tasks.

    :param register: call ``register(TaskClass)`` for each subclass of
        :class:`medssl_bench.interfaces.ProxyTask` the plugin provides.
    """


@hookspec
def bench_register_backbones(register: Register) -> None:
    """Register backbones (encoder, decoder and heads for one family of networks).

    :param register: call ``register(BackboneClass)`` for each subclass of
        :class:`medssl_bench.interfaces.Backbone`.
    """


@hookspec
def bench_register_datasets(register: Register) -> None:
    """Register datasets (unlabeled pool plus labeled train/val/test splits).

    :param register: call ``register(DatasetClass)`` for each subclass of
        :class:`medssl_bench.interfaces.Dataset`.
    """


@hookspec
def bench_register_protocols(register: Register) -> None:
    """Register protocol runners (how pretraining and fine-tuning are combined and scored).

    :param register: call ``register(ProtocolClass)`` for each subclass of
        :class:`medssl_bench.interfaces.Protocol`.
    """


@hookspec
def bench_register_executors(register: Register) -> None:
    """Register executors (how a plan's units are scheduled: in this process, in a pool of
    processes, on a cluster).

    :param register: call ``register(ExecutorClass)`` for each subclass of
        :class:`medssl_bench.interfaces.Executor`.
    """


@hookspec
def bench_register_weight_formats(register: Register) -> None:
    """Register published checkpoint layouts ``bench weights import --format NAME`` reads.

    :param register: call ``register(FormatClass)`` for each subclass of
        :class:`medssl_bench.interfaces.WeightFormat`.
    """
