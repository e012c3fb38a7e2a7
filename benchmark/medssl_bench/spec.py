"""Protocol specs (each protocol plugin's ``NAME.yaml``) and the resolution of a run's configuration.

Precedence, lowest first: each plugin's Config defaults (the papers' values) < the spec's
sections < the spec's ``dims2`` sections (2D datasets only) < the preset (the spec's
``presets.NAME`` and each plugin's ``presets[NAME]``) < the ``--config`` file < ``--set``
overrides.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from medssl_bench.config import (
    ConfigError,
    deep_merge,
    flatten,
    load_yaml,
    validate_section,
)
from medssl_bench.engine import FinetuneConfig, PretrainConfig
from medssl_bench.errors import did_you_mean
from medssl_bench.interfaces import Backbone, Dataset, Executor, Protocol, ProxyTask
from medssl_bench.plugins import Registry, get_registry

SECTIONS = ("task", "backbone", "dataset", "protocol", "pretrain", "finetune", "executor")
#: Sections a --config file or --set may name: the above plus the transfer protocol's
#: pretraining corpus, validated by that dataset's own Config.
ALL_SECTIONS = (*SECTIONS, "pretrain_dataset")
PRESETS = ("quick", "paper")
RUN_KEYS = frozenset({"protocol", "task", "backbone", "dataset", "pretrain_dataset", "preset",
                      "executor"})


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


def available_specs(registry: Registry | None = None) -> dict[str, Path]:
    """Each registered protocol's spec file (``Protocol.spec_path``), by protocol name."""
    registry = registry or get_registry()
    return {name: registry.get("protocol", name).spec_path()  # type: ignore[attr-defined]
            for name in registry.names("protocol")}


def load_spec(name: str, registry: Registry | None = None) -> ProtocolSpec:
    """The validated spec of protocol ``name``, read from the file its plugin names."""
    specs = available_specs(registry)
    if name not in specs:
        raise ConfigError(
            f"No protocol spec named {name!r}.{did_you_mean(name, specs)} "
            f"Available: {', '.join(sorted(specs)) or 'none'}."
        )
    if not specs[name].is_file():
        raise ConfigError(f"Protocol {name!r} names the spec file {specs[name]}, which does not "
                          "exist; reinstall the package that provides the protocol.")
    data = load_yaml(specs[name])
    spec = validate_section(ProtocolSpec, data, "", source=str(specs[name]))
    if spec.name != name:
        raise ConfigError(f"The spec file {specs[name]} is for protocol {spec.name!r}, not "
                          f"{name!r}; its `name` must match the protocol's.")
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
    #: Legal but probably unintended settings; `bench run` and `bench validate` print them.
    warnings: list[str] = field(default_factory=list)

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


def refused_capabilities(registry: Registry, task: str, backbone: str | None) -> list[str]:
    """What ``backbone`` offers that task ``task`` cannot work with (``ProxyTask.refuses``)."""
    if backbone is None or backbone not in registry.names("backbone"):
        return []
    provides = set(getattr(registry.get("backbone", backbone), "provides", ()))
    return [c for c in getattr(registry.get("task", task), "refuses", ()) if c in provides]


def missing_capabilities(registry: Registry, task: str, backbone: str | None) -> list[str]:
    """What task ``task`` requires (``ProxyTask.requires``) that ``backbone`` lacks."""
    if backbone is None or backbone not in registry.names("backbone"):
        return []
    provides = set(getattr(registry.get("backbone", backbone), "provides", ()))
    return [c for c in getattr(registry.get("task", task), "requires", ()) if c not in provides]


def expand_tasks(registry: Registry, task: str, dims: int,
                 backbone: str | None = None) -> list[str]:
    """``a,b`` -> [a, b]; ``all`` -> every registered pretraining task of ``dims`` dims that
    ``backbone`` offers the capabilities of (``ProxyTask.requires``)."""
    if task.strip() == "all":
        names = [n for n in registry.names("task")
                 if getattr(registry.get("task", n), "pretrains", True)
                 and getattr(registry.get("task", n), "spatial_dims", 3) == dims
                 and not missing_capabilities(registry, n, backbone)
                 and not refused_capabilities(registry, n, backbone)]
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
        missing = missing_capabilities(registry, name, backbone)
        if missing:
            offering = [b for b in registry.names("backbone")
                        if set(cls.requires) <= set(getattr(registry.get("backbone", b),
                                                            "provides", ()))]
            raise ConfigError(
                f"Task {name!r} needs a backbone offering {', '.join(missing)}, which "
                f"{backbone!r} does not. Use --backbone "
                f"{' or '.join(offering) or '(none registered offers it)'}.")
        refused = refused_capabilities(registry, name, backbone)
        if refused:
            fits = [b for b in backbones_of_dims(registry, dims)
                    if not set(cls.refuses) & set(getattr(registry.get("backbone", b),
                                                          "provides", ()))]
            raise ConfigError(
                f"Task {name!r} cannot run on a backbone offering {', '.join(refused)}, as "
                f"{backbone!r} does. Use --backbone {' or '.join(fits) or '(none registered)'}.")
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


