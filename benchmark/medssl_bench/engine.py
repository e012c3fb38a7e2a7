"""The training engine: pretrain an encoder with a proxy task, fine-tune it on labels,
evaluate on a held-out split. Protocol runners compose these; they know nothing of MLflow
(callbacks report metrics) so they can be tested and reused on their own."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Subset
from torch.utils.data import Dataset as TorchDataset

from medssl_bench.config import NEUTRAL, PluginConfig, since
from medssl_bench.device import autocast, seed_everything
from medssl_bench.errors import ConfigError, DataError
from medssl_bench.events import Event, Sink
from medssl_bench.interfaces import Backbone, DatasetInfo, Encoder, ProxyTask
from medssl_bench.loop import Loop
from medssl_bench.metrics import classification_metrics, dice_per_case, segmentation_metrics
from medssl_bench.optim import (
    OptimizerName,
    ScheduleName,
    build_optimizer,
    lr_warmup_field,
    momentum_field,
    optimizer_field,
    schedule_field,
    schedule_of,
)
from medssl_bench.runtime import Runtime
from medssl_bench.volumetric import (
    needs_patches,
    random_patches,
    region_dice,
    region_metrics,
    sliding_window_logits,
    to_native,
)
from medssl_bench.weights import StateDicts, adapt_state_in_channels

MetricCallback = Callable[[dict[str, float], int], None]


class TrainingConfig(PluginConfig):
    """What pretraining and fine-tuning share: how the loop steps (optimizer, schedule,
    compilation, gradient accumulation)."""

    optimizer: OptimizerName = optimizer_field()
    momentum: float = momentum_field()
    schedule: ScheduleName = schedule_field()
    lr_warmup_epochs: int = lr_warmup_field()
    compile: bool = Field(default=False, json_schema_extra=since("0.2"),
                          description="torch.compile the network (compiled once per input "
                          "shape; pays off on a GPU over long runs).")
    grad_accumulation: int = Field(default=1, ge=1, json_schema_extra=since("0.2"),
                                   description="Micro-batches of batch_size whose gradients "
                                   "make one optimizer step (an effective batch this many "
                                   "times larger in the same memory).")
    world_size: int = Field(default=1, ge=1, json_schema_extra=since("0.2"),
                            description="Processes training together (DDP), set by `bench run "
                            "--nproc-per-node N` or torchrun, not by hand: batch_size is per "
                            "process, so the global batch is world_size x batch_size (x "
                            "grad_accumulation). Part of the run key above 1, since it "
                            "changes the result.")
    data_placement: Literal["auto", "device", "loader"] = Field(
        default="auto", json_schema_extra=NEUTRAL,
        description="Where training batches come from. device: the training cases stacked "
        "once on the device and every batch drawn there by index (no DataLoader, no "
        "host-to-device copy per step); loader: the DataLoader (num_workers); auto: device "
        "on CUDA when the cases take at most a quarter of the free GPU memory, else loader. "
        "The same batches in the same order either way.")


class PretrainConfig(TrainingConfig):
    """Pretraining hyperparameters (Taleb et al. appendix: Adam, lr 1e-3 for 3D tasks)."""

    epochs: int = Field(default=1000, ge=0, description="Pretraining epochs (reference configs: 1000).")
    probe_every: int = Field(default=0, ge=0, json_schema_extra=NEUTRAL, description="Every "
                             "this many epochs (and after the last), a k-NN probe of the "
                             "frozen encoder on a small labelled subset of a classification "
                             "dataset is logged as a pretraining metric (probe_<metric>), so "
                             "you can see whether pretraining still improves; 0: off. It "
                             "cannot change the pretrained weights (random state restored).")
    probe_cases: int = Field(default=100, ge=2, json_schema_extra=NEUTRAL, description="Labelled "
                             "training cases the probe's k-NN votes with (validation cases "
                             "are the queries).")
    batch_size: int = Field(default=4, ge=1, description="Volumes per step and process before "
                            "the task multiplies them (rotation copies, patches, ...); with "
                            "N processes (DDP) the global batch is N times this.")
    lr: float = Field(default=1e-3, gt=0, description="Learning rate, the peak of the schedule "
                      "(appendix, Adam: 1e-3 in 3D, 5e-4 in 2D self-supervised tasks).")
    weight_decay: float = Field(default=0.0, ge=0, description="Weight decay (L2 for adam and "
                                "sgd, decoupled for adamw).")
    iterations_per_epoch: int | None = Field(
        default=None, ge=1, description="Batches per epoch, sampled with replacement; "
        "null means one pass over the unlabeled pool.")
    grad_clip: float | None = Field(default=None, gt=0, description="Clip the gradient norm.")
    num_workers: int = Field(default=0, ge=0, json_schema_extra=NEUTRAL,
                             description="DataLoader worker processes.")
    amp: bool = Field(default=True, description="bf16 autocast on CUDA (ignored on the CPU).")


class FinetuneConfig(TrainingConfig):
    """Fine-tuning hyperparameters (Taleb et al. appendix and reference configs)."""

    epochs: int = Field(default=400, ge=1, description="Fine-tuning epochs (reference configs: 400).")
    warmup_epochs: int = Field(default=25, ge=0, description="Epochs with the encoder frozen "
                               "before everything trains (appendix: 25 for 3D segmentation, "
                               "5 for 2D classification); the learning-rate warm-up is "
                               "lr_warmup_epochs.")
    freeze: Literal["warmup", "frozen", "none"] = Field(
        default="warmup", description="warmup: frozen encoder for warmup_epochs, then all "
        "trains (the paper); frozen: linear probe, encoder never trains; none: no warm-up.")
    batch_size: int = Field(default=2, ge=1, description="Labeled volumes per step and process "
                            "(configs: 2); with N processes (DDP) the global batch is N times "
                            "this.")
    lr: float = Field(default=1e-5, gt=0, description="Learning rate, the peak of the schedule "
                      "(appendix, Adam: 1e-5 for 3D segmentation, 5e-5 for 2D classification; "
                      "configs use 1e-3).")
    weight_decay: float = Field(default=0.0, ge=0, description="Weight decay (L2 for adam and "
                                "sgd, decoupled for adamw).")
    loss: Literal["dice", "ce", "dice_ce"] = Field(
        default="dice_ce", description="Segmentation loss: soft Dice (the Taleb code), "
        "cross-entropy, or their sum. Classification always uses cross-entropy.")
    iterations_per_epoch: int | None = Field(
        default=None, ge=1, description="Batches per epoch, sampled with replacement; null means "
        "one pass over the labeled subset, so small fractions get fewer steps (as in the papers).")
    select: Literal["best_val", "last"] = Field(
        default="best_val", description="Which weights are tested: the epoch with the best "
        "validation metric, or the last epoch.")
    grad_clip: float | None = Field(default=1.0, gt=0, description="Clip the gradient norm "
                                    "(reference configs clip at 1).")
    eval_batch_size: int = Field(default=4, ge=1, json_schema_extra=NEUTRAL,
                                 description="Volumes per evaluation batch.")
    num_workers: int = Field(default=0, ge=0, json_schema_extra=NEUTRAL,
                             description="DataLoader worker processes.")
    amp: bool = Field(default=True, description="bf16 autocast on CUDA (ignored on the CPU).")
    channel_adaptation: Literal["duplicate", "average"] = Field(
        default="duplicate", description="How a pretrained first layer takes a different number "
        "of input channels: duplicate its weights (Taleb et al. appendix) or average them.")


# --------------------------------------------------------------------------- helpers


def pad_to_multiple(x: Tensor, multiple: int) -> tuple[Tensor, tuple[slice, ...]]:
    """Zero-pad the spatial dims of ``x`` up to multiples of ``multiple``; also return the
    slices that crop an output of the padded size back."""
    spatial = x.shape[2:]
    target = [math.ceil(s / multiple) * multiple for s in spatial]
    if list(spatial) == target:
        return x, tuple(slice(None) for _ in spatial)
    pads: list[int] = []
    crops = []
    for s, t in zip(reversed(spatial), reversed(target), strict=True):
        before = (t - s) // 2
        pads += [before, t - s - before]
    for s, t in zip(spatial, target, strict=True):
        before = (t - s) // 2
        crops.append(slice(before, before + s))
    return F.pad(x, pads), tuple(crops)


class Progress:
    """The default progress sink: drops every event. Any callable taking a
    :mod:`medssl_bench.events` event is a sink (the CLI renders them)."""

    def __call__(self, event: Event) -> None:
        pass


NO_PROGRESS = Progress()


def check_input_size(backbone: Backbone, spatial: tuple[int, ...]) -> None:
    """Refuse images too small for the backbone's depth with a message naming the fix,
    instead of an obscure error from a normalisation layer deep inside the network."""
    smallest = backbone.min_input_size()
    multiple = backbone.size_multiple()
    # The model zero-pads every axis up to a multiple of size_multiple() first (28 -> 32).
    if any(math.ceil(s / multiple) * multiple < smallest for s in spatial):
        raise ConfigError(
            f"Images of size {spatial} are too small for backbone {backbone.name!r} as "
            f"configured: every axis needs at least {smallest - multiple + 1} voxels (it is padded "
            f"to a multiple of {multiple}, which must reach {smallest}). Use larger images "
            "(e.g. --set dataset.size=...) or a shallower backbone (e.g. for unet3d "
            "--set backbone.filters=[32,64,128])."
        )


def _as_tuple(value: Any, dims: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, list | tuple) else (int(value),) * dims


def _first_image(dataset: TorchDataset) -> Tensor:
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise DataError("A dataset split is empty; it needs at least one case.")
    item = dataset[0]
    return item[0] if isinstance(item, tuple | list) else item


def check_world_size(cfg: TrainingConfig, runtime: Runtime, section: str) -> None:
    """The config's ``world_size`` (part of the run key) must be the processes that train."""
    if cfg.world_size != runtime.world_size:
        raise ConfigError(
            f"{section}.world_size is {cfg.world_size} but {runtime.world_size} process(es) "
            f"train. It is set by `bench run --nproc-per-node N` (or torchrun); by hand only "
            f"for a sweep's DDP jobs (--executor local or slurm run each such unit as N "
            f"processes). Drop --set {section}.world_size, or add --executor local/slurm.")


