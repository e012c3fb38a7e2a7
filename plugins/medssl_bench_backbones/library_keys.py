"""Mapping a published network's state dict onto our encoder and decoder by key prefixes.

The backbones built from other libraries' modules (``resenc3d`` from
dynamic-network-architectures, ``swinunetr`` from MONAI) keep those libraries' parameter
names, so a checkpoint from that ecosystem loads after nothing more than a prefix rewrite.
Each such backbone publishes its rewrite as an ordered list of :class:`PrefixRule`
(``library_key_rules``); :func:`split_library_state` applies it. Weight import (``bench
weights import``) and the tests use it; nothing here unpickles or reads files.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from torch import Tensor


@dataclass(frozen=True)
class PrefixRule:
    """A library key starting with ``library`` goes to ``part`` (``"encoder"``/``"decoder"``)
    with that prefix replaced by ``ours``; ``part=None`` drops it (``reason`` says why)."""

    library: str
    part: str | None
    ours: str = ""
    reason: str = ""


@dataclass
class SplitState:
    """The result of :func:`split_library_state`: per part, our keys; the dropped library
    keys with the reason; the library keys no rule matched."""

    parts: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)


def split_library_state(state: Mapping[str, Tensor], rules: Iterable[PrefixRule],
                        aliases: Mapping[str, str] | None = None) -> SplitState:
    """Rewrite ``state``'s keys by the first rule whose prefix matches (rules are ordered, the
    more specific first). A key containing one of ``aliases``' path segments (a library's
    duplicate registration of a tensor stored under another key too) is dropped with that
    reason. Keys no rule matches are listed in ``unmatched``, never guessed."""
    rules = list(rules)
    aliases = dict(aliases or {})
    out = SplitState()
    for key, value in state.items():
        alias = next((seg for seg in aliases if f".{seg}" in f".{key}"), None)
        rule = next((r for r in rules if key.startswith(r.library)), None)
        if alias is not None:
            out.dropped[key] = aliases[alias]
        elif rule is None:
            out.unmatched.append(key)
        elif rule.part is None:
            out.dropped[key] = rule.reason
        else:
            out.parts.setdefault(rule.part, {})[rule.ours + key[len(rule.library):]] = value
    return out
