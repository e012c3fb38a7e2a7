"""What each parallel worker may use: on a CPU run the local executor shares this
machine's cores out between its workers (torch's OpenMP threads spin while they wait, so
K workers that each take every core run many times slower than with their share); a
GPU worker keeps torch's default; a Slurm job uses the CPUs it asked for."""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch

from medssl_bench.parallel import LocalWorkers, SlurmJobs

CPU = SimpleNamespace(device=torch.device("cpu"))
GPU = SimpleNamespace(device=torch.device("cuda"))


def test_local_cpu_workers_share_the_cores_and_gpu_workers_keep_the_default():
    cores = len(os.sched_getaffinity(0))
    for workers in (1, 2, 3, 64):
        local = LocalWorkers(LocalWorkers.Config(workers=workers))
        assert local.worker_threads(CPU) == max(1, cores // workers)
        assert local.worker_threads(GPU) is None


def test_slurm_jobs_use_the_cpus_they_ask_for():
    slurm = SlurmJobs(SlurmJobs.Config(cpus_per_job=6, workers=4))
    assert slurm.worker_threads(CPU) == 6 and slurm.worker_threads(GPU) == 6


def test_each_job_spec_carries_its_workers_threads(tmp_path):
    from medssl_bench.plan import PretrainUnit

    unit = PretrainUnit(key="p", task="rotation3d", what="pretrain rotation3d")
    ctx = SimpleNamespace(device=torch.device("cpu"), run=None, force=False, inits=[],
                          store=SimpleNamespace(uri="http://127.0.0.1:1"), cache_dir=tmp_path)
    local = LocalWorkers(LocalWorkers.Config(workers=2))
    spec = local._spec(ctx, unit, {"p": unit})
    assert spec.threads == local.worker_threads(ctx) and spec.device == "cpu"
