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
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from medssl_bench.errors import ConfigError, did_you_mean

#: ``Field(..., json_schema_extra=NEUTRAL)``: the field cannot change a result (worker
#: processes, caches, evaluation batch size, which runs a sweep contains). Run keys leave it
#: out, so editing it reruns nothing.
NEUTRAL: dict[str, Any] = {"result_neutral": True}


#: ``Field(..., json_schema_extra=DATA_FOLDER)`` / ``DATA_FILE``: the field names the folder
#: (file) a dataset reads. `bench validate` and `bench run` refuse an unset or missing one
#: before anything loads.
DATA_FOLDER: dict[str, Any] = {"data_path": "folder"}
DATA_FILE: dict[str, Any] = {"data_path": "file"}


def since(version: str) -> dict[str, Any]:
    """``Field(..., json_schema_extra=since("0.2"))``: a field added after results were
    recorded. Run keys leave it out while it holds its default, so every result recorded
    before it existed keeps its key (and is not rerun)."""
    return {"since": version}


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
    """Read a YAML mapping, with one clear message when the path is missing, a folder, not
    readable, not UTF-8 text, or not a YAML mapping (never a raw decoding traceback)."""
    path = Path(path)
    name = str(path)
    if path.is_dir():
        inside = sorted(str(p) for p in (*path.glob("*.yaml"), *path.glob("*.yml")))
        example = f", e.g. --config {inside[0]}" if inside else ""
        raise ConfigError(f"Config file {name!r} is a folder, not a file. Give the path of a "
                          f"YAML file{example}.")
    if not path.is_file():
        raise ConfigError(f"Config file {name!r} does not exist. Check the path.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"Config file {name!r} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at "
            f"offset {exc.start}). Is it a YAML file? If so, save it with UTF-8 encoding."
        ) from None
    except OSError as exc:
        raise ConfigError(f"Config file {name!r} cannot be read: {exc.strerror or exc}.") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"Config file {name!r} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {name!r} must hold a mapping at the top level.")
    return data


def format_validation_error(
    exc: ValidationError,
    prefix: str,
    source: str | None = None,
    model: type[BaseModel] | None = None,
    unknown_hint: Callable[[str], str] | None = None,
    schema: str = "",
) -> str:
    """One readable message per failing field, each with its full dotted path.

    An unknown top-level field of ``model`` gets a did-you-mean among its fields (a typo is the
    usual cause), and ``unknown_hint(field)`` may add where the field does exist (another
    plugin than the one in effect). ``schema`` names the ``bench schema`` arguments that list
    the section's fields (e.g. ``dataset msd``)."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "")
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            hint = ""
            if model is not None and len(err["loc"]) == 1:
                key = str(err["loc"][0])
                hint = did_you_mean(key, model.model_fields)
                hint += unknown_hint(key) if unknown_hint else ""
            command = f"`bench schema {schema}`" if schema else "`bench schema`"
            msg = (f"unknown field.{hint} {command} lists the fields." if hint else
                   f"unknown field (check the spelling; {command} lists the fields)")
        given = err.get("input")
        shown = "" if err["type"] in ("extra_forbidden", "missing") else f" (got {given!r})"
        lines.append(f"{loc}: {msg}{shown}")
    where = f" in {source}" if source else ""
    return f"Invalid configuration{where}:\n  " + "\n  ".join(lines)


def validate_section(
    model: type[BaseModel],
    values: Mapping[str, Any] | None,
    prefix: str,
    source: str | None = None,
    unknown_hint: Callable[[str], str] | None = None,
    schema: str = "",
) -> Any:
    """Validate ``values`` with ``model``; raise :class:`ConfigError` naming the dotted path
    (``unknown_hint``, ``schema``: see :func:`format_validation_error`)."""
    if values is not None and not isinstance(values, Mapping):
        raise ConfigError(f"{prefix}: expected a mapping of settings, got {values!r}.")
    try:
        return model.model_validate(dict(values or {}))
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, prefix, source, model, unknown_hint,
                                                  schema)) from None


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
