"""Run identity: hashes of everything that determines a result."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel


def key_of(payload: Any, length: int = 20) -> str:
    text = json.dumps(payload, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def ids_hash(ids: list[str]) -> str:
    return key_of(sorted(ids), 12)


def semantic(config: BaseModel, exclude: frozenset[str] = frozenset()) -> dict[str, Any]:
    """A config as JSON for a run key: without the fields marked result-neutral
    (:data:`medssl_bench.config.NEUTRAL`), without fields added later (``since``) while they
    hold their default, and without ``exclude`` (settings the caller accounts for itself)."""
    data = config.model_dump(mode="json")
    out = {}
    for name, info in type(config).model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        if name in exclude or extra.get("result_neutral"):
            continue
        if extra.get("since") and getattr(config, name) == info.get_default(
                call_default_factory=True):
            continue
        out[name] = data[name]
    return out
