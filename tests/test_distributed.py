"""Multi-process training (DDP) on the CPU: 2 gloo processes train as 1 process at the same
global batch, evaluation scores every case once, and `bench run --nproc-per-node 2` records
each unit once and reports a crashed rank by its number, leaving no run RUNNING."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import RandomSampler

from medssl_bench.engine import FinetuneConfig, PretrainConfig, finetune, pretrain
from medssl_bench.interfaces import ProxyTask
from medssl_bench.runtime import Runtime, ShardedBatches

ROOT = Path(__file__).resolve().parents[1]
#: Per-process batch in the 2-process runs; the 1-process run uses twice it.
BATCH = 2


# --------------------------------------------------------------------------- batches


@pytest.mark.parametrize(("count", "replacement"), [(8, False), (7, False), (12, True)])
def test_ranks_read_the_global_batch_one_process_reads(count, replacement):
    """2 ranks x batch 2 take, step by step, the 4 volumes one process at batch 4 takes
    (with and without replacement); a pass of 7 is completed to equal steps per rank."""
    def draws(world: int, rank: int, batch: int) -> list[list[int]]:
        sampler = RandomSampler(range(count), replacement=replacement,
                                num_samples=count if replacement else None,
                                generator=torch.Generator().manual_seed(3))
        return list(ShardedBatches(sampler, batch, rank, world))

    one = draws(1, 0, 2 * BATCH)
    ranks = [draws(2, r, BATCH) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(one)
    if count % 2 == 0:
        assert [a + b for a, b in zip(*ranks, strict=True)] == one
    else:  # the last global batch (3 draws) is completed by the pass's first draw
        assert [a + b for a, b in zip(*ranks, strict=True)][:-1] == one[:-1]
        assert ranks[0][-1] + ranks[1][-1] == [*one[-1], one[0][0]]
    assert all(len(b) == len(ranks[0][0]) for b in ranks[0][:-1])


# --------------------------------------------------------------------------- equivalence


class Restore3D(ProxyTask):
    """A deterministic proxy task (reconstruct the input): batch construction draws nothing,
    so 2 processes and 1 process see identical batches and must compute identical steps."""

    name = "restore-test"
    spatial_dims = 3

    def build_heads(self, backbone, encoder):
        return torch.nn.ModuleDict({"decoder": backbone.build_decoder(encoder, 1)})

    def make_batch(self, images, generator):
        return {"x": images}

    def compute_loss(self, encoder, heads, batch):
        x = batch["x"]
        return F.mse_loss(heads["decoder"](encoder(x)), x), {}


class Seen(TorchDataset):
    """A dataset that notes which cases were read."""

    def __init__(self, inner: TorchDataset) -> None:
        self.inner, self.read = inner, []

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        self.read.append(index)
        return self.inner[index]


def _train(runtime: Runtime, batch: int, backbone: str = "unet3d") -> dict:
    """Pretrain (2 epochs x 2 steps, no replacement) then fine-tune (2 epochs x 2 steps, with
    replacement) at ``batch`` per process; 3 val and 3 test cases (uneven over 2 ranks),
    evaluated 2 at a time. ``genesis-unet3d`` (batch norm: the global batch's statistics in
    training, the evaluation batch's own in evaluation) or ``unet3d`` (instance norm)."""
    from medssl_bench.plugins import build_registry

    registry = build_registry(autoload=False)
    ds_cls, bb_cls = registry.get("dataset", "phantom3d"), registry.get("backbone", backbone)
    data = ds_cls(ds_cls.Config(size=16, n_unlabeled=8, n_train=8, n_val=3, n_test=3)).load()
    torch.manual_seed(0)
    backbone = bb_cls(bb_cls.Config(filters=[4, 8]) if backbone == "unet3d"
                      else bb_cls.Config(width=0.125))
    cpu, world = torch.device("cpu"), runtime.world_size
    # Adam turns a gradient of pure rounding noise into a full step of either sign: the conv
    # biases before Models Genesis' batch norm (cancelled by it) have such gradients, and a
    # different summation order (even one process with 2 threads instead of 1) moves them by
    # +-lr; SGD's steps keep the size of the gradient, so the comparison is well-posed
    steps = {"optimizer": "sgd", "lr": 1e-2} if backbone.name == "genesis-unet3d" else {}
    pre = pretrain(Restore3D(), backbone, data.unlabeled, data.info,
                   PretrainConfig(epochs=2, batch_size=batch, world_size=world, **steps), cpu, 0,
                   runtime=runtime)
    test = Seen(data.test)
    tuned = finetune(backbone, data.info, data.train, data.val, test, pre.weights,
                     FinetuneConfig(epochs=2, batch_size=batch, iterations_per_epoch=2,
                                    loss="ce", freeze="none", world_size=world,
                                    eval_batch_size=2, **{"lr": 1e-3, **steps}),
                     cpu, 0, runtime=runtime)
    return {"pretrain_loss": [h["pretrain_loss"] for h in pre.history],
            "encoder": pre.weights["encoder"], "val": tuned.val_history,
            "test": tuned.test_metrics, "weights": tuned.weights, "test_read": test.read}


def _negatives(rank: int) -> dict:
    """What the contrastive tasks draw and compute under 2 ranks (see the test)."""
    from medssl_bench_tasks.cpc import CPC3D
    from medssl_bench_tasks.exemplar import Exemplar3D
    from medssl_bench_tasks.swinssl import nt_xent

    views = torch.randn(8, 5, generator=torch.Generator().manual_seed(0))  # a0..a3, p0..p3
    mine = torch.cat([views[2 * rank:2 * rank + 2], views[4 + 2 * rank:4 + 2 * rank + 2]])
    images = torch.rand(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(rank))
    gen = torch.Generator().manual_seed(rank)
    exemplar = torch.cat([Exemplar3D().make_batch(images, gen)["negative_index"]
                          for _ in range(20)])
    cpc = CPC3D()  # 7 patches per side: 343 per volume
    mine.requires_grad_(True)
    loss = nt_xent(mine, 0.5, gather=True)
    loss.backward()
    return {"swinssl": loss.item(), "exemplar": exemplar,
            "swinssl_grad": mine.grad / 2,  # what DDP's averaging over 2 ranks gives
            "cpc": cpc.make_batch(images, gen)["negative_index"], "cpc_per_rank": 2 * 7**3}


def _global_statistics(rows: slice) -> dict:
    """Batch norm, SparK's masked batch norm and exemplar3d's triplet loss on ``rows`` of a
    global batch of 4: under 2 ranks each rank's half, in one process all 4 rows (see
    test_batch_statistics_are_the_global_batchs)."""
    from medssl_bench.plugins import build_registry
    from medssl_bench.sync_norm import synchronise
    from medssl_bench_tasks.exemplar import Exemplar3D, fingerprint
    from medssl_bench_tasks.masking import masked_norm

    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 3, 4, 4, 4, generator=gen) * 2 + 5)[rows].requires_grad_(True)
    coef = torch.randn(4, 3, 4, 4, 4, generator=gen)[rows]
    active = (torch.rand(4, 1, 4, 4, 4, generator=gen) > 0.4)[rows]
    out: dict = {}
    for name in ("bn", "masked"):
        torch.manual_seed(0)
        bn = torch.nn.BatchNorm3d(3)
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-1, 1)
        synchronise(bn)
        bn.train()
        y = bn(x) if name == "bn" else masked_norm(bn, x, active)
        x.grad = None
        (y * coef).sum().backward()  # a sum: one process's gradient is the ranks' sum
        out[name] = {"y": y.detach(), "x_grad": x.grad.clone(), "w_grad": bn.weight.grad,
                     "b_grad": bn.bias.grad, "mean": bn.running_mean, "var": bn.running_var}
    registry = build_registry(autoload=False)
    bb_cls = registry.get("backbone", "unet3d")
    backbone = bb_cls(bb_cls.Config(filters=[4, 8]))
    task = Exemplar3D()
    torch.manual_seed(0)
    encoder = backbone.build_encoder(1)
    heads = task.build_heads(backbone, encoder)
    images = torch.rand(4, 1, 16, 16, 16, generator=gen)
    images[3] = images[2]  # anchors 2 and 3 are one volume: neither is the other's negative
    batch = {"anchors": images, "positives": images.flip(2) * 0.9,  # the one-process batch
             "fingerprints": fingerprint(images), "negative_index": torch.tensor([1, 0, 3, 2])}
    loss, _ = task.compute_loss(encoder, heads, {k: v[rows] for k, v in batch.items()})
    loss.backward()
    out["exemplar"] = {"loss": loss.item(), "grads": [p.grad.clone() for p in
                                                      [*encoder.parameters(), *heads.parameters()]]}
    return out


