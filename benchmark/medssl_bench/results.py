"""The result record of one fine-tune: everything needed to trust, rank and reproduce it."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ResultRecord(BaseModel):
    """Logged as ``result.json`` on every finished fine-tune run."""

    model_config = ConfigDict(extra="forbid")

    protocol: str
    spec_version: int
    dataset: str
    task: str
    backbone: str
    pretrain_dataset: str | None = Field(default=None, description="Differs from dataset in "
                                         "transfer; None for scratch.")
    dataset_ref: str = Field(default="", description="What published reference rows match "
                             "against, e.g. medmnist3d:adrenalmnist3d.")
    fraction: float = Field(description="Percent of the labeled training split used.")
    seed: int
    n_labeled: int
    subset_hash: str
    subset_ids: list[str]
    split_hash: str
    metric: str = Field(description="The main metric the protocol ranks by.")
    value: float
    test_metrics: dict[str, float]
    val_history: list[dict[str, float]]
    best_epoch: int
    run_key: str
    pretrain_key: str | None
    configs: dict[str, Any]
    versions: dict[str, str]
    device: str
    seconds: float
    epoch_seconds: list[float] = Field(default_factory=list, description="Wall time at the end "
                                       "of each fine-tuning epoch (convergence protocol).")