def backbones_of_dims(registry: Registry, dims: int) -> list[str]:
    """Registered backbones for images of ``dims`` spatial dims."""
    return [n for n in registry.names("backbone")
            if getattr(registry.get("backbone", n), "spatial_dims", 3) == dims]


def default_backbone(registry: Registry, dims: int) -> str:
    """The backbone of a run without --backbone: the default backbone of the dataset's dims
    (``Backbone.default``: unet3d for 3D datasets, timm2d for 2D ones), else the first
    registered backbone of those dims. One fixed default would hand 2D images to a 3D
    network, which fails only deep inside PyTorch."""
    names = backbones_of_dims(registry, dims)
    preferred = registry.default("backbone", dims)
    if preferred in names:
        return preferred
    # none fits: check_backbone_dims says so
    return names[0] if names else (registry.default("backbone") or registry.names("backbone")[0])


def preferred_backbone(registry: Registry, task: str, dims: int) -> tuple[str | None, str]:
    """The backbone the named tasks prefer (``ProxyTask.preferred_backbone``) and a note for
    the user: the preference when every named pretraining task declares the same registered
    backbone of ``dims`` dims, else None (the dims' default), with a note when some task's
    preference could not be honoured. ``all`` uses the default."""
    if task.strip() == "all":
        return None, ""
    wanted: dict[str, str | None] = {}
    for name in (t.strip() for t in task.split(",") if t.strip()):
        cls = registry.get("task", name)
        if getattr(cls, "pretrains", True):
            wanted[name] = getattr(cls, "preferred_backbone", None)
    choices = set(wanted.values())
    if not choices or choices == {None}:
        return None, ""
    prefers = ", ".join(f"{t} prefers {b}" for t, b in wanted.items() if b)
    if len(choices) == 1:
        (choice,) = choices
        fits = backbones_of_dims(registry, dims)
        if choice in fits:
            return choice, ""
        return None, (f"{prefers} (the network of its paper), which is not a registered "
                      f"{dims}D backbone, so the default backbone is used; give --backbone "
                      f"to choose.")
    others = [t for t, b in wanted.items() if not b]
    rest = f"; {', '.join(others)} none" if others else ""
    return None, (f"the tasks prefer different backbones ({prefers}{rest}), so the default "
                  f"backbone is used for all; give --backbone to choose, or run them "
                  f"separately.")


def check_backbone_dims(registry: Registry, backbone: str, dataset: str) -> None:
    """Refuse a backbone whose spatial dims differ from the dataset's before anything
    trains, naming the backbones that fit."""
    bb_dims = getattr(registry.get("backbone", backbone), "spatial_dims", 3)
    ds_dims = getattr(registry.get("dataset", dataset), "spatial_dims", 3)
    if bb_dims == ds_dims:
        return
    fits = backbones_of_dims(registry, ds_dims)
    default = default_backbone(registry, ds_dims)
    fits = sorted(fits, key=lambda name: name != default)  # the default first
    if fits:
        fix = (f"Use a {ds_dims}D backbone: --backbone {fits[0]}"
               + (f" (or {', '.join(fits[1:])})" if fits[1:] else "")
               + f" (leaving --backbone out picks one), or a {bb_dims}D dataset.")
    else:
        fix = f"No {ds_dims}D backbone is installed (`bench plugins`); use a {bb_dims}D dataset."
    raise ConfigError(f"Backbone {backbone!r} is {bb_dims}D but dataset {dataset!r} is "
                      f"{ds_dims}D. {fix}")


def check_pretrain_dataset(protocol_cls: Any, given: bool, section_given: bool) -> None:
    """The transfer protocol needs --pretrain-dataset; same-dataset protocols refuse it
    (they would silently ignore it). Checked when resolving, so `bench validate` and
    `bench run` agree before anything loads."""
    name = protocol_cls.name
    uses = getattr(protocol_cls, "uses_pretrain_dataset", None)  # Protocol declares it
    if uses is True and not given:
        raise ConfigError(f"The {name} protocol needs the pretraining corpus: add "
                          "--pretrain-dataset NAME (or run.pretrain_dataset in --config), "
                          "configured by --set pretrain_dataset.key=value.")
    if uses is False and (given or section_given):
        what = "--pretrain-dataset" if given else "A pretrain_dataset section"
        raise ConfigError(f"{what} belongs to the transfer protocol; {name} pretrains on "
                          "--dataset itself. Drop it, or use --protocol transfer.")