def _probe_features(runtime: Runtime) -> tuple:
    """A frozen-encoder protocol's features of 5 cases, 2 at a time, with Models Genesis'
    encoder (its batch norm uses each batch's statistics: the batches must be one
    process's)."""
    from torch.utils.data import TensorDataset

    from medssl_bench.plugins import build_registry
    from medssl_bench.probe import encode

    bb_cls = build_registry(autoload=False).get("backbone", "genesis-unet3d")
    torch.manual_seed(0)
    encoder = bb_cls(bb_cls.Config(width=0.125)).build_encoder(1)
    gen = torch.Generator().manual_seed(3)
    data = Seen(TensorDataset(torch.rand(5, 1, 16, 16, 16, generator=gen), torch.arange(5) % 2))
    return (*encode(encoder, data, runtime, 8, batch_size=2), data.read)


def _worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    from medssl_bench.distributed import DistributedRuntime

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        result = _train(DistributedRuntime.in_group(torch.device("cpu")), BATCH)
        result["negatives"] = _negatives(rank)
        result["statistics"] = _global_statistics(slice(2 * rank, 2 * rank + 2))
        result["features"] = _probe_features(DistributedRuntime.in_group(torch.device("cpu")))
        result["genesis"] = _train(DistributedRuntime.in_group(torch.device("cpu")), BATCH,
                                   "genesis-unet3d")
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    """What 2 gloo processes computed (:func:`_worker`), one dict per rank."""
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(2, str(out / "init"), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("backbone", ["unet3d", "genesis-unet3d"])
def test_two_processes_train_as_one_at_the_same_global_batch(two_ranks, backbone):
    """Losses of every epoch, pretrained encoder, validation history, test metrics and
    fine-tuned weights of 2 gloo processes at batch 2 equal 1 process's at batch 4: with
    instance norm (unet3d) and with Models Genesis' batch norm, whose training statistics
    must be the global batch's and whose evaluation statistics (ContBatchNorm3d: the batch's
    own) those of one process's evaluation batches (running statistics compared too).

    Tolerance 1e-5 (relative 1e-4): the steps are the same computation, only summed in
    another order (the gradient of 4 volumes is the all-reduced mean of two 2-volume
    gradients instead of one sum inside the kernels), float32 rounding of ~1e-7 per sum that
    4 Adam steps of lr 1e-3 cannot grow past it. For Models Genesis 1e-4 (relative 1e-3):
    its 4 SGD steps at lr 1e-2 amplify rounding, one process with 2 threads instead of 1
    ends 2.4e-5 away from itself (measured). Any difference in the data a rank reads,
    in how gradients combine or in the statistics a norm uses moves the losses at the first
    decimals."""
    ranks = [r if backbone == "unet3d" else r["genesis"] for r in two_ranks]
    torch.set_num_threads(1)
    one = _train(Runtime.local("cpu"), 2 * BATCH, backbone)
    close = {"rtol": 1e-4, "atol": 1e-5}
    if backbone == "genesis-unet3d":  # one process with 2 threads differs by 2.4e-5 from 1
        close = {"rtol": 1e-3, "atol": 1e-4}
    for result in ranks:
        torch.testing.assert_close(result["pretrain_loss"], one["pretrain_loss"], **close)
        torch.testing.assert_close(result["encoder"], one["encoder"], **close)
        torch.testing.assert_close(result["val"], one["val"], **close)
        torch.testing.assert_close(result["test"], one["test"], **close)
        torch.testing.assert_close(result["weights"], one["weights"], **close)
    # the test split: every case scored by exactly one process, in one process's batches
    assert ranks[0]["test_read"] == [0, 1] and ranks[1]["test_read"] == [2]
    assert one["test_read"] == [0, 1, 2]


def test_batch_statistics_are_the_global_batchs(two_ranks):
    """Under 2 ranks, batch norm (made global by DDP's wrap), SparK's masked batch norm and
    exemplar3d's triplet loss over the usable triplets (2 of its 4 are not: one volume
    twice) give one process's outputs, running statistics and gradients at the global batch.
    Before: each rank's own statistics, and exemplar3d weighted each rank's usable triplets
    as a whole batch (rank 1 has none here: its loss counted as 0 in DDP's average)."""
    one = _global_statistics(slice(0, 4))
    ranks = [r["statistics"] for r in two_ranks]
    close = {"rtol": 1e-4, "atol": 1e-5}
    for name in ("bn", "masked"):
        for rank, drawn in enumerate(ranks):
            rows = slice(2 * rank, 2 * rank + 2)
            torch.testing.assert_close(drawn[name]["y"], one[name]["y"][rows], **close)
            torch.testing.assert_close(drawn[name]["x_grad"], one[name]["x_grad"][rows], **close)
            torch.testing.assert_close(drawn[name]["mean"], one[name]["mean"], **close)
            torch.testing.assert_close(drawn[name]["var"], one[name]["var"], **close)
        for grad in ("w_grad", "b_grad"):
            torch.testing.assert_close(ranks[0][name][grad] + ranks[1][name][grad],
                                       one[name][grad], **close)
    losses = [drawn["exemplar"]["loss"] for drawn in ranks]
    assert sum(losses) / 2 == pytest.approx(one["exemplar"]["loss"], rel=1e-5)
    for mine, theirs, reference in zip(ranks[0]["exemplar"]["grads"],
                                       ranks[1]["exemplar"]["grads"],
                                       one["exemplar"]["grads"], strict=True):
        torch.testing.assert_close((mine + theirs) / 2, reference, **close)


def test_probe_features_are_sharded_by_batch_and_gathered_in_case_order(two_ranks):
    """Every process gets the features of all 5 cases, in order, equal to one process's;
    each case encoded by one process only, in one process's batches of 2 (3 over 2 ranks)."""
    features, labels, _ = _probe_features(Runtime.local("cpu"))
    assert labels.tolist() == [0, 1, 0, 1, 0]
    for result in two_ranks:
        torch.testing.assert_close(result["features"][0], features, rtol=1e-4, atol=1e-5)
        assert result["features"][1].tolist() == labels.tolist()
    assert [result["features"][2] for result in two_ranks] == [[0, 1, 4], [2, 3]]


def test_contrastive_tasks_take_negatives_from_every_rank(two_ranks):
    """With gather_negatives (the default) under 2 ranks: swinssl3d's NT-Xent averaged over
    the ranks, and its gradient as DDP averages it, equal one process's over the global
    batch; exemplar3d and cpc3d draw
    negatives from the other rank's rows too, never an anchor itself."""
    from medssl_bench_tasks.swinssl import nt_xent

    ranks = [result["negatives"] for result in two_ranks]
    views = torch.randn(8, 5, generator=torch.Generator().manual_seed(0))
    views.requires_grad_(True)
    loss = nt_xent(torch.cat([views[:4], views[4:]]), 0.5)
    loss.backward()
    assert (ranks[0]["swinssl"] + ranks[1]["swinssl"]) / 2 == pytest.approx(loss.item(),
                                                                            rel=1e-6)
    # the gradient too: the gather sends other ranks' terms back to the rows' owner
    for rank, drawn in enumerate(ranks):
        rows = [2 * rank, 2 * rank + 1, 4 + 2 * rank, 5 + 2 * rank]
        assert torch.allclose(drawn["swinssl_grad"], views.grad[rows], atol=1e-6)
    for rank, drawn in enumerate(ranks):
        own = torch.arange(2) + 2 * rank
        index = drawn["exemplar"].view(-1, 2)
        assert index.min() >= 0 and index.max() < 4 and not (index == own).any()
        assert {*index.flatten().tolist()} - {*own.tolist()} == {*range(4)} - {*own.tolist()}
        cpc, per_rank = drawn["cpc"], drawn["cpc_per_rank"]
        assert cpc.max() < 2 * per_rank and (cpc >= per_rank).any() and (cpc < per_rank).any()


# --------------------------------------------------------------------------- bench run

TINY = ["dataset.size=16", "dataset.n_unlabeled=4", "dataset.n_train=4", "dataset.n_val=2",
        "dataset.n_test=2", "backbone.filters=[4,8]", "task.hidden=8", "pretrain.epochs=1",
        "pretrain.iterations_per_epoch=1", "pretrain.batch_size=1", "finetune.epochs=1",
        "finetune.warmup_epochs=0", "finetune.iterations_per_epoch=1", "finetune.batch_size=1",
        "protocol.seeds=[0]", "protocol.fractions=[100]"]


def _bench_run(workdir: Path, *extra: str, env: dict[str, str] | None = None):
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "benchmark"), str(ROOT / "plugins"), os.environ.get("PYTHONPATH", "")]),
        "BENCH_DISABLE_PLUGIN_AUTOLOAD": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    environ.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(
        [sys.executable, "-m", "medssl_bench", "run", "--nproc-per-node", "2", "--protocol",
         "data-efficiency", "--task", "rotation3d", "--device", "cpu", "--tracking-uri",
         str(workdir / "m.db"), "--cache-dir", str(workdir / "cache"), "--set", *TINY, *extra],
        cwd=workdir, env=environ, capture_output=True, text=True, timeout=240)


