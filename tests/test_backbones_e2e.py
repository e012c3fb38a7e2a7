"""Each new 3D backbone through a tiny `bench run --protocol data-efficiency` with a few
tasks beside scratch: resenc3d with a restoration task whose decoder transfers (genesis3d) and
a classification pretext (rotation3d); swinunetr picked without --backbone by the tasks that
prefer it (swinssl3d, voco3d)."""

from __future__ import annotations

import pytest
from task_e2e import bench_run_beside_scratch


@pytest.mark.slow
def test_resenc3d_runs_tasks_beside_scratch(tmp_path, monkeypatch, capsys):
    bench_run_beside_scratch("genesis3d,rotation3d", tmp_path, monkeypatch, capsys, False,
                             backbone="resenc3d", expect_backbone="resenc3d")


@pytest.mark.slow
def test_swinunetr_is_picked_by_the_tasks_that_prefer_it(tmp_path, monkeypatch, capsys):
    bench_run_beside_scratch("swinssl3d,voco3d", tmp_path, monkeypatch, capsys, False,
                             backbone=None, expect_backbone="swinunetr")
