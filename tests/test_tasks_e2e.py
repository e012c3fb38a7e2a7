"""`bench run --protocol data-efficiency --task T` end to end for the tasks of the OpenMind
comparison, on the procedural phantom and on the real MedMNIST 3D file, each beside scratch
on the leaderboard (tiny settings: 16^3 phantom, 28^3 MedMNIST, one step per epoch)."""

from __future__ import annotations

import pytest
from task_e2e import MEDMNIST, bench_run_beside_scratch

#: Task -> its own settings for tiny volumes (a 4^3 mask patch divides 16^3 and 28^3).
TASKS = {"simmim3d": ["task.mask_patch_size=4"], "spark3d": ["task.mask_patch_size=4"],
         "simclr3d": [], "voco3d": [], "volumefusion3d": [], "swinssl3d": []}


@pytest.mark.slow
@pytest.mark.parametrize("medmnist", [False, True], ids=["phantom3d", "adrenalmnist3d"])
@pytest.mark.parametrize("task", list(TASKS))
def test_bench_run_beside_scratch(task, medmnist, tmp_path, monkeypatch, capsys):
    if medmnist and not MEDMNIST.is_file():
        pytest.skip(f"{MEDMNIST} is not beside the checkout")
    bench_run_beside_scratch(task, tmp_path, monkeypatch, capsys, medmnist, TASKS[task])
