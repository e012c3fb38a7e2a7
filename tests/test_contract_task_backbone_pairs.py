"""Every 3D pretraining task on every 3D backbone: each pair either takes one pretraining step
on a tiny input (finite loss reaching the encoder) or is refused before anything loads with
the stated reason: the task requires a capability the backbone lacks (``requires`` vs
``provides``), refuses one it has (``refuses``), or the pair is in ``INCOMPATIBLE`` with
the reason written there. A task or backbone registered later joins the grid by itself."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from medssl_bench.errors import ConfigError
from medssl_bench.plugins import build_registry
from medssl_bench.spec import expand_tasks

REGISTRY = build_registry(autoload=False)
DIMS = 3
TASKS = [n for n in REGISTRY.names("task")
         if REGISTRY.get("task", n).pretrains and REGISTRY.get("task", n).spatial_dims == DIMS]
BACKBONES = [n for n in REGISTRY.names("backbone")
             if REGISTRY.get("backbone", n).spatial_dims == DIMS]

#: The smallest configuration of each backbone that still has its structure; a backbone not
#: listed runs at its ``quick`` preset.
TINY: dict[str, dict[str, Any]] = {
    "unet3d": {"filters": [4, 8, 16]},
    "resenc3d": {"n_stages": 3, "base_features": 4, "max_features": 8,
                 "blocks_per_stage": [1, 1, 1]},
}

#: Per task, settings over its ``quick`` preset that keep a step on the largest backbone
#: input (swinunetr: 64^3) affordable: CPC encodes every patch, each padded to that size.
TASK_TINY: dict[str, dict[str, Any]] = {
    "cpc3d": {"patches_per_side": 3, "predict_steps": 1, "volumes_per_step": 1,
              "num_negatives": 8},
}
#: Pairs that take more than a few seconds on one CPU thread (run, but marked slow).
SLOW = {("cpc3d", "swinunetr")}

#: (task, backbone) pairs that cannot work together for a reason the capabilities do not
#: express, with that reason. Empty: every pair the capabilities allow runs.
INCOMPATIBLE: dict[tuple[str, str], str] = {}


def _backbone(name: str):
    cls = REGISTRY.get("backbone", name)
    return cls(cls.Config.model_validate(TINY.get(name, cls.presets.get("quick", {}))))


def _size(task_cls, backbone) -> tuple[int, ...]:
    """The task's smallest input, raised to the backbone's smallest and rounded up to its
    size multiple."""
    step, low = backbone.size_multiple(), backbone.min_input_size()
    return tuple(-(-max(s, low) // step) * step for s in task_cls.min_input_size)


def _refusal(task: str, backbone: str) -> str | None:
    cls, bcls = REGISTRY.get("task", task), REGISTRY.get("backbone", backbone)
    missing = set(cls.requires) - set(bcls.provides)
    refused = set(cls.refuses) & set(bcls.provides)
    if missing:
        return f"needs {', '.join(sorted(missing))}"
    if refused:
        return f"cannot run on {', '.join(sorted(refused))}"
    return INCOMPATIBLE.get((task, backbone))


PAIRS = [pytest.param(t, b, id=f"{t}-{b}",
                      marks=[pytest.mark.slow] if (t, b) in SLOW else [])
         for t in TASKS for b in BACKBONES]


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_incompatible_pairs_name_registered_plugins_and_give_a_reason():
    for (task, backbone), reason in INCOMPATIBLE.items():
        assert task in TASKS and backbone in BACKBONES and reason.strip()


@pytest.mark.parametrize(("task", "backbone"), PAIRS)
def test_pair_steps_or_is_refused(task, backbone):
    reason = _refusal(task, backbone)
    if reason is not None:
        if (task, backbone) in INCOMPATIBLE:
            pytest.skip(f"documented incompatibility: {reason}")
        # the run is refused before anything loads, naming the capability
        with pytest.raises(ConfigError) as err:
            expand_tasks(REGISTRY, task, DIMS, backbone)
        cls, bcls = REGISTRY.get("task", task), REGISTRY.get("backbone", backbone)
        named = (set(cls.requires) - set(bcls.provides)) | (set(cls.refuses) & set(bcls.provides))
        assert all(cap in str(err.value) for cap in named)
        assert task not in expand_tasks(REGISTRY, "all", DIMS, backbone)
        return
    assert task in expand_tasks(REGISTRY, "all", DIMS, backbone)
    task_cls = REGISTRY.get("task", task)
    model = _backbone(backbone)
    runner = task_cls(task_cls.Config.model_validate(
        {**task_cls.presets.get("quick", {}), **TASK_TINY.get(task, {})}))
    encoder = model.build_encoder(1)
    heads = runner.build_heads(model, encoder)
    shape = _size(task_cls, model)
    images = torch.rand((2, 1, *shape), generator=torch.Generator().manual_seed(0))
    runner.check_input(shape, 1)
    batch = runner.make_batch(images, torch.Generator().manual_seed(0))
    loss, _ = runner.compute_loss(encoder, heads, batch)
    assert loss.dim() == 0 and torch.isfinite(loss), f"{task} on {backbone}: loss {loss}"
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.parameters()), \
        f"{task} on {backbone}: the loss does not reach the encoder"


@pytest.mark.parametrize("task", [n for n in REGISTRY.names("task")
                                  if REGISTRY.get("task", n).preferred_backbone])
def test_preferred_backbone_is_registered_and_fits(task):
    cls = REGISTRY.get("task", task)
    bcls = REGISTRY.get("backbone", cls.preferred_backbone)
    assert bcls.spatial_dims == cls.spatial_dims
    assert not set(cls.requires) - set(bcls.provides)
    assert not set(cls.refuses) & set(bcls.provides)
