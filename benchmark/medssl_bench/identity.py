"""Run identity: hashes of everything that determines a result."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def key_of(payload: Any, length: int = 20) -> str:
    text = json.dumps(payload, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def ids_hash(ids: list[str]) -> str:
    return key_of(sorted(ids), 12)
