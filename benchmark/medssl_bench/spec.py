"""Protocol specs (``protocols/*.yaml``) and the resolution of a run's configuration.

Precedence, lowest first: each plugin's Config defaults (the papers' values) < the spec's
sections < the spec's ``dims2`` sections (2D datasets only) < the preset (the spec's
``presets.NAME`` and each plugin's ``presets[NAME]``) < the ``--config`` file < ``--set``
overrides.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from medssl_bench.config import (
    ConfigError,
    deep_merge,
    load_yaml,
    validate_section,
)
from medssl_bench.engine import FinetuneConfig, PretrainConfig
from medssl_bench.errors import did_you_mean
from medssl_bench.interfaces import Backbone, Dataset, Protocol, ProxyTask
from medssl_bench.plugins import Registry

SECTIONS = ("task", "backbone", "dataset", "protocol", "pretrain", "finetune")
#: Sections a --config file or --set may name: the above plus the transfer protocol's
#: pretraining corpus, validated by that dataset's own Config.
ALL_SECTIONS = (*SECTIONS, "pretrain_dataset")
PRESETS = ("quick", "paper")
RUN_KEYS = frozenset({"protocol", "task", "backbone", "dataset", "pretrain_dataset", "preset"})


class ProtocolSpec(BaseModel):
    """A versioned protocol spec file."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="Protocol name, as given to --protocol.")
    version: int = Field(ge=1, description="Bumped whenever results stop being comparable.")
    description: str = Field(default="", description="One line for `bench plugins`.")
    protocol: dict[str, Any] = Field(default_factory=dict, description="Protocol settings.")
    pretrain: dict[str, Any] = Field(default_factory=dict, description="Pretraining defaults.")
    finetune: dict[str, Any] = Field(default_factory=dict, description="Fine-tuning defaults.")
    presets: dict[str, dict[str, Any]] = Field(default_factory=dict, description="Named presets.")
    dims2: dict[Literal["protocol", "pretrain", "finetune"], dict[str, Any]] = Field(
        default_factory=dict,
        description="Settings merged over protocol/pretrain/finetune when the dataset is 2D "
        "(Taleb et al. appendix: other learning rates and warm-up for 2D); presets still win.")
    source: str = Field(default="", description="Where the spec was read from.")


def protocol_dirs() -> list[Path]:
    """Where spec files live: inside the wheel, then the checkout (editable installs)."""
    dirs = []
    packaged = resources.files("medssl_bench") / "_protocols"
    if packaged.is_dir():
        dirs.append(Path(str(packaged)))
    checkout = Path(__file__).resolve().parents[2] / "protocols"
    if checkout.is_dir():
        dirs.append(checkout)
    return dirs


def available_specs() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for folder in reversed(protocol_dirs()):
        for path in sorted(folder.glob("*.yaml")):
            found[path.stem] = path
    return found


def load_spec(name: str) -> ProtocolSpec:
    specs = available_specs()
    if name not in specs:
        raise ConfigError(
            f"No protocol spec named {name!r}.{did_you_mean(name, specs)} "
            f"Available: {', '.join(sorted(specs)) or 'none'}."
        )
    data = load_yaml(specs[name])
    spec = validate_section(ProtocolSpec, data, "", source=str(specs[name]))
    return spec.model_copy(update={"source": str(specs[name])})


@dataclass
class ResolvedRun:
    """Everything that defines a run, validated; plugin instances are built from it."""

    spec: ProtocolSpec
    names: dict[str, str]  # task / backbone / dataset / protocol -> plugin name
    configs: dict[str, Any]  # section -> validated pydantic config
    preset: str | None
    #: A sweep over several proxy tasks (``--task a,b`` or ``all``): name -> validated
    #: Config; ``names["task"]``/``configs["task"]`` are the first of them.
    task_configs: dict[str, Any] = field(default_factory=dict)

    @property
    def task_names(self) -> list[str]:
        return list(self.task_configs) or [self.names["task"]]

    def as_dict(self) -> dict[str, Any]:
        out = {
            "names": dict(self.names),
            "preset": self.preset,
            "spec": {"name": self.spec.name, "version": self.spec.version},
            **{k: v.model_dump(mode="json") for k, v in self.configs.items()},
        }
        if len(self.task_configs) > 1:
            out["tasks"] = {k: v.model_dump(mode="json") for k, v in self.task_configs.items()}
        return out


