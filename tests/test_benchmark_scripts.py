"""The benchmark scripts run (not how fast: speed is shown by running them, never by a
timed test): every registered pretraining task gets a number, and nothing errors."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from medssl_bench.plugins import build_registry

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_batch_construction_json_covers_every_task(capsys):
    bench = _load("batch_construction")
    code = bench.main(["--size", "32", "--batch-size", "2", "--warmup", "0", "--repeats", "1",
                       "--json"])
    timings = json.loads(capsys.readouterr().out)
    registry = build_registry()
    expected = {n for n in registry.names("task") if registry.get("task", n).pretrains}
    assert code == 0 and set(timings) == expected
    assert all(ms > 0 for ms in timings.values())
    assert set(bench.REFERENCE_MS_PER_SAMPLE) <= expected


def test_dispatch_count_tells_kernels_from_views_and_counts_host_syncs():
    """The launch and sync figures of batch_construction.py: a known sequence of operations
    gives known counts (and tolist is unpatched afterwards)."""
    bench = _load("batch_construction")
    x = torch.arange(6.0)
    with bench.DispatchCount() as counter:
        y = (x * 2).view(2, 3)[0]  # one kernel, two views
        y.sum().item()  # a kernel and a sync
        x[x > 2]  # a kernel (gt) and a boolean-mask index: a kernel that syncs
        (x > 4).nonzero()  # two kernels, one sync
        x.tolist()  # no dispatch on the CPU, but a sync on a device
    assert (counter.kernels, counter.syncs) == (7, 4)
    assert torch.Tensor.tolist is _TOLIST


_TOLIST = torch.Tensor.tolist


def test_batch_construction_detail_counts_every_task(capsys):
    bench = _load("batch_construction")
    code = bench.main(["--size", "16", "--batch-size", "2", "--warmup", "0", "--repeats", "1",
                       "--tasks", "genesis3d,rpl3d", "--json", "--detail"])
    rows = json.loads(capsys.readouterr().out)
    assert code == 0 and set(rows) == {"genesis3d", "rpl3d"}
    assert all(row["kernels"] > 0 and row["syncs"] >= 0 for row in rows.values())


def test_train_throughput_json_covers_every_task_and_backbone(capsys):
    bench = _load("train_throughput")
    registry = build_registry()
    others = [n for n in registry.names("backbone")
              if registry.get("backbone", n).spatial_dims == 3 and n != "unet3d"]
    every = [n for n in registry.names("task")
             if registry.get("task", n).pretrains and registry.get("task", n).spatial_dims == 3]
    plain = [n for n in every if not registry.get("task", n).requires]
    capable = [n for n in every if n not in plain]  # they run on a backbone offering more
    code = bench.main(["--size", "16", "--batch-size", "2", "--steps", "1", "--warmup", "0",
                       "--tasks", ",".join(plain), "--backbones", "unet3d",
                       "--set", "backbone.filters=[4,8]", "task.cpc3d.code_size=32",
                       "task.cpc3d.patch_embedding=16", "--json", "--quiet"])
    result = json.loads(capsys.readouterr().out)
    if others or capable:  # the other 3D backbones and their tasks at the CPU-sized preset
        code |= bench.main(["--size", "16", "--batch-size", "2", "--steps", "1", "--warmup",
                            "0", "--tasks", ",".join(capable) or "none",
                            "--backbones", ",".join(others) or "none",
                            "--preset", "quick", "--json", "--quiet"])
        result["rows"] += json.loads(capsys.readouterr().out)["rows"]
    tasks = {n for n in registry.names("task")
             if registry.get("task", n).pretrains and registry.get("task", n).spatial_dims == 3}
    backbones = {f"finetune/{n}" for n in registry.names("backbone")
                 if registry.get("backbone", n).spatial_dims == 3}
    rows = {row["row"]: row for row in result["rows"]}
    assert code == 0 and set(rows) == tasks | backbones
    for name, row in rows.items():
        assert "error" not in row, f"{name}: {row.get('error')}"
        assert row["volumes_per_s"] > 0 and row["forward_flops"] > 0, name
        assert 0 < row["encoder_forward_flops"] <= row["forward_flops"], name
        assert row["encoder_inputs_per_volume"] >= 1 and row["peak_memory_gib"] > 0, name
        assert 0 <= row["batch_construction_share"] < 1, name
    assert rows["rotation3d"]["encoder_inputs_per_volume"] == 4  # its rotated copies
    assert result["host_line"].startswith("host: ") and result["host"]["torch"] == torch.__version__


def test_train_throughput_reports_a_failing_row_and_goes_on(capsys):
    bench = _load("train_throughput")
    code = bench.main(["--size", "16", "--batch-size", "2", "--steps", "1", "--warmup", "0",
                       "--tasks", "rpl3d,jigsaw3d", "--backbones", "none",
                       "--set", "backbone.filters=[4,8]", "task.jigsaw3d.grid=40",
                       "--json", "--quiet"])
    rows = {row["row"]: row for row in json.loads(capsys.readouterr().out)["rows"]}
    assert code == 0 and set(rows) == {"rpl3d", "jigsaw3d"}
    assert "error" in rows["jigsaw3d"] and rows["rpl3d"]["volumes_per_s"] > 0


def test_flop_counter_counts_known_layers():
    bench = _load("train_throughput")
    conv = nn.Conv3d(4, 8, 3, padding=1)
    up = nn.ConvTranspose3d(8, 4, 2, stride=2)
    linear = nn.Linear(16, 10)
    gru = nn.GRU(6, 5, batch_first=True)
    x = torch.rand(2, 4, 8, 8, 8)
    with bench.FlopCounter({"conv": conv}, roots=[gru]) as counter:
        y = conv(x)
    assert counter.total == counter.by_scope["conv"] == 2 * (2 * 8 * 8**3) * (4 * 27)
    assert counter.inputs["conv"] == [(2, 4, 8, 8, 8)]
    with bench.FlopCounter() as counter:
        up(y)  # every input voxel feeds 4 output channels x 2^3 voxels
    assert counter.total == 2 * (2 * 8 * 8**3) * (4 * 8)
    with bench.FlopCounter() as counter:
        linear(torch.rand(5, 16))
        linear(torch.rand(3, 7, 16))  # a batched input becomes one matrix product too
    assert counter.total == 2 * 5 * 16 * 10 + 2 * 21 * 16 * 10
    with bench.FlopCounter(roots=[gru]) as counter:
        gru(torch.rand(3, 4, 6))  # 3 sequences of 4 steps, 3 gates
    assert counter.total == 2 * 3 * 4 * 3 * 5 * (6 + 5)


def test_flop_counter_matches_torch_and_the_issues_unet_figure():
    """The full residual U-Net (32-512 filters) at 128^3, 3 classes, counted on the meta
    device: 2.91 TFLOP per volume forward and backward, 0.85 of them in the encoder."""
    from torch.utils.flop_counter import FlopCounterMode

    from medssl_bench.engine import FinetuneConfig, build_downstream
    from medssl_bench.interfaces import DatasetInfo

    bench = _load("train_throughput")
    backbone = build_registry().get("backbone", "unet3d")
    info = DatasetInfo(kind="segmentation", num_classes=3, channels=1, image_size=(128,) * 3,
                       class_names=("a", "b", "c"), metrics=(), main_metric="")
    with torch.device("meta"):
        model = build_downstream(backbone(backbone.Config(**backbone.presets["paper"])), info,
                                 None, FinetuneConfig())
        x = torch.empty(1, 1, 128, 128, 128)
    with bench.FlopCounter({"encoder": model.encoder}, roots=[model]) as counter:
        model(x)
    with FlopCounterMode(display=False) as reference:
        model(x)
    assert counter.total == reference.get_total_flops()
    assert 3 * counter.total / 1e12 == pytest.approx(2.91, abs=0.005)
    assert 3 * counter.by_scope["encoder"] / 1e12 == pytest.approx(0.854, abs=0.005)


def test_quickstart_cost_reports_time_memory_host_and_load(capsys):
    bench = _load("quickstart_cost")
    bench.main(["--json", "--set", "dataset.size=16", "dataset.n_unlabeled=4",
                "dataset.n_train=2", "dataset.n_val=2", "dataset.n_test=2",
                "backbone.filters=[4,8]", "task.hidden=8", "pretrain.epochs=1",
                "pretrain.iterations_per_epoch=1", "pretrain.batch_size=2", "finetune.epochs=1",
                "finetune.warmup_epochs=0", "finetune.iterations_per_epoch=1",
                "protocol.fractions=[100]", "protocol.seeds=[0]"])
    out = json.loads(capsys.readouterr().out)
    assert out["wall_seconds"] > 0 and out["peak_rss_mb"] > 0
    assert {r[0] for r in out["rows"]} == {"rotation3d", "scratch"}  # the run's leaderboard
    assert out["host"]["cpu"] and out["host"]["cpu_count"] >= 1
    assert len(out["load_average_before"]) == len(out["load_average_after"]) == 3
