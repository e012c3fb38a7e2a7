"""Protocol specs (``protocols/*.yaml``) and the resolution of a run's configuration.

Precedence, lowest first: each plugin's Config defaults (the papers' values) < the spec's
sections < the spec's ``dims2`` sections (2D datasets only) < the preset (the spec's
``presets.NAME`` and each plugin's ``presets[NAME]``) < the ``--config`` file < ``--set``
overrides.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
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
PRESETS = ("quick", "paper")


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

    def as_dict(self) -> dict[str, Any]:
        return {
            "names": dict(self.names),
            "preset": self.preset,
            "spec": {"name": self.spec.name, "version": self.spec.version},
            **{k: v.model_dump(mode="json") for k, v in self.configs.items()},
        }


def resolve_run(
    registry: Registry,
    protocol: str,
    task: str,
    backbone: str | None = None,
    dataset: str | None = None,
    preset: str | None = "quick",
    config_file: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> ResolvedRun:
    """Validate a run: plugin names, the spec and every config section."""
    file_data: dict[str, Any] = load_yaml(config_file) if config_file else {}
    run_section = file_data.pop("run", {}) or {}
    unknown = set(file_data) - set(SECTIONS)
    if unknown:
        raise ConfigError(
            f"Config file {config_file!r}: unknown top-level keys {sorted(unknown)}; allowed are "
            f"'run' and {', '.join(SECTIONS)}."
        )
    overrides = dict(overrides or {})
    bad = set(overrides) - set(SECTIONS)
    if bad:
        key = sorted(bad)[0]
        raise ConfigError(
            f"--set {key}...: unknown section {key!r}.{did_you_mean(key, SECTIONS)} "
            f"Sections: {', '.join(SECTIONS)}."
        )
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"--preset {preset!r}: choose one of {', '.join(PRESETS)}.")

    spec = load_spec(protocol)
    names = {
        "protocol": protocol,
        "task": task,
        "backbone": backbone or run_section.get("backbone") or "unet3d",
        "dataset": dataset or run_section.get("dataset") or "phantom3d",
    }
    classes = {
        "task": registry.get("task", names["task"]),
        "backbone": registry.get("backbone", names["backbone"]),
        "dataset": registry.get("dataset", names["dataset"]),
        "protocol": registry.get("protocol", names["protocol"]),
    }
    spec_preset = spec.presets.get(preset, {}) if preset else {}
    source = f"{config_file} / --set" if config_file else "--set"
    configs: dict[str, Any] = {}
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
        configs[section] = validate_section(model, values, section, source)
    return ResolvedRun(spec=spec, names=names, configs=configs, preset=preset)


def instantiate(registry: Registry, run: ResolvedRun) -> dict[str, Any]:
    """Plugin instances for a resolved run: task, backbone, dataset, protocol."""
    out: dict[str, Any] = {}
    for kind, base in (("task", ProxyTask), ("backbone", Backbone), ("dataset", Dataset),
                       ("protocol", Protocol)):
        cls = registry.get(kind, run.names[kind])
        instance = cls(run.configs[kind])
        assert isinstance(instance, base)
        out[kind] = instance
    return out
