"""Published reference rows (``published.yaml``) matched to measured leaderboard sections."""

from __future__ import annotations

from collections import defaultdict
from functools import lru_cache
from importlib import resources
from typing import Any

import yaml

from medssl_bench.leaderboard.stats import SECTION_KEYS, Row


@lru_cache(maxsize=1)
def published_rows() -> list[dict[str, Any]]:
    """Reference numbers shipped in ``published.yaml`` (source, dataset, split, metric, ...)."""
    text = (resources.files("medssl_bench") / "published.yaml").read_text()
    return list(yaml.safe_load(text)["rows"])


def matching_published(rows: list[Row]) -> list[dict[str, Any]]:
    """Published rows whose dataset and metric match a measured section (each labelled)."""
    wanted: dict[tuple[str, str], set[tuple]] = defaultdict(set)
    for r in rows:
        wanted[(r.dataset_ref, r.metric)].add(r.section)
    out = []
    for p in published_rows():
        for section in sorted(wanted.get((p["dataset"], p["metric"]), ()), key=str):
            out.append({**dict(zip(SECTION_KEYS, section, strict=True)), **{
                "reference": True, "method": p["method"], "source": p["source"],
                "split": p["split"], "ref_protocol": p["protocol"], "value": p["value"],
                "std": p.get("std"), "ref_dataset": p["dataset"]}})
    return out