def _unknown_hint(registry: Registry, kind: str, name: str, flag: str,
                  defaulted: bool) -> Callable[[str], str]:
    """For an unknown field of a plugin section: which plugin is in effect (saying so when
    it is the default, e.g. --dataset forgotten) and which other plugins have the field."""
    def hint(key: str) -> str:
        others = [n for n in registry.names(kind) if n != name
                  and key in registry.get(kind, n).Config.model_fields]
        if not defaulted and not others:
            return ""
        has = f"{kind}s with a {key!r} setting: {', '.join(others)}" if others else ""
        if defaulted:
            return (f" No {flag} was given, so the {kind} is the default {name!r}, which has no "
                    f"{key!r}. Give {flag} NAME (or run.{kind} in --config)"
                    + (f"; {has}." if has else "."))
        return f" {kind.capitalize()} {name!r} has no {key!r}; {has} ({flag} NAME)."
    return hint


def _check_warmup(cfg: FinetuneConfig, user: Mapping[str, Any], preset: str | None) -> list[str]:
    """warmup_epochs >= epochs freezes the pretrained encoder for the whole fine-tuning: an
    error when the user set warmup_epochs, a warning when it comes from the spec or preset
    (a quick --set finetune.epochs=1 trial) and only epochs was lowered."""
    if cfg.freeze != "warmup" or cfg.warmup_epochs < cfg.epochs:
        return []
    problem = (f"finetune.warmup_epochs={cfg.warmup_epochs} is not below finetune.epochs="
               f"{cfg.epochs}: with freeze=warmup the pretrained encoder stays frozen for the "
               "whole fine-tuning")
    fix = ("Lower warmup_epochs (e.g. --set finetune.warmup_epochs=0), raise finetune.epochs, "
           "or set finetune.freeze=frozen for a linear probe.")
    if "warmup_epochs" in user:
        raise ConfigError(f"{problem}. {fix}")
    return [f"{problem} (warmup_epochs is a default of the protocol spec or the "
            f"{preset or 'chosen'} preset, not set by you). {fix}"]


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
    executor: str | None = None,
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
        first = sorted(unknown)[0]
        raise ConfigError(
            f"Config file {config_file!r}: unknown top-level keys {sorted(unknown)}."
            f"{did_you_mean(first, ('run', *ALL_SECTIONS))} Allowed are "
            f"'run' and {', '.join(ALL_SECTIONS)}."
        )
    overrides = dict(overrides or {})
    bad = set(overrides) - set(ALL_SECTIONS)
    if bad:
        key = sorted(bad)[0]
        dotted = next(iter(flatten({key: overrides[key]})), key)  # the whole key as typed
        raise ConfigError(
            f"--set {dotted}: unknown section {key!r}.{did_you_mean(key, ALL_SECTIONS)} "
            f"Sections: {', '.join(ALL_SECTIONS)}."
        )
    if not isinstance(run_section, dict) or set(run_section) - RUN_KEYS:
        bad_keys = sorted(set(run_section) - RUN_KEYS) if isinstance(run_section, dict) else run_section
        hint = did_you_mean(str(bad_keys[0]), RUN_KEYS) if isinstance(run_section, dict) else ""
        raise ConfigError(
            f"Config file {config_file!r}: run: unknown keys {bad_keys}.{hint} Allowed are "
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
    spec = load_spec(protocol, registry)
    backbone = backbone or run_section.get("backbone")
    dataset = dataset or run_section.get("dataset")
    names = {
        "protocol": protocol,
        "task": task or run_section.get("task") or "",
        "dataset": dataset or registry.default("dataset") or "",
        "executor": executor or run_section.get("executor") or registry.default("executor") or "",
    }
    dataset_cls = registry.get("dataset", names["dataset"])
    dims = getattr(dataset_cls, "spatial_dims", 3)
    preferred, backbone_note = (None, "") if backbone else preferred_backbone(
        registry, names["task"], dims)
    names["backbone"] = backbone or preferred or default_backbone(registry, dims)
    many = expand_tasks(registry, names["task"], dims, names["backbone"])
    names["task"] = many[0]
    check_backbone_dims(registry, names["backbone"], names["dataset"])
    pre_name = pretrain_dataset or run_section.get("pretrain_dataset")
    pre_section = bool(file_data.get("pretrain_dataset") or overrides.get("pretrain_dataset"))
    check_pretrain_dataset(registry.get("protocol", protocol), bool(pre_name), pre_section)
    if pre_name:
        names["pretrain_dataset"] = pre_name
    elif pre_section:
        raise ConfigError("A pretrain_dataset section was given without naming the dataset: "
                          "add --pretrain-dataset NAME (or run.pretrain_dataset in the file).")
    flags = {"task": ("--task", False), "backbone": ("--backbone", not backbone),
             "dataset": ("--dataset", not dataset)}
    classes = {
        "task": registry.get("task", names["task"]),
        "backbone": registry.get("backbone", names["backbone"]),
        "dataset": registry.get("dataset", names["dataset"]),
        "protocol": registry.get("protocol", names["protocol"]),
        "executor": registry.get("executor", names["executor"]),
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
                task_configs[name] = validate_section(cls.Config, merged, f"task.{name}", source,
                                                      schema=f"task {name}")
            configs["task"] = task_configs[many[0]]
            continue
        hint = (_unknown_hint(registry, section, names[section], *flags[section])
                if section in flags else None)
        schema = section if section in ("pretrain", "finetune") else f"{section} {names[section]}"
        configs[section] = validate_section(model, values, section, source, hint, schema)
    task_configs = task_configs or {many[0]: configs["task"]}
    user_finetune = deep_merge(file_data.get("finetune") or {}, overrides.get("finetune") or {})
    warnings = _check_warmup(configs["finetune"], user_finetune, preset)
    if backbone_note:
        warnings.append(backbone_note)
    if pre_name:
        pre_cls = registry.get("dataset", pre_name)
        values = pre_cls.presets.get(preset, {}) if preset else {}
        values = deep_merge(values, spec_preset.get("pretrain_dataset", {}))
        values = deep_merge(values, file_data.get("pretrain_dataset") or {})
        values = deep_merge(values, overrides.get("pretrain_dataset") or {})
        configs["pretrain_dataset"] = validate_section(
            pre_cls.Config, values, "pretrain_dataset", source,
            _unknown_hint(registry, "dataset", pre_name, "--pretrain-dataset", False),
            f"dataset {pre_name}")
        if getattr(pre_cls, "spatial_dims", 3) != getattr(dataset_cls, "spatial_dims", 3):
            raise ConfigError(f"--pretrain-dataset {pre_name!r} is {pre_cls.spatial_dims}D but "
                              f"--dataset {names['dataset']!r} is {dataset_cls.spatial_dims}D; "
                              "transfer needs the same spatial dims.")
    return ResolvedRun(spec=spec, names=names, configs=configs, preset=preset,
                       task_configs=task_configs, warnings=warnings)


def _path_settings(config: BaseModel, prefix: str):
    """(dotted key, value, "folder" or "file") of every field the config declares a data
    location (:data:`medssl_bench.config.DATA_FOLDER` / ``DATA_FILE``)."""
    for key, info in type(config).model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        if extra.get("data_path"):
            yield f"{prefix}.{key}", getattr(config, key), extra["data_path"]


def check_data_paths(run: ResolvedRun) -> None:
    """Refuse an unset or missing dataset folder or file with one message. Cheap (no file is
    read), so `bench validate` finds what `bench run` would fail on when loading data; it is
    not part of :func:`resolve_run`, which must accept recipes' placeholder roots anywhere."""
    for section in ("dataset", "pretrain_dataset"):
        if section in run.configs:
            _check_paths(run.configs[section], section, run.names[section])


def check_source_paths(plugins: Mapping[str, Any]) -> None:
    """:func:`check_data_paths` for an adapter's source dataset (``slices`` of ``msd``): its
    ``source_config`` is a free dict, so only the built source's validated config shows the
    defaults (an unset ``root``)."""
    source = getattr(plugins.get("dataset"), "source", None)
    if isinstance(source, Dataset):
        _check_paths(source.config, "dataset.source_config", source.name)


def _check_paths(config: BaseModel, section: str, name: str) -> None:
    for key, value, kind in _path_settings(config, section):
        if not value:
            raise ConfigError(f"{key} is not set: dataset {name!r} reads its data from a "
                              f"{kind} there. Add --set {key}=/path/to/data "
                              f"(`bench schema dataset {name}` describes it).")
        found = Path(str(value)).expanduser()
        if not (found.is_dir() if kind == "folder" else found.is_file()):
            what = "does not exist" if not found.exists() else f"is not a {kind}"
            raise ConfigError(f"{key}={value!r} (dataset {name!r}) {what}. Check the path "
                              f"(--set {key}=...).")


def instantiate(registry: Registry, run: ResolvedRun) -> dict[str, Any]:
    """Plugin instances for a resolved run: task, backbone, dataset, protocol, executor."""
    out: dict[str, Any] = {}
    for kind, base in (("task", ProxyTask), ("backbone", Backbone), ("dataset", Dataset),
                       ("protocol", Protocol), ("executor", Executor)):
        cls = registry.get(kind, run.names[kind])
        instance = cls(run.configs[kind])
        assert isinstance(instance, base)
        out[kind] = instance
    out["tasks"] = [registry.get("task", n)(c) for n, c in run.task_configs.items()] or [out["task"]]
    if "pretrain_dataset" in run.names:
        out["pretrain_dataset"] = registry.get("dataset", run.names["pretrain_dataset"])(
            run.configs["pretrain_dataset"])
    return out
