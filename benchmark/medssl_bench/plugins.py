"""Plugin discovery and the registry of tasks, backbones, datasets and protocols.

Built-in plugins are registered by module name; third-party ones come from the entry-point
group ``medssl_bench``. Each registration hook implementation is called on its own, so a
broken third-party plugin is recorded as failed while the rest keep working (set
``BENCH_RAISE_PLUGIN_ERRORS=1`` to re-raise). ``BENCH_DISABLE_PLUGIN_AUTOLOAD=1`` skips
entry points (tests).
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

import pluggy

from medssl_bench import __version__, hookspecs
from medssl_bench.config import PluginConfig
from medssl_bench.errors import BenchError, PluginNotFoundError, did_you_mean
from medssl_bench.interfaces import (
    Backbone,
    Dataset,
    Executor,
    Plugin,
    Protocol,
    ProxyTask,
    WeightFormat,
)

BUILTIN_MODULES = (
    "medssl_bench_tasks",
    "medssl_bench_backbones",
    "medssl_bench_datasets",
    "medssl_bench_protocols",
    "medssl_bench.executor",
)
KIND_BASES: dict[str, type[Plugin]] = {
    "task": ProxyTask,
    "backbone": Backbone,
    "dataset": Dataset,
    "protocol": Protocol,
    "executor": Executor,
    "weight_format": WeightFormat,
}
HOOK_FOR_KIND = {
    "task": "bench_register_tasks",
    "backbone": "bench_register_backbones",
    "dataset": "bench_register_datasets",
    "protocol": "bench_register_protocols",
    "executor": "bench_register_executors",
    "weight_format": "bench_register_weight_formats",
}
OWN_DISTRIBUTION = "medssl-bench"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


@dataclass
class PluginRecord:
    """One row of ``bench plugins``."""

    name: str
    kind: str
    distribution: str
    version: str
    status: str  # "ok" or "failed"
    cls: type[Plugin] | None = None
    error: str = ""
    source: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "distribution": self.distribution,
            "version": self.version,
            "status": self.status,
            "summary": self.cls.summary() if self.cls else "",
            "error": self.error,
            "source": self.source,
        }


class PluginConflictError(BenchError):
    """Two plugins registered the same name for one kind."""


class Registry:
    """Every registered plugin class, by kind and name."""

    def __init__(self) -> None:
        self._by_kind: dict[str, dict[str, PluginRecord]] = {k: {} for k in KIND_BASES}
        self.failures: list[PluginRecord] = []

    # ----------------------------------------------------------------- queries
    def names(self, kind: str) -> list[str]:
        return sorted(self._by_kind[kind])

    def get(self, kind: str, name: str) -> type[Plugin]:
        """The plugin class, or a :class:`PluginNotFoundError` with a did-you-mean hint."""
        if kind not in self._by_kind:
            raise PluginNotFoundError(
                f"Unknown plugin kind {kind!r}; choose one of {', '.join(KIND_BASES)}."
            )
        record = self._by_kind[kind].get(name)
        if record is None or record.cls is None:
            known = self.names(kind)
            failed = [f for f in self.failures if f.name == name]
            hint = (
                f" A plugin named {name!r} failed to load: {failed[0].error}"
                if failed
                else did_you_mean(name, known)
            )
            raise PluginNotFoundError(
                f"Unknown {kind} {name!r}.{hint} Installed {kind}s: {', '.join(known) or 'none'}. "
                "`bench plugins` lists everything installed."
            )
        return record.cls

    def distribution_version(self, kind: str, name: str) -> str:
        """``distribution==version`` of the package that provides the plugin (in run keys)."""
        record = self.record(kind, name)
        return f"{record.distribution}=={record.version}"

    def default(self, kind: str, dims: int | None = None) -> str | None:
        """The plugin of ``kind`` that declares itself the default (``Plugin.default``), of
        ``dims`` spatial dims when given; built-in plugins first. None when none does."""
        found = [r for r in self._by_kind[kind].values()
                 if r.cls is not None and r.cls.default
                 and (dims is None or getattr(r.cls, "spatial_dims", dims) == dims)]
        found.sort(key=lambda r: (r.distribution != OWN_DISTRIBUTION, r.name))
        return found[0].name if found else None

    def baseline_task(self) -> type[ProxyTask]:
        """The task that declares itself the baseline (``ProxyTask.baseline``); built-in
        first."""
        found = sorted((r for r in self._by_kind["task"].values()
                        if r.cls is not None and getattr(r.cls, "baseline", False)),
                       key=lambda r: (r.distribution != OWN_DISTRIBUTION, r.name))
        if not found:
            raise BenchError("No installed task declares itself the baseline "
                             "(ProxyTask.baseline = True); reinstall medssl-bench.")
        return found[0].cls  # type: ignore[return-value]

    def record(self, kind: str, name: str) -> PluginRecord:
        self.get(kind, name)
        return self._by_kind[kind][name]

    def records(self) -> list[PluginRecord]:
        rows = [r for kind in KIND_BASES for r in self._by_kind[kind].values()]
        return sorted(rows, key=lambda r: (list(KIND_BASES).index(r.kind), r.name)) + list(
            self.failures
        )

    # ----------------------------------------------------------------- building
    def add(self, kind: str, cls: Any, distribution: str, version: str, source: str) -> None:
        problem = validate_plugin_class(kind, cls)
        if problem:
            raise TypeError(problem)
        existing = self._by_kind[kind].get(cls.name)
        if existing is not None:
            raise PluginConflictError(
                f"Two {kind} plugins are named {cls.name!r}: one from distribution "
                f"{existing.distribution!r} ({existing.source}) and one from {distribution!r} "
                f"({source}). Uninstall one of them or rename its plugin."
            )
        self._by_kind[kind][cls.name] = PluginRecord(
            cls.name, kind, distribution, version, "ok", cls, source=source
        )


def validate_plugin_class(kind: str, cls: Any) -> str:
    """Why ``cls`` is not a valid plugin of ``kind``, or ``""`` if it is."""
    base = KIND_BASES[kind]
    label = getattr(cls, "__qualname__", repr(cls))
    if not (isinstance(cls, type) and issubclass(cls, base)):
        return f"{label} is registered as a {kind} but does not subclass {base.__name__}."
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        return f"{label} has no `name`."
    if not (cls.__doc__ or "").strip():
        return f"{kind} {name!r} ({label}) has no docstring."
    config = getattr(cls, "Config", None)
    if not (isinstance(config, type) and issubclass(config, PluginConfig)):
        return f"{kind} {name!r}: `Config` must subclass medssl_bench.config.PluginConfig."
    undocumented = [f for f, info in config.model_fields.items() if not info.description]
    if undocumented:
        return f"{kind} {name!r}: Config fields without a description: {', '.join(undocumented)}."
    if kind in ("task", "backbone", "dataset") and getattr(cls, "spatial_dims", None) not in (2, 3):
        return f"{kind} {name!r}: `spatial_dims` must be 2 or 3."
    return ""


def make_plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    return pm


def _entry_point_plugins(registry: Registry, pm: pluggy.PluginManager, raise_errors: bool):
    """Load entry-point modules; yield (plugin object, distribution, version, source)."""
    for ep in entry_points(group=hookspecs.PROJECT_NAME):
        dist = ep.dist.name if ep.dist else "unknown"
        version = ep.dist.version if ep.dist else "unknown"
        source = f"entry point {ep.name} = {ep.value}"
        try:
            obj = ep.load()
            pm.register(obj, name=f"{dist}:{ep.name}")
        except Exception as exc:
            if raise_errors:
                raise
            registry.failures.append(
                PluginRecord(ep.name, "plugin", dist, version, "failed",
                             error=f"{type(exc).__name__}: {exc}", source=source)
            )
            continue
        yield obj, dist, version, source


def build_registry(
    extra_plugins: Iterable[Any] = (), autoload: bool | None = None
) -> Registry:
    """Discover every plugin and return a fresh :class:`Registry`.

    :param extra_plugins: plugin objects (modules or instances) to register too; tests use it.
    :param autoload: load entry points; default unless ``BENCH_DISABLE_PLUGIN_AUTOLOAD=1``.
    """
    raise_errors = _env_flag("BENCH_RAISE_PLUGIN_ERRORS")
    if autoload is None:
        autoload = not _env_flag("BENCH_DISABLE_PLUGIN_AUTOLOAD")
    registry = Registry()
    pm = make_plugin_manager()
    sources: list[tuple[Any, str, str, str]] = []
    for module_name in BUILTIN_MODULES:
        module = importlib.import_module(module_name)
        pm.register(module, name=module_name)
        sources.append((module, OWN_DISTRIBUTION, __version__, f"module {module_name}"))
    for obj in extra_plugins:
        pm.register(obj)
        label = getattr(obj, "__name__", type(obj).__name__)
        sources.append((obj, "local", "0", f"object {label}"))
    if autoload:
        sources.extend(_entry_point_plugins(registry, pm, raise_errors))

    for obj, dist, version, source in sources:
        for kind, hook_name in HOOK_FOR_KIND.items():
            hook = getattr(obj, hook_name, None)
            if hook is None:
                continue
            builtin = dist == OWN_DISTRIBUTION
            added: list[type] = []
            try:
                hook(register=added.append)
                for cls in added:
                    registry.add(kind, cls, dist, version, source)
            except PluginConflictError:
                raise
            except Exception as exc:
                if raise_errors or builtin:
                    raise
                name = getattr(added[-1], "name", "?") if added else source
                registry.failures.append(
                    PluginRecord(str(name), kind, dist, version, "failed",
                                 error=f"{type(exc).__name__}: {exc}", source=source)
                )
    return registry


@functools.lru_cache(maxsize=1)
def get_registry() -> Registry:
    """The process-wide registry, built on first use."""
    return build_registry()


def reset_registry() -> None:
    """Forget the cached registry (after installing a plugin, or in tests)."""
    get_registry.cache_clear()
