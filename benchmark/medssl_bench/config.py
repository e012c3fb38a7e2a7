"""Configuration: the base model every plugin ``Config`` derives from, YAML files,
``--set dotted.key=value`` overrides, and readable validation errors.

The resolved configuration of a run is a plain nested mapping with these sections::

    task:      the proxy task's Config fields
    backbone:  the backbone's Config fields
    dataset:   the dataset's Config fields
    protocol:  the protocol spec's settings (label fractions, seeds, metric, ...)
    pretrain:  pretraining hyperparameters (epochs, batch size, learning rate, ...)
    finetune:  fine-tuning hyperparameters (epochs, warm-up, learning rate, ...)

Each section is validated by its own pydantic model, so an error names the dotted path.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from medssl_bench.errors import ConfigError


class PluginConfig(BaseModel):
    """Base of every plugin's nested ``Config``: unknown keys are errors, values immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def parse_value(text: str) -> Any:
    """Parse an override value as YAML (``5``, ``1e-3``, ``[5,10]``, ``true``, ``abc``)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """Turn ``["a.b=1", "c=[1,2]"]`` into a nested mapping ``{"a": {"b": 1}, "c": [1, 2]}``."""
    result: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(
                f"--set {item!r} is not of the form dotted.key=value "
                "(for example --set pretrain.epochs=5)."
            )
        node = result
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r} conflicts with another override of {part!r}.")
            node = child
        node[parts[-1]] = parse_value(value)
    return result


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``base`` with ``override`` merged in; nested mappings merge, the rest replaces."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with a clear message when the file is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {str(path)!r} does not exist. Check the path.")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"Config file {str(path)!r} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {str(path)!r} must hold a mapping at the top level.")
    return data


def format_validation_error(exc: ValidationError, prefix: str, source: str | None = None) -> str:
    """One readable message per failing field, each with its full dotted path."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "")
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; `bench schema` lists the fields)"
        given = err.get("input")
        shown = "" if err["type"] in ("extra_forbidden", "missing") else f" (got {given!r})"
        lines.append(f"{loc}: {msg}{shown}")
    where = f" in {source}" if source else ""
    return f"Invalid configuration{where}:\n  " + "\n  ".join(lines)


def validate_section(
    model: type[BaseModel], values: Mapping[str, Any] | None, prefix: str, source: str | None = None
) -> Any:
    """Validate ``values`` with ``model``; raise :class:`ConfigError` naming the dotted path."""
    if values is not None and not isinstance(values, Mapping):
        raise ConfigError(f"{prefix}: expected a mapping of settings, got {values!r}.")
    try:
        return model.model_validate(dict(values or {}))
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, prefix, source)) from None


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten a nested mapping to dotted keys (MLflow params)."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flatten(value, dotted))
        else:
            out[dotted] = value
    return out
