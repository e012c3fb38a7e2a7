"""Every registered proxy task, tested the moment it registers (the timm pattern): it builds
heads for a real encoder, makes a batch on the images' device deterministically, takes one
optimisation step with a finite loss, and accepts multi-channel input."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from medssl_bench.plugins import build_registry

REGISTRY = build_registry(autoload=False)
TASKS = [n for n in REGISTRY.names("task") if REGISTRY.get("task", n).pretrains]


def _images(task_cls, channels: int, batch: int = 2) -> torch.Tensor:
    size = tuple(max(32, s) for s in task_cls.min_input_size)
    return torch.rand((batch, channels, *size), generator=torch.Generator().manual_seed(1))


def _backbone(task_cls):
    if task_cls.requires:  # the first backbone of its dims offering what the task requires
        name = next(n for n in REGISTRY.names("backbone")
                    if REGISTRY.get("backbone", n).spatial_dims == task_cls.spatial_dims
                    and set(task_cls.requires) <= set(REGISTRY.get("backbone", n).provides))
        cls = REGISTRY.get("backbone", name)
        return cls(cls.Config(**cls.presets.get("quick", {})))
    if task_cls.spatial_dims == 3:
        cls = REGISTRY.get("backbone", "unet3d")
        return cls(cls.Config(filters=[8, 16, 32], width=1.0))
    candidates = [n for n in REGISTRY.names("backbone")
                  if REGISTRY.get("backbone", n).spatial_dims == task_cls.spatial_dims]
    cls = REGISTRY.get("backbone", candidates[0])
    return cls(cls.Config(**cls.presets.get("quick", {})))  # the CPU-sized variant


@pytest.mark.parametrize("name", TASKS)
@pytest.mark.parametrize("channels", [1, 2, 4])
def test_task_step(name, channels):
    task_cls = REGISTRY.get("task", name)
    task = task_cls()
    backbone = _backbone(task_cls)
    encoder = backbone.build_encoder(channels)
    heads = task.build_heads(backbone, encoder)
    images = _images(task_cls, channels)
    task.check_input(tuple(images.shape[2:]), channels)
    batch = task.make_batch(images, torch.Generator().manual_seed(0))
    loss, logs = task.compute_loss(encoder, heads, batch)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert all(isinstance(v, float) for v in logs.values())
    loss.backward()
    grads = [p.grad for p in encoder.parameters() if p.grad is not None]
    assert grads, f"{name}: the loss does not reach the encoder"


class _ForwardOnly(torch.nn.Module):
    """What a DDP wrapper offers a task: the encoder's ``forward``, none of its methods."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.wrapped = [encoder]  # not a submodule: nothing of it is reachable but forward
        self.calls = 0

    def forward(self, x: torch.Tensor, **kwargs) -> list[torch.Tensor]:
        self.calls += 1
        return self.wrapped[0](x, **kwargs)  # keyword arguments pass, as DDP passes them


@pytest.mark.parametrize("name", TASKS)
def test_task_calls_the_encoder_through_forward(name):
    """The loop may hand a task a compiled or distributed wrapper of the encoder, which only
    sees ``forward``: a task must call ``encoder(x)`` (pooling with ``global_pool``)."""
    task_cls = REGISTRY.get("task", name)
    task = task_cls()
    backbone = _backbone(task_cls)
    encoder = backbone.build_encoder(1)
    heads = task.build_heads(backbone, encoder)
    batch = task.make_batch(_images(task_cls, 1), torch.Generator().manual_seed(0))
    wrapper = _ForwardOnly(encoder)
    loss, _ = task.compute_loss(wrapper, heads, batch)
    assert wrapper.calls >= 1 and torch.isfinite(loss)
    loss.backward()
    assert any(p.grad is not None for p in encoder.parameters())


@pytest.mark.parametrize("name", TASKS)
def test_task_batches_repeat_with_seed(name):
    task_cls = REGISTRY.get("task", name)
    task = task_cls()
    images = _images(task_cls, 1)
    a = task.make_batch(images, torch.Generator().manual_seed(3))
    b = task.make_batch(images, torch.Generator().manual_seed(3))
    c = task.make_batch(images, torch.Generator().manual_seed(4))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key])
    assert any(not torch.equal(a[k], c[k]) for k in a), f"{name}: the seed changes nothing"


@pytest.mark.parametrize("kind", ["task", "backbone", "dataset", "protocol"])
def test_every_plugin_is_documented(kind):
    for name in REGISTRY.names(kind):
        cls = REGISTRY.get(kind, name)
        assert cls.summary(), f"{kind} {name} has no docstring"
        for field, info in cls.Config.model_fields.items():
            assert info.description, f"{kind} {name}: field {field} has no description"
        cls.Config()  # defaults validate
        for preset, values in cls.presets.items():
            try:
                cls.Config.model_validate(values)
            except ValidationError as exc:
                pytest.fail(f"{kind} {name}: preset {preset!r} does not validate: {exc}")



@pytest.mark.parametrize("name", REGISTRY.names("task"))
def test_every_task_declares_its_family_or_is_the_baseline(name):
    from medssl_bench.interfaces import TASK_FAMILIES

    cls = REGISTRY.get("task", name)
    if cls.baseline:
        assert cls.family == "", f"{name}: the baseline belongs to no method family"
    else:
        assert cls.family in TASK_FAMILIES, (
            f"{name}: family {cls.family!r} is not one of {TASK_FAMILIES}")
