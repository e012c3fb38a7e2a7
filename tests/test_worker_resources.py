"""What each parallel worker may use: on a CPU run the local executor shares this
machine's cores out between its workers and the processes of a DDP unit (torch's OpenMP
threads spin while they wait, so K workers that each take every core run many times slower
than with their share); a GPU worker keeps torch's default; a Slurm task uses the CPUs it
asked for; a unit trained by N processes is one job of N tasks."""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch

from medssl_bench.parallel import LocalWorkers, SlurmJobs, unit_processes
from medssl_bench.plan import FinetuneUnit, PretrainUnit

PRE = PretrainUnit(key="p", task="rotation3d", what="pretrain rotation3d")
FINE = FinetuneUnit(key="f", task="rotation3d", what="ft", depends_on=("p",), fraction=100,
                    seed=0, indices=(0,), subset_ids=("a",), pretrain_dataset=None,
                    metric="dice", setup="", task_setup="", dataset_ref="", label="")


def _ctx(device: str, pretrain_processes: int = 1, **more) -> SimpleNamespace:
    run = SimpleNamespace(configs={"pretrain": SimpleNamespace(world_size=pretrain_processes),
                                   "finetune": SimpleNamespace(world_size=1)})
    return SimpleNamespace(device=torch.device(device), run=run, **more)


def test_local_cpu_workers_share_the_cores_and_gpu_workers_keep_the_default():
    cores = len(os.sched_getaffinity(0))
    for workers in (1, 2, 3, 64):
        local = LocalWorkers(LocalWorkers.Config(workers=workers))
        assert local.worker_threads(_ctx("cpu"), FINE) == max(1, cores // workers)
        assert local.worker_threads(_ctx("cuda"), FINE) is None
    local = LocalWorkers(LocalWorkers.Config(workers=1))
    ddp = _ctx("cpu", pretrain_processes=2)
    assert unit_processes(ddp.run, PRE) == 2 and unit_processes(ddp.run, FINE) == 1
    assert local.worker_threads(ddp, PRE) == max(1, cores // 2)  # per process of the unit
    assert local.worker_threads(ddp, FINE) == cores


def test_slurm_tasks_use_their_cpus_and_a_ddp_unit_is_one_job_of_n_tasks():
    slurm = SlurmJobs(SlurmJobs.Config(cpus_per_job=6, workers=4, gpus_per_job=1))
    assert slurm.worker_threads(_ctx("cpu"), FINE) == 6
    assert slurm.worker_threads(_ctx("cuda", 4), PRE) == 6
    one, four = slurm.job_parameters(FINE), slurm.job_parameters(PRE, 4)
    assert (one["tasks_per_node"], one["gpus_per_node"], one["nodes"]) == (1, 1, 1)
    assert (four["tasks_per_node"], four["gpus_per_node"], four["nodes"]) == (4, 4, 1)
    assert four["cpus_per_task"] == 6


def test_each_job_spec_carries_its_workers_threads(tmp_path):
    ctx = _ctx("cpu", force=False, inits=[], cache_dir=tmp_path,
               store=SimpleNamespace(uri="http://127.0.0.1:1"))
    local = LocalWorkers(LocalWorkers.Config(workers=2))
    spec = local._spec(ctx, PRE, {"p": PRE})
    assert spec.threads == local.worker_threads(ctx, PRE) and spec.device == "cpu"


def test_the_in_process_debug_cluster_refuses_a_unit_of_several_processes(tmp_path):
    import pytest

    from medssl_bench.errors import ConfigError

    slurm = SlurmJobs(SlurmJobs.Config(cluster="debug", folder=str(tmp_path)))
    with pytest.raises(ConfigError, match="world_size.*cluster=slurm or local"):
        slurm.make_executor(_ctx("cpu", pretrain_processes=2))
    assert slurm.make_executor(_ctx("cpu")) is not None


def test_local_ddp_units_need_a_gpu_per_process(tmp_path):
    """Refused before anything is submitted, naming the setting and the fix."""
    import pytest

    from medssl_bench.errors import ConfigError

    local = LocalWorkers(LocalWorkers.Config(workers=1, folder=str(tmp_path),
                                             devices=[0, 1]))
    with pytest.raises(ConfigError, match="pretrain.world_size=3.*2 GPUs.*executor.devices"):
        local.make_executor(_ctx("cuda", pretrain_processes=3))
    assert local.make_executor(_ctx("cuda", pretrain_processes=2)) is not None
