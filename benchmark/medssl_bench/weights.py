"""Saving and loading weights as safetensors (nothing is unpickled), and input-channel
adaptation between pretraining and fine-tuning."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from medssl_bench.errors import DataError

StateDicts = dict[str, dict[str, torch.Tensor]]


def save_weights(parts: StateDicts, path: str | Path, metadata: dict | None = None) -> Path:
    """Save several state dicts (``{"encoder": sd, "decoder": sd}``) into one safetensors file.

    Keys are stored as ``part/param``; ``metadata`` (JSON-able) goes into the header.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = {
        f"{part}/{key}": value.detach().to("cpu").contiguous()
        for part, sd in parts.items()
        for key, value in sd.items()
    }
    tmp = path.with_suffix(".tmp")
    save_file(flat, str(tmp), metadata={"medssl_bench": json.dumps(metadata or {})})
    tmp.replace(path)  # atomic: a killed process never leaves a half-written file
    return path


def load_weights(path: str | Path) -> StateDicts:
    """Inverse of :func:`save_weights`; a corrupt file is a :class:`DataError`."""
    path = Path(path)
    try:
        flat = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise DataError(
            f"Weights file {str(path)!r} cannot be read ({exc}). Delete it and rerun to retrain."
        ) from None
    parts: StateDicts = {}
    for key, value in flat.items():
        part, _, param = key.partition("/")
        parts.setdefault(part, {})[param] = value
    return parts


def adapt_in_channels(
    state: dict[str, torch.Tensor],
    key: str,
    in_channels: int,
    mode: Literal["duplicate", "average"] = "duplicate",
) -> dict[str, torch.Tensor]:
    """Make the first layer's weight ``state[key]`` accept ``in_channels`` inputs.

    ``duplicate`` (Taleb et al. appendix) copies the pretrained input channels cyclically;
    ``average`` gives every new channel the mean over the pretrained ones, scaled so the
    summed response to identical inputs stays the same.
    """
    weight = state[key]
    have = weight.shape[1]
    if have == in_channels:
        return state
    if mode == "duplicate":
        index = torch.arange(in_channels) % have
        new = weight[:, index].clone()
    else:
        mean = weight.mean(dim=1, keepdim=True) * have / in_channels
        new = mean.expand(-1, in_channels, *weight.shape[2:]).clone()
    return {**state, key: new}
