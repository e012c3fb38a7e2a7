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


def adapt_state_in_channels(
    pretrained: dict[str, torch.Tensor],
    target: dict[str, torch.Tensor],
    in_channels: int,
    mode: Literal["duplicate", "average"] = "duplicate",
) -> dict[str, torch.Tensor]:
    """Adapt every input-facing weight of ``pretrained`` to ``in_channels`` inputs.

    A tensor is input-facing when its shape differs from the target model's only in
    dimension 1, where the target has ``in_channels`` (a stem conv, or a residual block's
    1x1 projection of the input). Any other mismatch means a different architecture and is
    left for ``load_state_dict`` to report.
    """
    out = dict(pretrained)
    for key, weight in pretrained.items():
        want = target.get(key)
        if (
            want is not None
            and weight.dim() >= 2
            and weight.shape != want.shape
            and want.shape[1] == in_channels
            and weight.shape[:1] + weight.shape[2:] == want.shape[:1] + want.shape[2:]
        ):
            out = adapt_in_channels(out, key, in_channels, mode)
    return out