def _runs(db: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    return client.search_runs([e.experiment_id for e in client.search_experiments()],
                              max_results=100)


@pytest.mark.slow
def test_bench_run_nproc_per_node_reports_a_crashed_rank_then_records_each_unit_once(tmp_path):
    """A crash on rank 1 in the pretraining's second epoch ends the run with one message
    naming rank 1 and leaves no run RUNNING (the pretraining rank 0 was in is FAILED with
    rank 1's error). The rerun resumes it from rank 0's epoch-1 checkpoint (every rank loads
    it), then: rank 0 alone writes, one run per unit, the world size in the configs (part of
    the key), the cached encoder written once, one process's output."""
    crashed = _bench_run(tmp_path, "pretrain.epochs=2",
                         env={"MEDSSL_BENCH_TEST_CRASH_RANK": "1@2"})
    assert crashed.returncode != 0
    errors = [line for line in crashed.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: rank 1 (of 2) failed: RuntimeError: MEDSSL_BENCH_TEST_CRASH_RANK"
                      "=1@2: test crash at epoch end 2"], crashed.stderr
    runs = _runs(tmp_path / "m.db")
    assert "RUNNING" not in {r.info.status for r in runs}
    failed = [r for r in runs if r.info.status == "FAILED"]
    assert [r.info.run_name for r in failed] == ["pretrain rotation3d"]
    assert "rank 1 (of 2) failed" in failed[0].data.tags["error"]

    done = _bench_run(tmp_path, "pretrain.epochs=2")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Resuming pretrain rotation3d from its epoch-1 checkpoint" in done.stdout
    finished = [r for r in _runs(tmp_path / "m.db") if r.info.status == "FINISHED"]
    assert sorted(r.info.run_name for r in finished) == [
        "pretrain rotation3d", "rotation3d 100% seed 0", "scratch (no pretraining)",
        "scratch 100% seed 0"]
    finetunes = [r for r in finished if "seed" in r.info.run_name]
    assert all(r.data.params["finetune.world_size"] == "2" for r in finetunes)
    assert len(list((tmp_path / "cache" / "pretrain").glob("*.safetensors"))) == 1
    assert done.stdout.count("bench run protocol=") == 1


# --------------------------------------------------------------------------- launching


def test_launch_options_become_torchrun_options_and_leave_the_worker_command():
    from medssl_bench import cli, launch

    argv = ["run", "--task", "rotation3d", "--nproc-per-node", "4", "--nnodes=2",
            "--rdzv-endpoint", "head:29500", "--rdzv-id", "7", "--rdzv-backend", "c10d",
            "--node-rank", "1", "--set", "pretrain.epochs=1"]
    args = cli.build_parser().parse_args(argv)
    assert launch.wanted(args)
    assert launch.torchrun_argv(args, argv) == [
        "--nproc-per-node", "4", "--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint",
        "head:29500", "--rdzv-backend", "c10d", "--rdzv-id", "7", "-m", "medssl_bench",
        "run", "--task", "rotation3d", "--set", "pretrain.epochs=1"]
    one_node = ["run", "--nproc-per-node=2"]
    args = cli.build_parser().parse_args(one_node)
    assert launch.torchrun_argv(args, one_node) == [
        "--nproc-per-node", "2", "--standalone", "-m", "medssl_bench", "run"]
    assert not launch.wanted(cli.build_parser().parse_args(["run", "--nproc-per-node", "1"]))


def test_a_process_of_a_ddp_run_refuses_parallel_executors(tmp_path, monkeypatch, capsys):
    """Units handed to worker processes would leave the process group: refused, naming the
    fix, before the process group or the store is touched."""
    from medssl_bench import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    code = cli.main(["run", "--protocol", "data-efficiency", "--task", "rotation3d", "--device",
                     "cpu", "--workers", "2",
                     "--tracking-uri", "http://127.0.0.1:9"])
    assert code == 2
    assert "drop --executor local and --workers" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_a_ddp_pretraining_runs_as_one_job_of_two_tasks_in_the_local_executor(tmp_path):
    """`--set pretrain.world_size=2` with the local executor: the pretraining is one
    submitit job of 2 tasks (the real submitit code path; on Slurm the same job asks for
    2 tasks and 2 x gpus_per_job GPUs) whose tasks join one process group; rank 0 alone
    records it, with the world size in its key; the fine-tunes run as ordinary jobs. A crash
    on rank 1 fails the unit naming rank 1, and no run is left RUNNING."""
    def sweep(**env: str):
        environ = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(ROOT / "benchmark"), str(ROOT / "plugins"), os.environ.get("PYTHONPATH", "")]),
            "BENCH_DISABLE_PLUGIN_AUTOLOAD": "1", **env}
        environ.pop("MLFLOW_TRACKING_URI", None)
        return subprocess.run(
            [sys.executable, "-m", "medssl_bench", "run", "--protocol", "data-efficiency",
             "--task", "rotation3d", "--device", "cpu", "--executor", "local", "--workers", "1",
             "--tracking-uri", str(tmp_path / "m.db"), "--cache-dir", str(tmp_path / "cache"),
             "--set", *TINY, "pretrain.world_size=2",
             f"executor.folder={tmp_path / 'jobs'}"],
            cwd=tmp_path, env=environ, capture_output=True, text=True, timeout=300)

    crashed = sweep(MEDSSL_BENCH_TEST_CRASH_RANK="1")
    assert crashed.returncode != 0
    assert "rank 1 (of 2) failed" in crashed.stdout + crashed.stderr
    runs = _runs(tmp_path / "m.db")
    assert "RUNNING" not in {r.info.status for r in runs}
    assert [r.info.run_name for r in runs if r.info.status == "FAILED"] == ["pretrain rotation3d"]

    done = sweep()
    assert done.returncode == 0, done.stdout + done.stderr
    finished = [r for r in _runs(tmp_path / "m.db") if r.info.status == "FINISHED"]
    pretrained = [r for r in finished if r.info.run_name == "pretrain rotation3d"]
    assert len(pretrained) == 1 and pretrained[0].data.params["pretrain.world_size"] == "2"
    assert sorted(r.info.run_name for r in finished if "seed" in r.info.run_name) == [
        "rotation3d 100% seed 0", "scratch 100% seed 0"]
    # the pretraining job ran 2 tasks (a log per task), the fine-tunes 1 each
    task_logs = sorted(p.name.split("_")[1] for p in (tmp_path / "jobs").rglob("*_log.out"))
    assert task_logs.count("1") >= 1 and task_logs.count("0") > task_logs.count("1")