def expand_tasks(registry: Registry, task: str, dims: int) -> list[str]:
    """``a,b`` -> [a, b]; ``all`` -> every registered pretraining task of ``dims`` dims."""
    if task.strip() == "all":
        names = [n for n in registry.names("task")
                 if getattr(registry.get("task", n), "pretrains", True)
                 and getattr(registry.get("task", n), "spatial_dims", 3) == dims]
        if not names:
            raise ConfigError(f"--task all: no {dims}D pretraining task is registered.")
        return names
    names = [t.strip() for t in task.split(",") if t.strip()]
    if not names:
        raise ConfigError("--task needs a task name, a comma-separated list, or 'all'.")
    if len(set(names)) != len(names):
        raise ConfigError(f"--task {task!r} names a task twice.")
    for name in names:  # before anything trains: a 2D task on 3D images can only fail later
        cls = registry.get("task", name)
        if getattr(cls, "pretrains", True) and getattr(cls, "spatial_dims", dims) != dims:
            raise ConfigError(
                f"Task {name!r} is {cls.spatial_dims}D but the dataset is {dims}D. Pick a "
                f"{dims}D task (`bench plugins` lists them) or a {cls.spatial_dims}D dataset."
            )
    return names


def _task_values(values: dict[str, Any], name: str, cls: Any, many: list[str]) -> dict[str, Any]:
    """The task section for one task of a multi-task sweep: ``task.<name>.x`` for that task
    only, plain ``task.x`` for every task whose Config has a field ``x``."""
    shared = {k: v for k, v in values.items() if k not in many and k in cls.Config.model_fields}
    return deep_merge(shared, values.get(name) or {})


def _check_task_keys(values: dict[str, Any], many: list[str], registry: Registry) -> None:
    fields = {f for n in many for f in registry.get("task", n).Config.model_fields}
    unknown = sorted(k for k in values if k not in many and k not in fields)
    if unknown:
        raise ConfigError(f"task.{unknown[0]}: no task of this sweep ({', '.join(many)}) has "
                          f"that setting; use task.<task name>.<setting> for one task only.")


