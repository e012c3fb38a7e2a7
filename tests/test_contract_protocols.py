"""Contract tests run over every registered protocol (the timm pattern): its spec loads from
the file the plugin names and validates under every preset, and its plan builds on tiny
settings with a unique run key per unit, every dependency planned before the unit that needs
it, and the baseline beside the tasks for every label subset. A newly registered protocol is
tested the moment it registers. Protocols are planned on phantom3d; one that declares it
evaluates classification datasets only (``Protocol.dataset_kinds``) on a tiny MedMNIST 3D
file in the official npz layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medssl_bench.context import RunContext
from medssl_bench.plan import FinetuneUnit, PretrainUnit
from medssl_bench.plugins import build_registry
from medssl_bench.spec import instantiate, load_spec, resolve_run

PROTOCOLS = build_registry(autoload=False).names("protocol")
TINY = {"dataset": {"size": 16, "n_unlabeled": 4, "n_train": 4, "n_val": 2, "n_test": 2},
        "backbone": {"filters": [4, 8]}}


@pytest.fixture(scope="module")
def npz(tmp_path_factory) -> Path:
    """A tiny MedMNIST v2 3D file (official layout: uint8 images, labels (N, 1))."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 6), ("val", 3), ("test", 4)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 16, 16, 16), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).astype(np.uint8)[:, None]
    path = tmp_path_factory.mktemp("medmnist") / "tinymnist3d.npz"
    np.savez_compressed(path, **arrays)
    return path


def _context(registry, name: str, npz: Path, task: str = "rotation3d,jigsaw3d") -> RunContext:
    cls = registry.get("protocol", name)
    overrides = dict(TINY)
    dataset = None
    if "segmentation" not in cls.dataset_kinds:  # a classification-only protocol
        overrides["dataset"], dataset = {"path": str(npz)}, "medmnist3d"
    if cls.uses_pretrain_dataset:  # a second corpus: the phantom generated from another seed
        overrides["pretrain_dataset"] = {**TINY["dataset"], "seed": 7}
    run = resolve_run(registry, name, task, dataset=dataset, overrides=overrides, preset="quick",
                      pretrain_dataset="phantom3d" if cls.uses_pretrain_dataset else None)
    return RunContext(registry=registry, run=run, plugins=instantiate(registry, run),
                      device=torch.device("cpu"), store=None, cache_dir=Path("unused"),
                      echo=lambda *a, **k: None)


@pytest.mark.parametrize("name", PROTOCOLS)
def test_spec_ships_beside_the_protocol_and_validates(registry, name):
    cls = registry.get("protocol", name)
    path = cls.spec_path()
    assert path.is_file(), f"{name}: no spec at {path}"
    spec = load_spec(name, registry)
    assert spec.name == name and spec.version >= 1 and spec.source == str(path)
    for preset in (None, *spec.presets):
        values = {**spec.protocol, **(spec.presets[preset].get("protocol", {}) if preset else {})}
        cls.Config.model_validate(values)


@pytest.mark.parametrize("name", PROTOCOLS)
def test_plan_builds_with_unique_keys_and_ordered_dependencies(registry, name, npz):
    ctx = _context(registry, name, npz)
    plan = registry.get("protocol", name)(ctx.run.configs["protocol"]).plan(ctx)
    keys = [u.key for u in plan]
    assert keys and len(keys) == len(set(keys)), "every unit needs its own run key"
    seen: set[str] = set()
    for unit in plan:
        assert unit.key and unit.what
        assert set(unit.depends_on) <= seen, f"{unit.what} runs before what it needs"
        if isinstance(unit, FinetuneUnit):
            assert isinstance(plan.get(unit.pretraining), PretrainUnit)
            assert len(unit.indices) == len(unit.subset_ids) >= 1
        seen.add(unit.key)
    finetunes = [u for u in plan if isinstance(u, FinetuneUnit)]
    assert finetunes, "a protocol plans at least one fine-tune"
    # the baseline beside the tasks: at every (seed, fraction) the baseline's fine-tune sits
    # in the same block as the tasks', so a sweep cut short can still compare what it has
    blocks: list[tuple[int, float]] = []
    for unit in finetunes:
        if not blocks or blocks[-1] != (unit.seed, unit.fraction):
            blocks.append((unit.seed, unit.fraction))
    assert len(blocks) == len(set(blocks)), "fine-tunes of one label subset are not together"
    for seed, fraction in blocks:
        group = [u for u in finetunes if (u.seed, u.fraction) == (seed, fraction)]
        assert [u.baseline for u in group].count(True) == 1, (seed, fraction)
        assert len({u.indices for u in group}) == 1, "tasks and baseline see other labels"


@pytest.mark.parametrize("name", PROTOCOLS)
def test_plan_is_the_same_when_planned_twice(registry, name, npz):
    first = _context(registry, name, npz)
    second = _context(registry, name, npz)
    plan_a = registry.get("protocol", name)(first.run.configs["protocol"]).plan(first)
    plan_b = registry.get("protocol", name)(second.run.configs["protocol"]).plan(second)
    assert [u.key for u in plan_a] == [u.key for u in plan_b]