# --------------------------------------------------------------------------- pretraining


@dataclass
class PretrainResult:
    weights: StateDicts
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


class PretrainStep(nn.Module):
    """One pretraining step's forward: the task's loss on a prepared batch. It owns the
    encoder and the heads, every trained parameter, so the runtime can wrap it whole."""

    def __init__(self, task: ProxyTask, encoder: Encoder, heads: nn.ModuleDict) -> None:
        super().__init__()
        self.task = task
        self.encoder = encoder
        self.heads = heads

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, Mapping[str, float | Tensor]]:
        return self.task.compute_loss(self.encoder, self.heads, batch)


def _untouched_rng(device: torch.device, fn: Callable[[], dict[str, float]]) -> dict[str, float]:
    """``fn()`` with the global random state (CPU, and CUDA on a GPU) restored after it."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    try:
        return fn()
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)


def pretrain(
    task: ProxyTask,
    backbone: Backbone,
    unlabeled: TorchDataset,
    info: DatasetInfo,
    cfg: PretrainConfig,
    device: torch.device,
    seed: int,
    on_epoch: MetricCallback | None = None,
    progress: Sink = NO_PROGRESS,
    resume: dict[str, Any] | None = None,
    on_checkpoint: Callable[[dict[str, Any]], None] | None = None,
    runtime: Runtime | None = None,
    probe: Callable[[Encoder], dict[str, float]] | None = None,
) -> PretrainResult:
    """Train ``backbone``'s encoder (and the task's heads) with ``task`` on ``unlabeled``.

    Returns the weights that transfer (``encoder``, plus ``decoder`` when the task says so).
    ``resume``/``on_checkpoint`` carry a full training state between epochs so an interrupted
    pretraining continues where it stopped. ``progress`` receives the loop's events;
    ``runtime`` (default: one process on ``device``) takes ``cfg``'s precision, compile and
    gradient accumulation. ``probe(encoder)`` (with ``cfg.probe_every``): metrics of the
    encoder logged with the epoch's losses every ``probe_every`` epochs and after the last;
    the random state is restored after it, so probing never changes the training.
    """
    runtime = (runtime or Runtime.local(device)).configured(cfg)
    check_world_size(cfg, runtime, "pretrain")
    device = runtime.device
    seed_everything(seed)
    task.check_input(tuple(info.image_size), info.channels)
    check_input_size(backbone, tuple(info.image_size))
    encoder = runtime.place(backbone.build_encoder(info.channels))
    heads = runtime.place(task.build_heads(backbone, encoder))
    params = [*encoder.parameters(), *heads.parameters()]
    optimizer = build_optimizer(params, cfg)
    generator = runtime.generator(seed)
    start_epoch, history = 0, []
    if resume is not None:
        encoder.load_state_dict(resume["encoder"])
        heads.load_state_dict(resume["heads"])
        optimizer.load_state_dict(resume["optimizer"])
        start_epoch, history = resume["epoch"], list(resume["history"])
        try:
            if resume.get("device_type", device.type) != device.type:
                raise RuntimeError("checkpoint written on another device type")
            if runtime.world_size > 1:  # the checkpoint holds rank 0's generator only
                raise RuntimeError("one generator per rank")
            generator.set_state(resume["generator"])
        except RuntimeError:
            # A CPU generator's state cannot continue on CUDA (or back), nor rank 0's on every
            # rank: weights, optimizer and epoch carry over; the batch stream restarts from a
            # seed of its own (per rank under DDP).
            generator = runtime.generator(seed * 1_000_003 + start_epoch)
        torch.set_rng_state(resume["torch_rng"])
        if device.type == "cuda" and resume.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(resume["cuda_rng"], device)  # dropout etc. on the GPU
    multiple = backbone.size_multiple()

    def prepare(images: Tensor) -> dict[str, Tensor]:
        images, _ = pad_to_multiple(runtime.to_device(images), multiple)
        # Batch construction in full precision (the loop calls this outside autocast): under
        # bf16 the augmentations' small affine matrices would be rounded to 8 bits
        # (non-rigid "rotations").
        return task.make_batch(images, generator)

    def end_epoch(epoch: int, logs: dict[str, float]) -> None:
        epoch_logs = {f"pretrain_{k}": v for k, v in logs.items()}
        if probe and cfg.probe_every and ((epoch + 1) % cfg.probe_every == 0
                                          or epoch + 1 == cfg.epochs):
            epoch_logs |= _untouched_rng(device, lambda: probe(encoder))
        history.append(epoch_logs)
        if on_epoch:
            on_epoch(epoch_logs, epoch)

    def checkpoint(epoch: int) -> None:
        assert on_checkpoint is not None
        on_checkpoint({
            "epoch": epoch + 1, "history": history,
            "encoder": encoder.state_dict(), "heads": heads.state_dict(),
            "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "device_type": device.type,
        })

    loop = Loop(
        what=task.name, stage="pretrain",
        model=PretrainStep(task, runtime.compiled(encoder), heads), params=params,
        optimizer=optimizer, schedule=schedule_of(cfg),
        batches=runtime.loader(unlabeled, cfg.batch_size, cfg.iterations_per_epoch,
                               cfg.num_workers),
        runtime=runtime, prepare=prepare, epoch_seed=lambda epoch: seed + epoch,
        grad_clip=cfg.grad_clip,
        where=lambda epoch, step: f"Pretraining {task.name!r} (epoch {epoch + 1}, step {step + 1})",
        on_epoch_end=end_epoch, on_checkpoint=checkpoint if on_checkpoint else None,
        progress=progress,
    )
    seconds = loop.run(cfg.epochs, start_epoch)
    weights: StateDicts = {"encoder": {k: v.detach().cpu() for k, v in encoder.state_dict().items()}}
    if "decoder" in task.transfers and "decoder" in heads:
        weights["decoder"] = {k: v.detach().cpu() for k, v in heads["decoder"].state_dict().items()}
    return PretrainResult(weights, history, seconds)


# --------------------------------------------------------------------------- fine-tuning


class DownstreamModel(nn.Module):
    """Encoder plus a segmentation decoder or a classification head."""

    def __init__(self, encoder: Encoder, head: nn.Module, multiple: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.multiple = multiple

    def forward(self, x: Tensor) -> Tensor:
        x, crop = pad_to_multiple(x, self.multiple)
        out = self.head(self.encoder(x))
        return out[(slice(None), slice(None), *crop)] if out.dim() > 2 else out


def build_downstream(
    backbone: Backbone,
    info: DatasetInfo,
    pretrained: StateDicts | None,
    cfg: FinetuneConfig,
) -> DownstreamModel:
    """The fine-tuning model, initialised from ``pretrained`` weights where given.

    A pretrained ``decoder`` (Models Genesis) is loaded into the segmentation decoder except
    for its output layer (``out``, see :meth:`Backbone.build_decoder`): it predicted restored
    intensities, not classes, so it is never transferred, even where the class count happens
    to equal the channel count and the shapes match.
    """
    encoder = backbone.build_encoder(info.channels)
    if info.kind == "segmentation":
        head = backbone.build_decoder(encoder, info.num_classes, skip_connections=True)
    else:
        head = backbone.build_classifier(encoder, info.num_classes)
    if pretrained is not None:
        state = adapt_state_in_channels(
            pretrained["encoder"], encoder.state_dict(), info.channels, cfg.channel_adaptation
        )
        try:
            encoder.load_state_dict(state)
        except RuntimeError as exc:
            raise ConfigError(
                f"The pretrained encoder does not fit backbone {backbone.name!r} as configured "
                f"now ({str(exc).splitlines()[-1].strip()}). Pretrain and fine-tune with the same "
                "backbone settings."
            ) from None
        if "decoder" in pretrained and info.kind == "segmentation":
            own = head.state_dict()
            usable = {k: v for k, v in pretrained["decoder"].items()
                      if k in own and own[k].shape == v.shape and not k.startswith("out.")}
            own.update(usable)
            head.load_state_dict(own)
    return DownstreamModel(encoder, head, backbone.size_multiple())


def segmentation_loss(logits: Tensor, target: Tensor, kind: str) -> Tensor:
    logits = logits.float()
    terms = []
    if kind in ("ce", "dice_ce"):
        terms.append(F.cross_entropy(logits, target))
    if kind in ("dice", "dice_ce"):
        probs = logits.softmax(1)
        onehot = F.one_hot(target, logits.shape[1]).movedim(-1, 1).float()
        dims = (0, *range(2, logits.dim()))
        inter = (probs * onehot).sum(dims)
        denom = probs.sum(dims) + onehot.sum(dims)
        dice = (2 * inter + 1e-5) / (denom + 1e-5)
        terms.append(1 - dice[1:].mean())
    return sum(terms)  # type: ignore[return-value]


@torch.no_grad()
def evaluate(
    model: nn.Module, dataset: TorchDataset, info: DatasetInfo, device: torch.device,
    batch_size: int = 4, amp: bool = True, runtime: Runtime | None = None,
) -> dict[str, float]:
    """The dataset's metrics for ``model`` on ``dataset`` (whole images, no augmentation).

    Volumes larger than ``info.extra["patch_size"]`` are predicted by sliding windows; with
    ``info.extra["regions"]`` region Dice is added (see :mod:`medssl_bench.volumetric`).
    A segmentation dataset with a ``native_target(index)`` method is scored on each case's
    original voxel grid: the probabilities are resampled there, one case at a time.
    Under DDP (``runtime``) each process scores its share of the batches one process would
    score, and the per-case scores are gathered in case order, so every process returns the
    metrics of one process's pass.
    """
    runtime = runtime or Runtime.local(device)
    model.eval()
    runtime.sync_buffers(model)
    cases = runtime.shard(len(dataset), batch_size)  # type: ignore[arg-type]
    loader = DataLoader(dataset if runtime.world_size == 1 else Subset(dataset, cases),
                        batch_size=batch_size, shuffle=False)
    patch = info.extra.get("patch_size") if info.kind == "segmentation" else None
    regions = info.extra.get("regions") if info.kind == "segmentation" else None
    native = getattr(dataset, "native_target", None) if info.kind == "segmentation" else None
    rows: dict[int, tuple[Any, ...]] = {}  # case -> its scores (dice, regions | probs, label)
    order = iter(cases)
    for images, targets in loader:
        ids = [next(order) for _ in range(len(images))]
        if needs_patches(images.shape[2:], patch):
            logits = sliding_window_logits(model, images, patch, info.extra.get("patch_overlap", 0),
                                           device, batch_size, amp)
        else:
            images = images.to(device, non_blocking=True)
            with autocast(device, amp):
                logits = model(images).float()
        if native is not None:  # per case on its original grid (shapes differ between cases)
            for case, case_logits in zip(ids, logits, strict=True):
                target = native(case)
                pred = to_native(case_logits, target).cpu()[None]
                rows[case] = (dice_per_case(pred, target.label[None], info.num_classes)[0],
                              region_dice(pred, target.label[None], regions)[0] if regions
                              else None)
        elif info.kind == "segmentation":
            pred = logits.argmax(1).cpu()
            dice = dice_per_case(pred, targets, info.num_classes)
            region = region_dice(pred, targets, regions) if regions else [None] * len(ids)
            rows.update(zip(ids, zip(dice, region, strict=True), strict=True))
        else:
            probs = logits.softmax(1).cpu().numpy()
            rows.update(zip(ids, zip(probs, targets.numpy(), strict=True), strict=True))
    if runtime.world_size > 1:
        rows = {case: row for part in runtime.gather(rows) for case, row in part.items()}
    ordered = [rows[case] for case in sorted(rows)]
    if info.kind == "segmentation":
        metrics = segmentation_metrics(torch.stack([r[0] for r in ordered]), info.class_names)
        if regions:
            metrics.update(region_metrics(torch.stack([r[1] for r in ordered]), regions))
        return metrics
    return classification_metrics(np.stack([r[0] for r in ordered]),
                                  np.stack([r[1] for r in ordered]))


@dataclass
class FinetuneResult:
    test_metrics: dict[str, float]
    val_history: list[dict[str, float]]
    best_epoch: int
    seconds: float
    weights: dict[str, Tensor]


class FinetuneStep(nn.Module):
    """One fine-tuning step's forward: the downstream model's loss on (images, targets)."""

    def __init__(self, model: DownstreamModel, kind: str, loss: str) -> None:
        super().__init__()
        self.model = model
        self.kind = kind
        self.loss = loss

    def forward(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, dict[str, float]]:
        images, targets = batch
        logits = self.model(images)
        if self.kind == "segmentation":  # in float32 whatever the autocast dtype
            return segmentation_loss(logits, targets, self.loss), {}
        return F.cross_entropy(logits.float(), targets), {}


def finetune(
    backbone: Backbone,
    info: DatasetInfo,
    train: TorchDataset,
    val: TorchDataset,
    test: TorchDataset,
    pretrained: StateDicts | None,
    cfg: FinetuneConfig,
    device: torch.device,
    seed: int,
    on_epoch: MetricCallback | None = None,
    progress: Sink = NO_PROGRESS,
    label: str = "fine-tune",
    select_metric: str | None = None,
    runtime: Runtime | None = None,
) -> FinetuneResult:
    """Fine-tune on ``train``, pick weights on ``val``, report metrics on ``test``.

    ``select_metric`` (default: the dataset's main metric; the lowest value wins for a metric
    in ``info.lower_is_better``) chooses the validation epoch
    whose weights are tested; it should be the metric the protocol ranks by. Epochs where
    it is undefined (NaN) never beat a defined score; if it is never defined, the last
    epoch is tested. ``progress`` and ``runtime``: as for :func:`pretrain`.
    """
    runtime = (runtime or Runtime.local(device)).configured(cfg)
    check_world_size(cfg, runtime, "finetune")
    device = runtime.device
    seed_everything(seed)
    patch = info.extra.get("patch_size") if info.kind == "segmentation" else None
    spatial = tuple(_first_image(train).shape[1:])
    if patch:
        spatial = tuple(min(s, p) for s, p in zip(spatial, _as_tuple(patch, len(spatial)), strict=True))
    check_input_size(backbone, spatial)
    model = runtime.place(build_downstream(backbone, info, pretrained, cfg))
    assert isinstance(model, DownstreamModel)
    params = list(model.parameters())
    optimizer = build_optimizer(params, cfg)
    freeze_epochs = {"warmup": cfg.warmup_epochs if pretrained is not None else 0,
                     "frozen": cfg.epochs, "none": 0}[cfg.freeze]
    main = select_metric or info.main_metric
    best_score, best_epoch, best_state = -math.inf, -1, None
    history: list[dict[str, float]] = []
    patch_generator = torch.Generator().manual_seed(runtime.rank_seed(seed))

    def prepare(batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        images, targets = batch
        if patch:  # volumes larger than the model's input: one random patch per case
            images, targets = random_patches(images, targets, patch, patch_generator)
        return runtime.to_device(images), runtime.to_device(targets)

    def start_epoch(epoch: int) -> bool:
        frozen = epoch < freeze_epochs
        for p in model.encoder.parameters():
            p.requires_grad_(not frozen)
        if frozen:
            model.encoder.eval()  # keep normalisation statistics fixed too
        return frozen

    def end_epoch(epoch: int, logs: dict[str, float]) -> None:
        nonlocal best_score, best_epoch, best_state
        val_metrics = evaluate(model, val, info, device, cfg.eval_batch_size, cfg.amp, runtime)
        record = {"train_loss": logs.get("loss", math.nan),
                  **{f"val_{k}": v for k, v in val_metrics.items()}}
        history.append(record)
        if on_epoch:
            on_epoch(record, epoch)
        score = val_metrics.get(main, math.nan)
        if main in info.lower_is_better:  # compare as "higher is better" throughout
            score = -score
        undefined_so_far = best_score == -math.inf
        if (cfg.select == "last" or (not math.isnan(score) and score > best_score)
                or (math.isnan(score) and undefined_so_far)):
            score = -math.inf if math.isnan(score) else score
            best_score, best_epoch = score, epoch
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}

    loop = Loop(
        what=label, stage="finetune",
        model=FinetuneStep(runtime.compiled(model), info.kind, cfg.loss), params=params,
        optimizer=optimizer, schedule=schedule_of(cfg),
        batches=runtime.loader(train, cfg.batch_size, cfg.iterations_per_epoch, cfg.num_workers),
        runtime=runtime, prepare=prepare, epoch_seed=lambda epoch: seed * 1000 + epoch,
        grad_clip=cfg.grad_clip, where=lambda epoch, step: f"Fine-tuning {label} (epoch {epoch + 1})",
        on_epoch_start=start_epoch, on_epoch_end=end_epoch, progress=progress,
    )
    seconds = loop.run(cfg.epochs)
    assert best_state is not None
    model.load_state_dict(best_state)
    test_metrics = evaluate(model, test, info, device, cfg.eval_batch_size, cfg.amp, runtime)
    return FinetuneResult(test_metrics, history, best_epoch, seconds, best_state)


def label_subset(
    n_train: int, fraction: float, seed: int, groups: Sequence[str] | None = None
) -> list[int]:
    """Indices of the labeled training cases used at ``fraction`` (0 < fraction <= 1).

    One permutation per seed; a fraction takes its first ``ceil(fraction * n)`` entries (at
    least one), so subsets are nested (5 % inside 10 % inside ...) and identical for every
    task, the scratch baseline included. With ``groups`` (one per case, e.g. the volume of a
    2D slice) the fraction counts groups and takes every case of a chosen group: 10 % of the
    labels means 10 % of the annotated volumes, whatever the number of slices per volume.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction {fraction} outside (0, 1]")
    if groups:
        if len(groups) != n_train:
            raise ValueError(f"{len(groups)} groups for {n_train} training cases")
        unique = list(dict.fromkeys(groups))
        chosen = {unique[i] for i in label_subset(len(unique), fraction, seed)}
        return [i for i, group in enumerate(groups) if group in chosen]
    permutation = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed)).tolist()
    count = max(1, math.ceil(round(fraction * n_train, 6)))
    return sorted(permutation[:count])


