"""A run without --backbone asks the tasks (``ProxyTask.preferred_backbone``): the backbone
every named task prefers when they agree (swinssl3d and voco3d: swinunetr, the network of
their papers), else the dataset dims' default with a note saying why; --backbone always
wins, and tasks without a preference (the 0.1 tasks) keep unet3d."""

from __future__ import annotations

import pytest

from medssl_bench.plugins import build_registry
from medssl_bench.spec import resolve_run
from medssl_bench_tasks.rotation import Rotation3D


def _run(registry, task, backbone=None):
    return resolve_run(registry, "data-efficiency", task, backbone, "phantom3d", None)


@pytest.mark.parametrize("task", ["swinssl3d", "voco3d", "swinssl3d,voco3d"])
def test_tasks_that_agree_get_their_backbone(registry, task):
    run = _run(registry, task)
    assert run.names["backbone"] == "swinunetr"
    assert not [w for w in run.warnings if "prefer" in w]


@pytest.mark.parametrize("task", ["rotation3d", "rotation3d,jigsaw3d,rpl3d", "all"])
def test_tasks_without_a_preference_keep_the_default(registry, task):
    run = _run(registry, task)
    assert run.names["backbone"] == "unet3d"
    assert not [w for w in run.warnings if "prefer" in w]


def test_disagreeing_tasks_get_the_default_with_a_note(registry):
    run = _run(registry, "swinssl3d,rotation3d")
    assert run.names["backbone"] == "unet3d"
    (note,) = [w for w in run.warnings if "prefer" in w]
    assert "swinssl3d prefers swinunetr" in note and "rotation3d" in note
    assert "--backbone" in note


def test_the_backbone_flag_wins(registry):
    run = _run(registry, "swinssl3d", "unet3d")
    assert run.names["backbone"] == "unet3d"
    assert not [w for w in run.warnings if "prefer" in w]


def test_a_preference_for_an_unregistered_backbone_falls_back_with_a_note():
    registry = build_registry(autoload=False)

    class Picky(Rotation3D):
        """Rotation that prefers a backbone nobody registered."""

        name = "picky3d"
        preferred_backbone = "no-such-net"

    registry.add("task", Picky, "tests", "0", "tests")
    run = _run(registry, "picky3d")
    assert run.names["backbone"] == "unet3d"
    (note,) = [w for w in run.warnings if "prefer" in w]
    assert "no-such-net" in note and "not a registered 3D backbone" in note
