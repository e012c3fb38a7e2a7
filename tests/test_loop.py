"""The training loop, its runtime, optimizers, schedules and progress events."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from medssl_bench.engine import FinetuneConfig, PretrainConfig
from medssl_bench.events import EpochEnded, EpochStarted, StepEnded, TrainingEnded
from medssl_bench.identity import semantic
from medssl_bench.loop import Loop, Meter
from medssl_bench.optim import Schedule, build_optimizer, schedule_of
from medssl_bench.runtime import EpochLoader, Runtime

CPU = torch.device("cpu")


class _Regression(nn.Module):
    """A step module: mean squared error of a linear model, with a tensor and a float log."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 1)

    def forward(self, batch):
        x, y = batch
        loss = (self.linear(x).squeeze(1) - y).pow(2).mean()
        return loss, {"abs": (self.linear(x).squeeze(1) - y).abs().mean().detach(), "one": 1.0}


def _data(n: int = 8) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=g)
    return torch.utils.data.TensorDataset(x, x @ torch.tensor([1.0, -2.0, 0.5]) + 0.3)


def _loop(model, cfg, runtime=None, **kwargs) -> Loop:
    runtime = runtime or Runtime.local(CPU, cfg)
    return Loop(what="toy", stage="pretrain", model=model,
                optimizer=build_optimizer(model.parameters(), cfg), schedule=schedule_of(cfg),
                batches=runtime.loader(_data(), cfg.batch_size, cfg.iterations_per_epoch, 0),
                runtime=runtime, grad_clip=cfg.grad_clip, **kwargs)