def per_class_subset(labels: Sequence[int], per_class: int, seed: int) -> list[int]:
    """Indices of ``per_class`` labelled cases of every class (all of a class that has
    fewer), drawn by ``seed``: one permutation per seed, each class taking its first cases in
    it, so for one seed the subsets are nested (1 per class inside 5 inside ...) and
    identical for every task."""
    if per_class < 1:
        raise ValueError(f"{per_class} cases per class: need at least 1")
    permutation = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    taken: dict[int, int] = {}
    chosen = []
    for i in permutation.tolist():
        label = int(labels[i])
        if taken.get(label, 0) < per_class:
            taken[label] = taken.get(label, 0) + 1
            chosen.append(i)
    return sorted(chosen)


def train_labels(dataset: TorchDataset) -> list[int]:
    """The class of every case of a labelled classification split: its ``targets`` when it
    holds them (array-backed datasets), else read item by item."""
    targets = getattr(dataset, "targets", None)
    if targets is not None and len(targets) == len(dataset):  # type: ignore[arg-type]
        return [int(t) for t in targets]
    return [int(dataset[i][1]) for i in range(len(dataset))]  # type: ignore[arg-type]


def subset(dataset: TorchDataset, indices: Sequence[int]) -> Subset:
    return Subset(dataset, list(indices))