# --------------------------------------------------------------------------- peer watch


def _watched(rank: int, init: str, out: str, scenario: str) -> None:
    """One process of a 2-process group whose watch ends it (see the tests below)."""
    import datetime
    import time

    import torch.distributed as dist

    from medssl_bench import distributed

    class Closed:  # rank 0's result store, as far as closing its open runs goes
        def close_open(self, message: str) -> None:
            Path(out, f"closed{rank}").write_text(message)

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=120))
    distributed.ACTIVE_STORE[:] = [Closed()]
    distributed.PeerWatch(interval=0.1, grace=0.5).start()
    if scenario == "peer failed":
        if rank == 1:  # fails, as an NCCL peer it stays alive: rank 0 is never woken
            distributed.note_failure(RuntimeError("boom"))
            time.sleep(60)
        dist.barrier()  # rank 0 waits for rank 1 here, for the group's 120 s
    else:  # "store gone": rank 0 hosts the store and ends without a word
        if rank == 0:
            os._exit(0)
        time.sleep(60)


def _two_processes(tmp_path: Path, init: str, scenario: str) -> tuple[list, float]:
    import multiprocessing
    import time

    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_watched, args=(r, init, str(tmp_path), scenario))
             for r in range(2)]
    t0 = time.monotonic()
    for p in procs:
        p.start()
    watched = procs[0] if scenario == "peer failed" else procs[1]
    watched.join(timeout=50)
    elapsed = time.monotonic() - t0
    for p in procs:
        p.kill()
        p.join()
    return procs, elapsed


def test_a_process_waiting_on_a_failed_peer_ends_itself_and_closes_its_runs(tmp_path):
    """With NCCL a failed rank leaves the others blocked in a collective until the group's
    timeout; the PeerWatch ends them after the grace period instead: rank 0, blocked in a
    barrier that rank 1 (failed, still alive) never reaches, closes its open runs with rank
    1's message and exits 1 within seconds, not after the group's 120 s."""
    procs, elapsed = _two_processes(tmp_path, f"file://{tmp_path / 'init'}", "peer failed")
    assert procs[0].exitcode == 1
    assert elapsed < 40
    assert (tmp_path / "closed0").read_text() == "rank 1 (of 2) failed: RuntimeError: boom"


def test_a_process_whose_group_store_is_gone_ends_itself(tmp_path):
    """Under submitit rank 0 hosts the group's store: when it ends without a word, rank 1
    (which might wait in an NCCL collective for 30 minutes) ends itself, naming why."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs, elapsed = _two_processes(tmp_path, f"tcp://127.0.0.1:{port}", "store gone")
    assert procs[1].exitcode == 1
    assert elapsed < 40
    assert "key-value store is unreachable" in (tmp_path / "closed1").read_text()