def test_defaults_train_exactly_as_the_0_1_loop():
    """Adam, constant rate, one micro-batch per step: the same weights, bit for bit, as the
    loop engine.pretrain/finetune each had before (zero_grad, backward, clip, step)."""
    cfg = PretrainConfig(epochs=3, batch_size=2, lr=1e-2, grad_clip=0.5)
    torch.manual_seed(0)
    model = _Regression()
    reference = _Regression()
    reference.load_state_dict(model.state_dict())
    _loop(model, cfg).run(cfg.epochs)

    optimizer = torch.optim.Adam(reference.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loader = EpochLoader(_data(), cfg.batch_size, None, 0, False)
    for epoch in range(cfg.epochs):
        for batch in loader.epoch(epoch):
            loss, _ = reference(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(list(reference.parameters()), cfg.grad_clip)
            optimizer.step()
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_epoch_logs_are_the_means_of_the_step_logs_read_once():
    cfg = PretrainConfig(epochs=2, batch_size=2)
    losses, ends = [], []

    class Spy(_Regression):
        def forward(self, batch):
            loss, logs = super().forward(batch)
            losses.append(loss.item())
            return loss, logs

    _loop(Spy(), cfg, on_epoch_end=lambda epoch, logs: ends.append(logs)).run(cfg.epochs)
    assert [list(logs) for logs in ends] == [["loss", "abs", "one"]] * 2
    first = losses[:4]  # 8 cases, batches of 2: 4 steps per epoch
    assert ends[0]["loss"] == sum(first) / 4  # float64 sums in step order, as 0.1 did
    assert ends[0]["one"] == 1.0


def test_meter_adds_tensors_on_their_device_and_floats_as_floats():
    meter = Meter()
    assert meter.means() == {}
    meter.add({"loss": torch.tensor(1.0), "acc": 0.5})
    meter.add({"loss": torch.tensor(2.0), "acc": 1.0})
    assert meter.means() == {"loss": 1.5, "acc": 0.75}
    assert meter.tensors["loss"].dtype == torch.float64 and "acc" in meter.floats


def test_events_in_order_and_only_from_the_main_process():
    cfg = PretrainConfig(epochs=2, batch_size=4)
    events: list = []
    _loop(_Regression(), cfg, progress=events.append).run(cfg.epochs)
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["EpochStarted", "StepEnded", "StepEnded", "EpochEnded"] * 2 + ["TrainingEnded"]
    start, step, end, done = events[0], events[2], events[3], events[-1]
    assert start == EpochStarted("toy", "pretrain", 1, 2, 2, False)
    assert start.description == "pretrain toy epoch 1/2"
    assert isinstance(step, StepEnded) and (step.step, step.steps) == (2, 2)
    assert set(step.running()) == {"loss", "abs", "one"}
    assert isinstance(end, EpochEnded) and end.epoch == 1 and not end.last and end.seconds >= 0
    assert isinstance(done, TrainingEnded) and done.stage == "pretrain"
    assert EpochStarted("x 10% seed 0", "finetune", 1, 5, 3, True).description == (
        "x 10% seed 0 epoch 1/5 (encoder frozen)")

    class Worker(Runtime):  # rank 1 of 2 (its loader reads its half of every batch)
        @property
        def rank(self) -> int:
            return 1

        @property
        def world_size(self) -> int:
            return 2

    events.clear()
    _loop(_Regression(), cfg, runtime=Worker(CPU), progress=events.append).run(cfg.epochs)
    assert events == []


def test_nothing_to_train_emits_nothing():
    cfg = PretrainConfig(epochs=2, batch_size=4)
    events: list = []
    _loop(_Regression(), cfg, progress=events.append).run(2, start_epoch=2)
    assert events == []


@pytest.mark.parametrize("kind, warmup", [("constant", 0), ("constant", 2), ("poly", 0),
                                          ("poly", 3), ("cosine", 0), ("cosine", 2)])
def test_learning_rate_per_epoch_follows_the_schedule(kind, warmup):
    epochs, lr = 10, 0.1
    cfg = PretrainConfig(epochs=epochs, lr=lr, schedule=kind, lr_warmup_epochs=warmup,
                         batch_size=8)
    model = _Regression()
    seen = []
    loop = _loop(model, cfg)
    loop.on_epoch_start = lambda epoch: seen.append(loop.optimizer.param_groups[0]["lr"]) and False
    loop.run(epochs)
    expected = []
    for e in range(epochs):
        if e < warmup:
            expected.append(lr * (e + 1) / warmup)
            continue
        t = (e - warmup) / (epochs - warmup)
        expected.append({"constant": lr, "poly": lr * (1 - t) ** 0.9,
                         "cosine": lr * (1 + math.cos(math.pi * t)) / 2}[kind])
    assert seen == pytest.approx(expected, rel=1e-12)
    if kind == "poly" and not warmup:  # nnU-Net's formula
        assert seen == pytest.approx([lr * (1 - e / epochs) ** 0.9 for e in range(epochs)])
    if warmup:
        assert seen[warmup - 1] == pytest.approx(lr)  # the warm-up ends at the peak
    assert Schedule(kind, lr, epochs, warmup)(epochs - 1) > 0


def test_optimizers_from_config():
    params = list(nn.Linear(2, 2).parameters())
    adam = build_optimizer(params, PretrainConfig())
    assert type(adam) is torch.optim.Adam
    assert adam.defaults["lr"] == 1e-3 and adam.defaults["weight_decay"] == 0.0
    adamw = build_optimizer(params, FinetuneConfig(optimizer="adamw", weight_decay=0.01))
    assert type(adamw) is torch.optim.AdamW and adamw.defaults["weight_decay"] == 0.01
    sgd = build_optimizer(params, FinetuneConfig(optimizer="sgd", lr=0.01))
    assert type(sgd) is torch.optim.SGD
    assert sgd.defaults["nesterov"] is True and sgd.defaults["momentum"] == 0.99
    slower = build_optimizer(params, PretrainConfig(optimizer="sgd", momentum=0.9))
    assert slower.defaults["momentum"] == 0.9 and slower.defaults["nesterov"] is True
    plain = build_optimizer(params, PretrainConfig(optimizer="sgd", momentum=0))
    assert plain.defaults["nesterov"] is False


def test_sgd_poly_trains_the_toy_problem():
    cfg = PretrainConfig(epochs=20, batch_size=4, lr=0.05, optimizer="sgd", momentum=0.9,
                         schedule="poly")
    model = _Regression()
    ends = []
    _loop(model, cfg, on_epoch_end=lambda epoch, logs: ends.append(logs["loss"])).run(cfg.epochs)
    assert ends[-1] < 0.1 * ends[0]


def test_gradient_accumulation_equals_the_larger_batch():
    """Two micro-batches of 2 per optimizer step give the step of one batch of 4 (the mean
    loss of each micro-batch is halved); the optimizer steps once per group."""
    torch.manual_seed(0)
    big, small = _Regression(), _Regression()
    small.load_state_dict(big.state_dict())
    steps = []
    cfg_big = PretrainConfig(epochs=1, batch_size=4, iterations_per_epoch=2, lr=0.1,
                             optimizer="sgd", momentum=0)
    cfg_small = cfg_big.model_copy(update={"batch_size": 2, "iterations_per_epoch": 4,
                                           "grad_accumulation": 2})
    _loop(big, cfg_big).run(1)
    loop = _loop(small, cfg_small)
    loop.optimizer.register_step_post_hook(lambda *args: steps.append(1))
    loop.run(1)
    assert len(steps) == 2
    # same cases in the same order: RandomSampler draws 8 indices for both
    for key, value in big.state_dict().items():
        torch.testing.assert_close(small.state_dict()[key], value, rtol=1e-6, atol=1e-7)


def test_an_epoch_that_does_not_fill_its_last_group_still_steps():
    cfg = PretrainConfig(epochs=1, batch_size=2, iterations_per_epoch=3, grad_accumulation=2)
    steps = []
    loop = _loop(_Regression(), cfg)
    loop.optimizer.register_step_post_hook(lambda *args: steps.append(1))
    loop.run(1)
    assert len(steps) == 2


def test_new_settings_keep_run_keys_at_their_defaults():
    """Fields added in 0.2 are out of a run key while at their default (keys recorded by 0.1
    stay valid) and in it as soon as they change a result."""
    new = {"optimizer", "momentum", "schedule", "lr_warmup_epochs", "compile", "grad_accumulation"}
    for cls in (PretrainConfig, FinetuneConfig):
        assert new <= set(cls.model_fields)
        assert not new & set(semantic(cls()))
        for field, value in [("optimizer", "sgd"), ("schedule", "cosine"), ("lr_warmup_epochs", 2),
                             ("compile", True), ("grad_accumulation", 2), ("momentum", 0.9)]:
            assert field in semantic(cls(**{field: value}))
        for name in new:
            assert cls.model_fields[name].description


def test_runtime_precision_placement_and_compile(monkeypatch):
    cpu = Runtime.local(CPU, PretrainConfig())
    assert cpu.precision == "fp32" and not cpu.pin_memory and cpu.grad_accumulation == 1
    assert not torch.is_autocast_enabled("cpu")
    with cpu.autocast():
        assert not torch.is_autocast_enabled("cpu")
    cuda = Runtime(torch.device("cuda"))  # only its settings are read: no GPU needed
    assert cuda.precision == "bf16" and cuda.pin_memory
    assert Runtime(torch.device("cuda"), amp=False).precision == "fp32"
    assert cpu.is_main and cpu.world_size == 1 and cpu.reduce_sum([1.0, 2.0]) == [1.0, 2.0]
    module = nn.Linear(2, 2)
    assert cpu.wrap(module) is module and cpu.compiled(module) is module
    compiled = []
    monkeypatch.setattr(nn.Linear, "compile", lambda self, *a, **k: compiled.append(self),
                        raising=False)
    on = Runtime.local(CPU, FinetuneConfig(compile=True, grad_accumulation=3))
    assert on.compiled(module) is module and compiled == [module]  # in place: same state keys
    assert on.grad_accumulation == 3


def test_engine_runs_every_new_setting_and_reports_the_frozen_warm_up(registry):
    """pretrain and finetune take optimizer, schedule, warm-up and accumulation from their
    configs; fine-tuning's frozen-encoder warm-up shows in its events."""
    from medssl_bench.engine import finetune, pretrain

    ds = registry.get("dataset", "phantom3d")
    data = ds(ds.Config(size=16, n_unlabeled=4, n_train=4, n_val=2, n_test=2)).load()
    bb = registry.get("backbone", "unet3d")
    backbone = bb(bb.Config(filters=[4, 8]))
    task_cls = registry.get("task", "rotation3d")
    events: list = []
    result = pretrain(task_cls(task_cls.Config(hidden=8)), backbone, data.unlabeled, data.info,
                      PretrainConfig(epochs=2, batch_size=1, iterations_per_epoch=2,
                                     optimizer="adamw", schedule="cosine", lr_warmup_epochs=1,
                                     grad_accumulation=2), CPU, 0, progress=events.append)
    assert len(result.history) == 2 and "pretrain_acc" in result.history[0]
    assert [type(e) for e in events].count(TrainingEnded) == 1
    events.clear()
    tuned = finetune(backbone, data.info, data.train, data.val, data.test, result.weights,
                     FinetuneConfig(epochs=2, warmup_epochs=1, iterations_per_epoch=2,
                                    optimizer="sgd", schedule="poly", grad_accumulation=2),
                     CPU, 0, progress=events.append, label="rotation3d 100% seed 0")
    assert "dice_mean" in tuned.test_metrics and len(tuned.val_history) == 2
    starts = [e for e in events if isinstance(e, EpochStarted)]
    assert [(e.epoch, e.frozen) for e in starts] == [(1, True), (2, False)]
    assert starts[0].description == "rotation3d 100% seed 0 epoch 1/2 (encoder frozen)"


@pytest.mark.parametrize("mode", ["step", "epoch"])
def test_a_non_finite_loss_stops_the_training_naming_its_step(mode):
    """``step`` (the CPU's default) stops at the bad step; ``epoch`` (CUDA's: a flag on the
    device, no synchronisation per step) finishes the epoch's steps, then stops before the
    epoch's logs are used or a checkpoint is written, naming the first bad step."""
    from dataclasses import replace

    from medssl_bench.errors import TrainingError

    cfg = PretrainConfig(epochs=3, batch_size=2)
    calls, ends, checkpoints = [], [], []

    class Diverging(_Regression):
        def forward(self, batch):
            loss, logs = super().forward(batch)
            calls.append(len(calls))
            if len(calls) in (7, 8):  # epoch 2, steps 3 and 4 (4 steps per epoch)
                loss = loss * (float("inf") if len(calls) == 7 else float("nan"))
            return loss, logs

    runtime = replace(Runtime.local(CPU, cfg), nan_check=mode)
    assert runtime.nan_check_every_step is (mode == "step")
    loop = _loop(Diverging(), cfg, runtime, on_epoch_end=lambda e, logs: ends.append(e),
                 on_checkpoint=checkpoints.append)
    with pytest.raises(TrainingError, match=r"epoch 2, step 3\): the loss became inf"):
        loop.run(cfg.epochs)
    assert len(calls) == (7 if mode == "step" else 8)
    assert ends == [0] and checkpoints == [0]  # the diverged epoch left nothing behind


def test_the_nan_check_is_sync_free_on_cuda_by_default():
    assert Runtime.local(torch.device("cuda")).nan_check_every_step is False
    assert Runtime.local(CPU).nan_check_every_step is True


def test_3d_weights_are_channels_last_on_the_cpu_only_and_train_the_same():
    """``memory_format=auto``: 5-D weights channels-last on the CPU (faster oneDNN kernels),
    contiguous on CUDA; other tensors untouched; the same training up to summation order."""
    def model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.InstanceNorm3d(4, affine=True),
                             nn.ReLU(), nn.Conv3d(4, 2, 3, padding=1), nn.Flatten(),
                             nn.Linear(2 * 8**3, 1))

    assert Runtime.local(CPU).channels_last
    assert not Runtime(torch.device("cuda")).channels_last
    assert not Runtime(CPU, memory_format="contiguous").channels_last
    assert Runtime(torch.device("cuda"), memory_format="channels_last").channels_last
    fast = Runtime.local(CPU).place(model())
    plain = Runtime(CPU, memory_format="contiguous").place(model())
    for p in fast.parameters():
        assert p.is_contiguous(memory_format=torch.channels_last_3d if p.dim() == 5
                               else torch.contiguous_format)
    assert not fast[3].weight.is_contiguous()  # really reordered (one input channel: both)
    assert all(p.is_contiguous() for p in plain.parameters())
    x = torch.randn(2, 1, 8, 8, 8, generator=torch.Generator().manual_seed(1))
    losses = {}
    for name, net in (("fast", fast), ("plain", plain)):
        opt = torch.optim.Adam(net.parameters(), 1e-2)
        for _ in range(3):
            opt.zero_grad()
            loss = net(x).square().mean()
            loss.backward()
            opt.step()
        losses[name] = loss.item()
    # float32 sums in another order: equal to ~1e-6 relative after three Adam steps
    assert losses["fast"] == pytest.approx(losses["plain"], rel=1e-4)


def test_optimizer_kernels_fused_on_cuda_only():
    """CPU steps keep torch's default implementation (the regression sweep's results);
    CUDA parameters get the fused kernels (one launch per step)."""
    cpu = list(nn.Linear(2, 2).parameters())
    for name in ("adam", "adamw", "sgd"):
        opt = build_optimizer(cpu, FinetuneConfig(optimizer=name, lr=0.01))
        assert not opt.defaults.get("fused")
    if torch.cuda.is_available():
        gpu = list(nn.Linear(2, 2).cuda().parameters())
        for name in ("adam", "adamw", "sgd"):
            assert build_optimizer(gpu, FinetuneConfig(optimizer=name, lr=0.01)).defaults["fused"]
    from medssl_bench.optim import fused_kernels
    assert not fused_kernels([])
    assert not fused_kernels(cpu)
