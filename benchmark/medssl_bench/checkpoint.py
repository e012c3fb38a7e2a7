"""Pretraining checkpoints without pickle: tensors in a safetensors file, everything else
(epoch, history, optimizer hyperparameters) as JSON in that file's header.

``torch.save`` of an optimizer state is a pickle, and loading a pickle runs code; a shared
cache folder must never be able to do that. So the state ``engine.pretrain`` hands to
``on_checkpoint`` is flattened: every tensor (model, optimizer moments, RNG states) under a
path-like key, every other value into one JSON document. One file, replaced atomically, so
a process killed while writing leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from medssl_bench.errors import DataError

FORMAT = "medssl_bench.checkpoint/1"
_TENSOR = "__tensor__"


def _split(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON skeleton of ``value`` with tensors moved into ``tensors`` (replaced by markers)."""
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().to("cpu").contiguous()
        return {_TENSOR: path}
    if isinstance(value, dict):
        return {"__dict__": [[_key(k), _split(v, f"{path}/{k}", tensors)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"__tuple__": [_split(v, f"{path}/{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_split(v, f"{path}/{i}", tensors) for i, v in enumerate(value)]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"checkpoint: cannot store {type(value).__name__} at {path!r}")


def _key(key: Any) -> Any:
    """Dict keys keep their type (optimizer state is keyed by int)."""
    if isinstance(key, bool | int | str):
        return key
    raise TypeError(f"checkpoint: unsupported dict key {key!r}")


def _join(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(skeleton, dict):
        if _TENSOR in skeleton:
            return tensors[skeleton[_TENSOR]]
        if "__tuple__" in skeleton:
            return tuple(_join(v, tensors) for v in skeleton["__tuple__"])
        return {k: _join(v, tensors) for k, v in skeleton["__dict__"]}
    if isinstance(skeleton, list):
        return [_join(v, tensors) for v in skeleton]
    return skeleton


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` (nested dicts/lists/tuples of tensors and JSON scalars) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split(state, "s", tensors)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": FORMAT, "state": json.dumps(skeleton)})
    tmp.replace(path)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Inverse of :func:`save_checkpoint`; nothing is unpickled. Corrupt files are DataErrors."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        tensors = load_file(str(path))
        if meta.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} file")
        return _join(json.loads(meta["state"]), tensors)
    except (SafetensorError, OSError, ValueError, KeyError) as exc:
        raise DataError(
            f"Checkpoint {str(path)!r} cannot be read ({exc}). Delete it to restart that "
            "pretraining from the beginning."
        ) from None