def resolve_run(
    registry: Registry,
    protocol: str,
    task: str,
    backbone: str | None = None,
    dataset: str | None = None,
    preset: str | None = "auto",
    config_file: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    pretrain_dataset: str | None = None,
) -> ResolvedRun:
    """Validate a run: plugin names, the spec and every config section.

    Nothing here loads data or touches a dataset's files (recipes validate on any machine).
    ``task`` may be ``a,b`` or ``all``; ``pretrain_dataset`` (transfer) names the corpus
    pretraining reads, configured by the ``pretrain_dataset`` section.
    """
    file_data: dict[str, Any] = load_yaml(config_file) if config_file else {}
    run_section = file_data.pop("run", {}) or {}
    unknown = set(file_data) - set(ALL_SECTIONS)
    if unknown:
        raise ConfigError(
            f"Config file {config_file!r}: unknown top-level keys {sorted(unknown)}; allowed are "
            f"'run' and {', '.join(ALL_SECTIONS)}."
        )
    overrides = dict(overrides or {})
    bad = set(overrides) - set(ALL_SECTIONS)
    if bad:
        key = sorted(bad)[0]
        raise ConfigError(
            f"--set {key}...: unknown section {key!r}.{did_you_mean(key, ALL_SECTIONS)} "
            f"Sections: {', '.join(ALL_SECTIONS)}."
        )
    if not isinstance(run_section, dict) or set(run_section) - RUN_KEYS:
        bad_keys = sorted(set(run_section) - RUN_KEYS) if isinstance(run_section, dict) else run_section
        raise ConfigError(
            f"Config file {config_file!r}: run: unknown keys {bad_keys}; allowed are "
            f"{', '.join(sorted(RUN_KEYS))}."
        )
    if preset == "auto":  # the command line wins, then the file's run.preset, then quick
        preset = run_section.get("preset", "quick")
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"--preset {preset!r}: choose one of {', '.join(PRESETS)}.")

    protocol = protocol or run_section.get("protocol") or ""
    if not protocol:
        raise ConfigError("No protocol: give --protocol NAME (or run.protocol in --config).")
    if not (task or run_section.get("task")):
        raise ConfigError("No task: give --task NAME (or run.task in --config).")
    spec = load_spec(protocol)
    names = {
        "protocol": protocol,
        "task": task or run_section.get("task") or "",
        "backbone": backbone or run_section.get("backbone") or "unet3d",
        "dataset": dataset or run_section.get("dataset") or "phantom3d",
    }
    dataset_cls = registry.get("dataset", names["dataset"])
    many = expand_tasks(registry, names["task"], getattr(dataset_cls, "spatial_dims", 3))
    names["task"] = many[0]
    pre_name = pretrain_dataset or run_section.get("pretrain_dataset")
    if pre_name:
        names["pretrain_dataset"] = pre_name
    elif file_data.get("pretrain_dataset") or overrides.get("pretrain_dataset"):
        raise ConfigError("A pretrain_dataset section was given without naming the dataset: "
                          "add --pretrain-dataset NAME (or run.pretrain_dataset in the file).")
    classes = {
        "task": registry.get("task", names["task"]),
        "backbone": registry.get("backbone", names["backbone"]),
        "dataset": registry.get("dataset", names["dataset"]),
        "protocol": registry.get("protocol", names["protocol"]),
    }
    spec_preset = spec.presets.get(preset, {}) if preset else {}
    source = f"{config_file} / --set" if config_file else "--set"
    configs: dict[str, Any] = {}
    task_configs: dict[str, Any] = {}
    for section in SECTIONS:
        values: dict[str, Any] = {}
        if section in ("protocol", "pretrain", "finetune"):
            values = deep_merge(values, getattr(spec, section))
            if getattr(classes["dataset"], "spatial_dims", 3) == 2:
                values = deep_merge(values, spec.dims2.get(section, {}))
        if section in classes and preset:
            values = deep_merge(values, classes[section].presets.get(preset, {}))
        values = deep_merge(values, spec_preset.get(section, {}))
        values = deep_merge(values, file_data.get(section) or {})
        values = deep_merge(values, overrides.get(section) or {})
        model = {"pretrain": PretrainConfig, "finetune": FinetuneConfig}.get(section)
        if model is None:
            model = classes[section].Config
        if section == "task" and len(many) > 1:
            shared = deep_merge(deep_merge(spec_preset.get("task", {}), file_data.get("task") or {}),
                                overrides.get("task") or {})
            _check_task_keys(shared, many, registry)
            for name in many:
                cls = registry.get("task", name)
                merged = deep_merge(cls.presets.get(preset, {}) if preset else {},
                                    _task_values(shared, name, cls, many))
                task_configs[name] = validate_section(cls.Config, merged, f"task.{name}", source)
            configs["task"] = task_configs[many[0]]
            continue
        configs[section] = validate_section(model, values, section, source)
    task_configs = task_configs or {many[0]: configs["task"]}
    if pre_name:
        pre_cls = registry.get("dataset", pre_name)
        values = pre_cls.presets.get(preset, {}) if preset else {}
        values = deep_merge(values, spec_preset.get("pretrain_dataset", {}))
        values = deep_merge(values, file_data.get("pretrain_dataset") or {})
        values = deep_merge(values, overrides.get("pretrain_dataset") or {})
        configs["pretrain_dataset"] = validate_section(pre_cls.Config, values, "pretrain_dataset",
                                                       source)
        if getattr(pre_cls, "spatial_dims", 3) != getattr(dataset_cls, "spatial_dims", 3):
            raise ConfigError(f"--pretrain-dataset {pre_name!r} is {pre_cls.spatial_dims}D but "
                              f"--dataset {names['dataset']!r} is {dataset_cls.spatial_dims}D; "
                              "transfer needs the same spatial dims.")
    return ResolvedRun(spec=spec, names=names, configs=configs, preset=preset,
                       task_configs=task_configs)


def instantiate(registry: Registry, run: ResolvedRun) -> dict[str, Any]:
    """Plugin instances for a resolved run: task, backbone, dataset, protocol."""
    out: dict[str, Any] = {}
    for kind, base in (("task", ProxyTask), ("backbone", Backbone), ("dataset", Dataset),
                       ("protocol", Protocol)):
        cls = registry.get(kind, run.names[kind])
        instance = cls(run.configs[kind])
        assert isinstance(instance, base)
        out[kind] = instance
    out["tasks"] = [registry.get("task", n)(c) for n, c in run.task_configs.items()] or [out["task"]]
    if "pretrain_dataset" in run.names:
        out["pretrain_dataset"] = registry.get("dataset", run.names["pretrain_dataset"])(
            run.configs["pretrain_dataset"])
    return out
