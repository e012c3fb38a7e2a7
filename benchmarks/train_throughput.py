"""Training throughput of every registered pretraining task and of every backbone's
fine-tuning step, at the papers' sizes, with achieved TFLOP/s from an analytic FLOP count.

One row per pretraining task of the chosen dims (``--dims``, default 3; each at its
``paper_input_size``, with the default backbone of those dims) and one per backbone of
those dims (its fine-tuning step: 128^3, 3-class segmentation in 3D; 224^2 classification
in 2D). Plugins, tasks and backbones take their ``--preset`` (default ``paper``: for unet3d
the full residual U-Net, 32-512 filters, width 1.0); batch sizes, learning rates, gradient
clipping and loss come from the protocol spec (``--protocol``, default data-efficiency: a
pretraining step takes 4 input volumes, a fine-tuning step 2). ``--set section.key=value``
overrides them as for ``bench run`` (sections pretrain, finetune, backbone, dataset and
``task.NAME``).

    python benchmarks/train_throughput.py --device cuda               # table
    python benchmarks/train_throughput.py --device cuda --json --out throughput.json
    python benchmarks/train_throughput.py --device cuda --compile --backbones unet3d --tasks none
    python benchmarks/train_throughput.py --size 16 --steps 1 --warmup 0 \\
        --set backbone.filters=[4,8]                                  # a CPU smoke run

A step is what ``engine.pretrain``/``engine.finetune`` do per batch: batch construction
(``task.make_batch`` on the device, in full precision), the forward pass and loss under the
run's autocast (bf16 on CUDA, fp32 on the CPU; cuDNN autotune via
``medssl_bench.device.configure_backend``), backward, gradient clipping when configured and
one Adam step. Warm-up steps are excluded; timers are read after synchronising. Per row:

- volumes/s: INPUT volumes per second, whatever the task makes of them. rotation3d passes
  ``copies_per_volume`` (4) rotated copies of each volume through the encoder, cpc3d 343
  patches of 32^3, jigsaw3d/rpl3d their grid's cells; the row's ``encoder_inputs_per_volume``
  and ``encoder_input`` (the shape of one encoder call) say how many and how large.
- TFLOP/volume (forward + backward) and achieved TFLOP/s, % of the device's bf16 peak: from
  an analytic count (2 x multiply-accumulates of every convolution, matrix product and RNN
  of one real forward pass at the measured shape; backward = 2 x forward), printed per row,
  with the encoder's part. Peak: ``--peak-tflops``; by default 790 TFLOP/s for H100/H200
  (issue 13's figure for the H200; NVIDIA's datasheet says 989 dense for the SXM part) and
  312 for A100; none on the CPU unless given.
- peak memory: ``torch.cuda.max_memory_allocated`` over the row on CUDA; on the CPU the
  process's peak RSS during the row (VmHWM, reset per row where Linux allows).
- batch construction: the share of the step inside ``make_batch`` (CUDA events on the GPU);
- with ``--data DATASET`` (a real dataset, read from its cache after the first load): rows
  read the dataset's images through the DataLoader a run builds (``num_workers`` of the
  pretrain/finetune section, pinned memory on CUDA): the share of the step spent waiting for
  data (host wait plus copy, as seen by the GPU's stream) and the data path's own rate (the
  loader alone, no training) beside the training rate.
- ``--compile``: ``torch.compile`` (``dynamic=False``, once per row) of the encoder and the
  heads (heads that take the encoder as an argument run the compiled encoder inside) or of
  the downstream model; the compile time (first step minus a steady step) is reported apart
  and excluded from the steady state.

By default the loss is read on the host every step (``--loss-sync step``: the finiteness
check before backward and the logged value after the optimizer step, as the 0.1 training
loop does); ``--loss-sync none`` measures a loop without a host synchronisation per step.
A row that cannot run (out of memory, a task that does not fit the backbone) shows its
error and the others go on; the exit code is 1 only when every row failed. Every output
carries a host line (CPU model and flags or GPU, torch version): a figure without its host
means little.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from medssl_bench.config import deep_merge, parse_overrides, validate_section
from medssl_bench.device import autocast, configure_backend, seed_everything
from medssl_bench.engine import (
    FinetuneConfig,
    PretrainConfig,
    build_downstream,
    pad_to_multiple,
    segmentation_loss,
)
from medssl_bench.interfaces import DatasetInfo
from medssl_bench.plugins import build_registry
from medssl_bench.spec import missing_capabilities

#: bf16 dense tensor-core peaks (TFLOP/s) by a substring of the CUDA device name. H100/H200:
#: the ~790 TFLOP/s issue 13 gives for the H200 (its % of peak figures use it; NVIDIA's
#: datasheet says 989 dense for the SXM parts); A100: the datasheet's 312.
PEAK_BF16_TFLOPS: dict[str, tuple[float, str]] = {
    "H200": (790.0, "issue 13's H200 figure"),
    "H100": (790.0, "issue 13's H200 figure (same tensor cores)"),
    "A100": (312.0, "NVIDIA A100 datasheet, dense bf16"),
}

#: Fine-tuning rows without --data: the papers' downstream input per spatial dims.
FINETUNE_SIZE = {3: 128, 2: 224}
FINETUNE_KIND = {3: "segmentation", 2: "classification"}


# --------------------------------------------------------------------------- host


def host_info(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on: CPU model and flags, GPU, torch."""
    model, flags = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo") as fh:
            text = fh.read()
        for line in text.splitlines():
            if line.startswith("model name") and model in ("", platform.machine(),
                                                           platform.processor()):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                present = set(line.split(":", 1)[1].split())
                flags = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16")
                         if f in present]
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": model, "cpu_flags": flags, "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
    return info


def host_line(info: dict[str, Any]) -> str:
    cpu = (f"{info['cpu']} ({info['cpu_count']} logical CPUs, {info['torch_threads']} torch "
           f"threads; {' '.join(info['cpu_flags']) or 'no AVX2'})")
    gpu = (f"{info['gpu']} ({info['gpu_memory_gib']} GiB, CUDA {info['cuda']}, cuDNN "
           f"{info['cudnn']}) on " if "gpu" in info else "")
    return f"host: {gpu}{cpu}, torch {info['torch']}, Python {info['python']}"


def default_peak(device: torch.device, given: float | None) -> tuple[float | None, str]:
    if given:
        return given, "--peak-tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (tflops, source) in PEAK_BF16_TFLOPS.items():
            if key in name:
                return tflops, source
        return None, f"unknown for {name}: pass --peak-tflops"
    return None, "none for the CPU: pass --peak-tflops"


# --------------------------------------------------------------------------- FLOP counting


def _conv_flops(args: tuple, out: Tensor) -> int:
    """aten.convolution(input, weight, bias, stride, padding, dilation, transposed, ...)."""
    x, weight = args[0], args[1]
    transposed = bool(args[6]) if len(args) > 6 else False
    kernel = math.prod(weight.shape[2:])
    # weight is (out, in/groups, *k), or (in, out/groups, *k) when transposed: every output
    # element sums in/groups * k products; every input element feeds out/groups * k outputs.
    macs = (x.numel() if transposed else out.numel()) * weight.shape[1] * kernel
    return 2 * macs


def _mm_flops(a: Tensor, b: Tensor) -> int:
    return 2 * a.shape[0] * a.shape[1] * b.shape[1]


def _bmm_flops(a: Tensor, b: Tensor) -> int:
    return 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]


def _sdpa_flops(args: tuple, out: Any) -> int:
    q, k, v = args[0], args[1], args[2]
    batch_heads = math.prod(q.shape[:-2])
    return 2 * batch_heads * q.shape[-2] * k.shape[-2] * (q.shape[-1] + v.shape[-1])


_FLOPS: dict[str, Callable[[tuple, Any], int]] = {
    "convolution": _conv_flops,
    "_convolution": _conv_flops,
    "mm": lambda args, out: _mm_flops(args[0], args[1]),
    "addmm": lambda args, out: _mm_flops(args[1], args[2]),
    "bmm": lambda args, out: _bmm_flops(args[0], args[1]),
    "baddbmm": lambda args, out: _bmm_flops(args[1], args[2]),
    "_scaled_dot_product_flash_attention": _sdpa_flops,
    "_scaled_dot_product_flash_attention_for_cpu": _sdpa_flops,
    "_scaled_dot_product_efficient_attention": _sdpa_flops,
    "_scaled_dot_product_cudnn_attention": _sdpa_flops,
}


def rnn_flops(module: nn.RNNBase, x: Tensor) -> int:
    """2 x multiply-accumulates of an RNN/GRU/LSTM's gate matrices over a sequence."""
    gates = {"LSTM": 4, "GRU": 3}.get(module.mode, 1)
    if x.dim() == 2:  # unbatched (T, I)
        steps, batch = x.shape[0], 1
    else:
        steps, batch = (x.shape[1], x.shape[0]) if module.batch_first else x.shape[:2]
    directions = 2 if module.bidirectional else 1
    hidden, total, width = module.hidden_size, 0, module.input_size
    for _ in range(module.num_layers):
        total += directions * gates * hidden * (width + hidden)
        width = hidden * directions
    return 2 * total * steps * batch


class FlopCounter(TorchDispatchMode):
    """Analytic FLOPs (2 x multiply-accumulates) of one eager pass.

    Counts at the aten level every convolution (transposed ones too), matrix product
    (``mm``/``addmm``/``bmm``/``baddbmm``, which ``nn.Linear``, ``matmul`` and ``einsum``
    become) and fused attention, from the shapes of the real pass; RNN modules (cuDNN runs
    them as one opaque kernel) are counted by a forward hook from their sizes. Module hooks
    also attribute the FLOPs of named ``scopes`` (``{"encoder": encoder}``) and record each
    scope's input shapes. Element-wise work (normalisation, activations, the loss) is not
    counted: it is memory-bound and small in FLOPs.

        with FlopCounter({"encoder": encoder}, roots=[encoder, heads]) as counter:
            loss = compute_loss(...)
        counter.total, counter.by_scope["encoder"], counter.inputs["encoder"]
    """

    def __init__(self, scopes: dict[str, nn.Module] | None = None,
                 roots: list[nn.Module] | None = None) -> None:
        super().__init__()
        self.total = 0
        self.by_scope: dict[str, int] = {name: 0 for name in scopes or {}}
        self.inputs: dict[str, list[tuple[int, ...]]] = {name: [] for name in scopes or {}}
        self._active: list[str] = []
        self._suppress = 0
        self._scopes = scopes or {}
        self._roots = [*(roots or []), *self._scopes.values()]
        self._handles: list[Any] = []

    def _add(self, flops: int) -> None:
        self.total += flops
        for name in set(self._active):
            self.by_scope[name] += flops

    def __enter__(self) -> FlopCounter:
        for name, module in self._scopes.items():
            def pre(module, args, name=name):
                self._active.append(name)
                if args and isinstance(args[0], Tensor):
                    self.inputs[name].append(tuple(args[0].shape))

            def post(module, args, output, name=name):
                self._active.remove(name)

            self._handles += [module.register_forward_pre_hook(pre),
                              module.register_forward_hook(post)]
        seen: set[int] = set()
        for root in self._roots:
            for module in root.modules():
                if isinstance(module, nn.RNNBase) and id(module) not in seen:
                    seen.add(id(module))

                    def rnn_pre(module, args):
                        self._add(rnn_flops(module, args[0]))
                        self._suppress += 1

                    def rnn_post(module, args, output):
                        self._suppress -= 1

                    self._handles += [module.register_forward_pre_hook(rnn_pre),
                                      module.register_forward_hook(rnn_post)]
        super().__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        counter = _FLOPS.get(func.overloadpacket.__name__)
        if counter is not None and not self._suppress:
            self._add(counter(args, out))
        return out


# --------------------------------------------------------------------------- memory, clocks


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux >= 4.0: writing 5 resets the process's peak RSS (VmHWM)
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def peak_memory_gib(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "max_memory_allocated"
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20, "peak RSS of the process (VmHWM)"
    except OSError:
        pass
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "peak RSS of the process since start")


class Clock:
    """Marks on the GPU's stream (CUDA events) or the host clock (CPU)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, start: Any, end: Any) -> float:
        return start.elapsed_time(end) if self.cuda else (end - start) * 1000

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


# --------------------------------------------------------------------------- workloads


@dataclass
class Workload:
    """One row's training step, built on the device."""

    info: dict[str, Any]
    encoder: nn.Module
    #: modules compiled by --compile (in place) and moved to channels_last
    compile_targets: list[nn.Module]
    roots: list[nn.Module]
    params: list[Tensor]
    optimizer: torch.optim.Optimizer
    grad_clip: float | None
    volumes: int
    #: the next raw batch on the device (fixed in-memory tensors, or from the DataLoader)
    fetch: Callable[[], Any]
    #: batch construction (make_batch); None when the step has none
    build: Callable[[Any], Any] | None
    #: forward + loss (under the run's autocast, as the engine places it)
    loss: Callable[[Any], Tensor]
    #: --data: volumes/s of the data path alone (the loader and the copy, no training)
    data_rate: Callable[[], float] | None = None
    cleanup: list[Callable[[], None]] = field(default_factory=list)


def _memory_format(dims: int) -> torch.memory_format:
    return torch.channels_last_3d if dims == 3 else torch.channels_last


def _to_format(value: Any, dims: int) -> Any:
    fmt = _memory_format(dims)
    if isinstance(value, Tensor) and value.is_floating_point() and value.dim() == dims + 2:
        return value.contiguous(memory_format=fmt)
    if isinstance(value, dict):
        return {k: _to_format(v, dims) for k, v in value.items()}
    return value


def _optimizer(params: list[Tensor], cfg: Any, device: torch.device, unfused: bool):
    """Adam as the engine builds it (fused kernels on CUDA, ``optim.fused_kernels``), or
    torch's default implementation with ``--unfused`` (to measure what fusing gives)."""
    from medssl_bench.optim import fused_kernels

    unique = list({id(p): p for p in params}.values())
    kwargs = {"fused": True} if not unfused and fused_kernels(unique) else {}
    return torch.optim.Adam(unique, lr=cfg.lr, weight_decay=cfg.weight_decay, **kwargs)


def _takes_encoder(module: nn.Module) -> bool:
    return "encoder" in inspect.signature(module.forward).parameters


class DataSource:
    """A run's loader over a real dataset split (the engine's EpochLoader settings: its
    DataLoader, or the cases held on the device as the config's ``data_placement`` says;
    ``--set pretrain.data_placement=loader`` measures the DataLoader on a GPU)."""

    def __init__(self, dataset: Any, batch_size: int, batches: int, num_workers: int,
                 device: torch.device, seed: int,
                 transform: Callable[[Any], Any], data_placement: str = "loader") -> None:
        from medssl_bench.runtime import EpochLoader, stack_on_device

        self.loaders = EpochLoader(dataset, batch_size, batches, num_workers,
                                   device.type == "cuda",
                                   resident=stack_on_device(dataset, device, data_placement))
        self.batch_size, self.batches, self.seed = batch_size, batches, seed
        self.transform, self.device = transform, device
        self.num_workers = num_workers
        self.iterator = None

    def next(self) -> Any:
        if self.iterator is None:
            self.iterator = iter(self.loaders.epoch(self.seed))
        try:
            item = next(self.iterator)
        except StopIteration:
            self.iterator = iter(self.loaders.epoch(self.seed + 1))
            item = next(self.iterator)
        return self.transform(item)

    def rate(self, warmup: int, steps: int) -> float:
        """Volumes/s of the loader and the copy to the device alone (after ``warmup``
        batches, which cover starting the workers)."""
        iterator = iter(self.loaders.epoch(self.seed + 7))
        clock = Clock(self.device)
        for _ in range(max(warmup, 1)):
            self.transform(next(iterator))
        clock.sync()
        start, count = time.perf_counter(), 0
        for _ in range(steps):
            try:
                item = self.transform(next(iterator))
            except StopIteration:
                break
            count += len(item[0]) if isinstance(item, tuple | list) else len(item)
        clock.sync()
        del iterator
        return count / max(time.perf_counter() - start, 1e-9)

    def close(self) -> None:
        self.iterator = None
        self.loaders = None  # persistent workers end with their loader


# --------------------------------------------------------------------------- settings


@dataclass
class Settings:
    registry: Any
    spec: Any
    device: torch.device
    dims: int
    preset: str | None
    overrides: dict[str, Any]
    args: argparse.Namespace
    data: Any = None  # DataSplits with --data

    def plugin_config(self, kind: str, cls: Any, section: str | None = None) -> Any:
        values = cls.presets.get(self.preset, {}) if self.preset else {}
        spec_preset = self.spec.presets.get(self.preset, {}) if self.preset else {}
        values = deep_merge(values, spec_preset.get(kind, {}))
        extra = self.overrides.get(kind, {})
        if kind == "task":  # --set task.NAME.key=value
            extra = extra.get(cls.name, {})
        values = deep_merge(values, extra)
        return validate_section(cls.Config, values, section or kind, "--set",
                                schema=f"{kind} {cls.name}")

    def train_config(self, section: str) -> Any:
        values = dict(getattr(self.spec, section))
        if self.dims == 2:
            values = deep_merge(values, self.spec.dims2.get(section, {}))
        if self.preset:
            values = deep_merge(values, self.spec.presets.get(self.preset, {}).get(section, {}))
        values = deep_merge(values, self.overrides.get(section, {}))
        if self.args.batch_size:
            values["batch_size"] = self.args.batch_size
        model = PretrainConfig if section == "pretrain" else FinetuneConfig
        return validate_section(model, values, section, "--set")

    def backbone(self, name: str) -> Any:
        cls = self.registry.get("backbone", name)
        return cls(self.plugin_config("backbone", cls))


def _shape_for(settings: Settings, wanted: tuple[int, ...], minimum: tuple[int, ...],
               backbone: Any) -> tuple:
    """The papers' size, or ``--size`` raised to the task's and the backbone's smallest input
    (Swin UNETR and ResEnc-L need 64 per axis)."""
    if settings.args.size:
        low = backbone.min_input_size()
        return tuple(max(settings.args.size, m, low) for m in minimum)
    return tuple(wanted)


def pretrain_workload(settings: Settings, name: str) -> Workload:
    args, device, registry = settings.args, settings.device, settings.registry
    cfg = settings.train_config("pretrain")
    task_cls = registry.get("task", name)
    task = task_cls(settings.plugin_config("task", task_cls, f"task.{name}"))
    backbone_name = args.backbone or registry.default("backbone", settings.dims)
    if not args.backbone and missing_capabilities(registry, name, backbone_name):
        # a task that needs what the default backbone lacks (mae3d: tokens) gets the first
        # backbone that offers it
        backbone_name = next((b for b in registry.names("backbone")
                              if not missing_capabilities(registry, name, b)), backbone_name)
    backbone = settings.backbone(backbone_name)
    if settings.data is not None:
        info = settings.data.info
        size, channels = tuple(info.image_size), info.channels
    else:
        size = _shape_for(settings, task_cls.paper_input_size, task_cls.min_input_size,
                          backbone)
        channels = args.channels
    task.check_input(size, channels)
    from medssl_bench.engine import check_input_size

    check_input_size(backbone, size)
    encoder = backbone.build_encoder(channels).to(device)
    heads = task.build_heads(backbone, encoder).to(device)
    if args.channels_last:
        encoder.to(memory_format=_memory_format(settings.dims))
        heads.to(memory_format=_memory_format(settings.dims))
    params = [*encoder.parameters(), *heads.parameters()]
    multiple = backbone.size_multiple()
    generator = torch.Generator(device=device).manual_seed(args.seed)
    source: DataSource | None = None
    if settings.data is not None:
        source = DataSource(settings.data.unlabeled, cfg.batch_size,
                            args.warmup + args.steps + 2, cfg.num_workers, device, args.seed,
                            lambda images: images.to(device, non_blocking=True),
                            cfg.data_placement)
        fetch = source.next
    else:
        images = torch.rand((cfg.batch_size, channels, *size), device=device,
                            generator=torch.Generator(device=device).manual_seed(args.seed))

        def fetch() -> Tensor:
            return images

    def build(images: Tensor) -> dict[str, Tensor]:
        images, _ = pad_to_multiple(images, multiple)
        batch = task.make_batch(images, generator)
        return _to_format(batch, settings.dims) if args.channels_last else batch

    def loss(batch: dict[str, Tensor]) -> Tensor:
        with autocast(device, cfg.amp):  # as engine.pretrain: the task's loss under autocast
            return task.compute_loss(encoder, heads, batch)[0]

    targets = [encoder, *(h for h in heads.values() if not _takes_encoder(h))]
    return Workload(
        info={"row": name, "stage": "pretrain", "backbone": backbone_name, "input": list(size),
              "channels": channels},
        encoder=encoder, compile_targets=targets, roots=[encoder, heads], params=params,
        optimizer=_optimizer(params, cfg, device, args.unfused), grad_clip=cfg.grad_clip,
        volumes=cfg.batch_size, fetch=fetch, build=build, loss=loss,
        data_rate=(lambda: source.rate(args.warmup, args.steps)) if source else None,
        cleanup=[source.close] if source else [],
    )


def finetune_workload(settings: Settings, name: str) -> Workload:
    args, device = settings.args, settings.device
    cfg = settings.train_config("finetune")
    backbone = settings.backbone(name)
    source: DataSource | None = None
    if settings.data is not None:
        info = settings.data.info
        from medssl_bench.volumetric import random_patches

        patch = info.extra.get("patch_size") if info.kind == "segmentation" else None
        first = settings.data.train[0][0]
        size = tuple(first.shape[1:])
        if patch:
            size = tuple(min(s, int(patch)) for s in size)
        patch_generator = torch.Generator().manual_seed(args.seed)

        def transform(item: Any) -> tuple[Tensor, Tensor]:
            images, targets = item
            if patch:  # as engine.finetune: one random patch per case, on the host
                images, targets = random_patches(images, targets, patch, patch_generator)
            return (images.to(device, non_blocking=True), targets.to(device, non_blocking=True))

        source = DataSource(settings.data.train, cfg.batch_size, args.warmup + args.steps + 2,
                            cfg.num_workers, device, args.seed, transform, cfg.data_placement)
        fetch = source.next
    else:
        # --size is raised to the backbone's smallest input (Swin UNETR, ResEnc-L: 64)
        side = max(args.size, backbone.min_input_size()) if args.size else \
            FINETUNE_SIZE[settings.dims]
        size = (side,) * settings.dims
        kind = FINETUNE_KIND[settings.dims]
        info = DatasetInfo(kind=kind, num_classes=args.num_classes, channels=args.channels,
                           image_size=size,
                           class_names=tuple(f"class{i}" for i in range(args.num_classes)),
                           metrics=(), main_metric="")
        generator = torch.Generator(device=device).manual_seed(args.seed)
        images = torch.rand((cfg.batch_size, info.channels, *size), device=device,
                            generator=generator)
        target_shape = (cfg.batch_size, *size) if kind == "segmentation" else (cfg.batch_size,)
        labels = torch.randint(0, info.num_classes, target_shape, device=device,
                               generator=generator)

        def fetch() -> tuple[Tensor, Tensor]:
            return images, labels

    from medssl_bench.engine import check_input_size

    check_input_size(backbone, size)
    model = build_downstream(backbone, info, None, cfg).to(device)
    if args.channels_last:
        model.to(memory_format=_memory_format(settings.dims))
    params = list(model.parameters())

    def build(batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        return _to_format(batch[0], settings.dims), batch[1]

    def loss(batch: tuple[Tensor, Tensor]) -> Tensor:
        images, targets = batch
        with autocast(device, cfg.amp):  # as engine.finetune: the loss outside, in fp32
            logits = model(images)
        if info.kind == "segmentation":
            return segmentation_loss(logits, targets, cfg.loss)
        return nn.functional.cross_entropy(logits.float(), targets)

    return Workload(
        info={"row": f"finetune/{name}", "stage": "finetune", "backbone": name,
              "input": list(size), "channels": info.channels, "kind": info.kind,
              "classes": info.num_classes, "loss": cfg.loss if info.kind == "segmentation"
              else "ce"},
        encoder=model.encoder, compile_targets=[model], roots=[model], params=params,
        optimizer=_optimizer(params, cfg, device, args.unfused), grad_clip=cfg.grad_clip,
        volumes=cfg.batch_size, fetch=fetch,
        build=build if args.channels_last else None, loss=loss,
        data_rate=(lambda: source.rate(args.warmup, args.steps)) if source else None,
        cleanup=[source.close] if source else [],
    )


# --------------------------------------------------------------------------- measuring


def count_flops(work: Workload, device: torch.device) -> dict[str, Any]:
    """One eager forward pass (with autograd, as in training) under the FLOP counter."""
    batch = work.fetch()
    if work.build is not None:
        batch = work.build(batch)
    with FlopCounter({"encoder": work.encoder}, roots=work.roots) as counter:
        loss = work.loss(batch)
    del loss, batch
    inputs = counter.inputs["encoder"]
    return {
        "forward_flops": counter.total,
        "encoder_forward_flops": counter.by_scope["encoder"],
        "encoder_inputs_per_volume": sum(s[0] for s in inputs) / work.volumes if inputs else 0,
        "encoder_input": list(inputs[0][1:]) if inputs else None,
        "encoder_calls": len(inputs),
    }


def train_step(work: Workload, batch: Any, device: torch.device, sync: bool) -> bool:
    loss = work.loss(batch)
    finite = bool(torch.isfinite(loss)) if sync else True  # the engine's _check_finite
    work.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if work.grad_clip:
        nn.utils.clip_grad_norm_(work.params, work.grad_clip)
    work.optimizer.step()
    if sync:
        loss.item()  # the logged value
    return finite


def measure(work: Workload, settings: Settings) -> dict[str, Any]:
    args, device = settings.args, settings.device
    clock = Clock(device)
    sync = args.loss_sync == "step"
    row: dict[str, Any] = dict(work.info, volumes_per_step=work.volumes)
    flops = count_flops(work, device)
    row.update(flops)
    clock.sync()
    if args.compile:
        torch._dynamo.reset()  # a fresh cache per row: no recompile limit across rows
        from torch._dynamo.utils import counters

        counters.clear()
        for module in work.compile_targets:
            module.compile(dynamic=False, mode=args.compile_mode)

    def step() -> Any:
        batch = work.fetch()
        a = clock.mark()
        if work.build is not None:
            batch = work.build(batch)
        b = clock.mark()
        finite = train_step(work, batch, device, sync)
        return a, b, finite

    warmup = max(args.warmup, 1 if args.compile else 0)
    first_s = None
    for i in range(warmup):
        start = time.perf_counter()
        step()
        if i == 0:
            clock.sync()
            first_s = time.perf_counter() - start
    clock.sync()
    marks, finite = [], True
    wall0 = time.perf_counter()
    previous = clock.mark()
    for _ in range(args.steps):
        a, b, ok = step()
        end = clock.mark()
        marks.append((previous, a, b, end))
        previous, finite = end, finite and ok
    clock.sync()
    wall = time.perf_counter() - wall0
    data_ms = [clock.ms(p, a) for p, a, _, _ in marks]
    build_ms = [clock.ms(a, b) for _, a, b, _ in marks]
    total_ms = sum(clock.ms(p, e) for p, _, _, e in marks) or 1e-9
    step_s = wall / max(args.steps, 1)
    train_flops = 3 * flops["forward_flops"]  # backward = 2 x forward
    tflops = train_flops / step_s / 1e12
    row.update(
        volumes_per_s=work.volumes / step_s,
        step_ms=step_s * 1000,
        tflop_per_volume=train_flops / work.volumes / 1e12,
        encoder_tflop_per_volume=3 * flops["encoder_forward_flops"] / work.volumes / 1e12,
        tflops=tflops,
        pct_peak=100 * tflops / settings.args.peak if settings.args.peak else None,
        batch_construction_ms=statistics.fmean(build_ms) if work.build else 0.0,
        batch_construction_share=sum(build_ms) / total_ms if work.build else 0.0,
        loss_finite=finite,
    )
    if work.data_rate is not None:
        row.update(data_wait_ms=statistics.fmean(data_ms), data_share=sum(data_ms) / total_ms)
    if args.compile and first_s is not None:
        row.update(first_step_s=first_s, compile_s=max(first_s - step_s, 0.0),
                   compiled_graphs=int(counters["stats"].get("unique_graphs", 0)),
                   graph_breaks=int(sum(counters["graph_break"].values())))
    memory, what = peak_memory_gib(device)
    row.update(peak_memory_gib=memory, peak_memory_kind=what)
    if work.data_rate is not None:
        rate = work.data_rate()
        row.update(data_volumes_per_s=rate, data_to_train_ratio=rate / row["volumes_per_s"])
    return row


def run_row(builder: Callable[[], Workload], settings: Settings, label: dict[str, Any]) -> dict:
    device = settings.device
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    reset_peak_memory(device)
    seed_everything(settings.args.seed)
    started = time.perf_counter()
    work = None
    try:
        work = builder()
        row = measure(work, settings)
    except oom as error:
        row = dict(label, error=f"out of memory: {str(error).splitlines()[0]}")
    except Exception as error:  # one row that cannot run must not hide the others
        row = dict(label, error=f"{type(error).__name__}: {error}")
    finally:
        if work is not None:
            for close in work.cleanup:
                close()
        del work
        if settings.args.compile:
            torch._dynamo.reset()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    row["row_s"] = time.perf_counter() - started
    return row


# --------------------------------------------------------------------------- selection, CLI


def _choose(kind: str, names: list[str], wanted: str | None, flag: str) -> list[str]:
    if wanted is None:
        return names
    if wanted.strip().lower() == "none":
        return []
    chosen = [n.strip() for n in wanted.split(",") if n.strip()]
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        raise SystemExit(f"{flag}: unknown {kind}(s) {unknown}; registered: {names}")
    return chosen


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dims", type=int, choices=[2, 3], default=3,
                   help="spatial dims of the tasks and backbones measured (default 3)")
    p.add_argument("--tasks", default=None,
                   help="comma-separated pretraining tasks (default: all of --dims; none: skip)")
    p.add_argument("--backbones", default=None,
                   help="comma-separated backbones whose fine-tuning step is measured "
                        "(default: all of --dims; none: skip)")
    p.add_argument("--backbone", default=None,
                   help="the backbone pretraining rows use (default: the default of --dims)")
    p.add_argument("--preset", default="paper",
                   help="plugin and protocol preset (default paper: the papers' settings)")
    p.add_argument("--protocol", default="data-efficiency",
                   help="the protocol spec whose pretrain/finetune settings steps use")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[],
                   metavar="KEY=VALUE",
                   help="overrides as for bench run: pretrain.*, finetune.*, backbone.*, "
                        "dataset.*, task.NAME.* (e.g. backbone.filters=[4,8])")
    p.add_argument("--batch-size", type=int, default=None,
                   help="input volumes per step for every row (default: the spec's, 4 for "
                        "pretraining, 2 for fine-tuning)")
    p.add_argument("--size", type=int, default=None,
                   help="cubic input side for every row instead of the papers' sizes (raised "
                        "to a task's or backbone's min_input_size where smaller); for tiny CPU "
                        "runs")
    p.add_argument("--channels", type=int, default=1, help="image channels (without --data)")
    p.add_argument("--num-classes", type=int, default=3,
                   help="fine-tuning classes (without --data; default 3)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per row (default 3)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per row (default 10)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile encoder+heads / the downstream model (compile time "
                        "reported apart)")
    p.add_argument("--compile-mode", default=None,
                   help="torch.compile mode (default: torch's default; max-autotune compiles "
                        "for minutes per row)")
    p.add_argument("--channels-last", action="store_true",
                   help="channels_last(_3d) memory format for the network and its inputs")
    p.add_argument("--unfused", action="store_true",
                   help="torch's default Adam instead of the engine's fused kernels on CUDA")
    p.add_argument("--loss-sync", choices=["step", "none"], default="step",
                   help="step: read the loss on the host every step as the 0.1 loop does "
                        "(default); none: no host synchronisation inside a step")
    p.add_argument("--data", default=None, metavar="DATASET",
                   help="read a real dataset (configured by --set dataset.*) through a run's "
                        "DataLoader (rows then use its image size) and report the data path's "
                        "share of the step and its own rate")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's bf16 peak for %% of peak (default: 790 for H100/H200 as "
                        "issue 13 gives, 312 for A100)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-limit-s", type=float, default=None,
                   help="start no further row after this many seconds (they are reported as "
                        "skipped)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--out", default=None, help="also write the JSON to this file")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be at least 1 and --warmup at least 0")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    from medssl_bench.spec import load_spec

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for, but CUDA is not available.")
    configure_backend(device)
    registry = build_registry()
    host = host_info(device)
    args.peak, peak_source = default_peak(device, args.peak_tflops)
    settings = Settings(registry=registry, spec=load_spec(args.protocol, registry), device=device,
                        dims=args.dims, preset=args.preset,
                        overrides=parse_overrides(args.overrides), args=args)
    if args.data:
        cls = registry.get("dataset", args.data)
        if getattr(cls, "spatial_dims", 3) != args.dims:
            raise SystemExit(f"--data {args.data} is {cls.spatial_dims}D; pass --dims "
                             f"{cls.spatial_dims}.")
        t0 = time.perf_counter()
        settings.data = cls(settings.plugin_config("dataset", cls)).load()
        data_load_s = time.perf_counter() - t0
    tasks = _choose("task", [n for n in registry.names("task")
                             if registry.get("task", n).pretrains
                             and registry.get("task", n).spatial_dims == args.dims],
                    args.tasks, "--tasks")
    backbones = _choose("backbone", [n for n in registry.names("backbone")
                                     if registry.get("backbone", n).spatial_dims == args.dims],
                        args.backbones, "--backbones")
    jobs = [({"row": t, "stage": "pretrain"}, lambda t=t: pretrain_workload(settings, t))
            for t in tasks]
    jobs += [({"row": f"finetune/{b}", "stage": "finetune"},
              lambda b=b: finetune_workload(settings, b)) for b in backbones]
    if not args.quiet:
        print(host_line(host), file=sys.stderr)
    rows, started = [], time.perf_counter()
    for label, builder in jobs:
        if args.time_limit_s and time.perf_counter() - started > args.time_limit_s:
            rows.append(dict(label, error=f"skipped: --time-limit-s {args.time_limit_s:g} "
                                          "reached"))
            continue
        row = run_row(builder, settings, label)
        rows.append(row)
        if not args.quiet:
            print(progress_line(row), file=sys.stderr)
    precision = "bf16 autocast" if device.type == "cuda" else "fp32"
    result = {
        "host": host, "host_line": host_line(host),
        "settings": {
            "device": str(device), "precision": precision, "dims": args.dims,
            "preset": args.preset, "protocol": args.protocol, "overrides": args.overrides,
            "warmup": args.warmup, "steps": args.steps, "compile": args.compile,
            "compile_mode": args.compile_mode, "channels_last": args.channels_last,
            "unfused": args.unfused, "loss_sync": args.loss_sync, "size": args.size,
            "peak_tflops": args.peak, "peak_source": peak_source, "data": args.data,
            "flops": "analytic: 2 x MACs of conv/matmul/RNN in one forward pass; "
                     "training = 3 x forward",
        },
        "rows": rows,
        "total_s": time.perf_counter() - started,
    }
    if args.data:
        result["settings"]["data_load_s"] = data_load_s
    return result


def _fmt(value: Any, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def progress_line(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"  {row['row']:<20} ERROR {_one_line(row['error'])}"
    extra = (f", compile {row['compile_s']:.1f} s ({row['compiled_graphs']} graphs, "
             f"{row['graph_breaks']} breaks)" if "compile_s" in row else "")
    data = (f", data {100 * row['data_share']:.1f} % of the step, loader alone "
            f"{row['data_volumes_per_s']:.1f} vol/s") if "data_share" in row else ""
    return (f"  {row['row']:<20} {row['volumes_per_s']:8.2f} vol/s  {row['step_ms']:9.1f} ms/step"
            f"  {row['tflop_per_volume']:.4g} TFLOP/vol  {row['tflops']:.3g} TFLOP/s"
            f"  build {100 * row['batch_construction_share']:.1f} %{data}{extra}"
            f"  ({row['row_s']:.1f} s)")


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    s = result["settings"]
    peak = (f"{s['peak_tflops']:g} TFLOP/s bf16 ({s['peak_source']})" if s["peak_tflops"]
            else s["peak_source"])
    table = Table(
        title=f"training steps on {s['device']} ({s['precision']}"
              f"{', compiled' if s['compile'] else ''}"
              f"{', channels_last' if s['channels_last'] else ''}), preset {s['preset']}, "
              f"{s['warmup']} warm-up + {s['steps']} timed steps per row",
        caption=f"vol/s: input volumes per second (enc in/vol: encoder "
                f"inputs per volume, e.g. rotated copies or patches); TFLOP/vol: analytic, "
                f"forward + backward (= 3 x forward), enc: the encoder's part; peak: {peak}; "
                "build: share of the step in make_batch"
                + ("; data: share of the step waiting for data, loader: the data path alone"
                   if s["data"] else ""),
    )
    columns = ["row", "input", "batch", "enc in/vol", "vol/s", "ms/step", "TFLOP/vol", "enc",
               "TFLOP/s", "% peak", "mem GiB", "build"]
    if s["data"]:
        columns += ["data", "loader vol/s"]
    if s["compile"]:
        columns += ["compile s"]
    for column in columns:
        table.add_column(column, justify="left" if column in ("row", "input") else "right")
    for row in result["rows"]:
        size = "x".join(map(str, row.get("input", []))) or "-"
        if "error" in row:
            table.add_row(row["row"], size, "[red]error[/red]", *[""] * (len(columns) - 3))
            continue
        cells = [row["row"], size, str(row["volumes_per_step"]),
                 _fmt(row["encoder_inputs_per_volume"], "g"), _fmt(row["volumes_per_s"], ".2f"),
                 _fmt(row["step_ms"], ".1f"), _fmt(row["tflop_per_volume"], ".4g"),
                 _fmt(row["encoder_tflop_per_volume"], ".4g"), _fmt(row["tflops"], ".3g"),
                 _fmt(row["pct_peak"], ".1f"), _fmt(row["peak_memory_gib"], ".2f"),
                 _fmt(row["batch_construction_share"], ".1f", 100) + " %"]
        if s["data"]:
            cells += [_fmt(row.get("data_share"), ".1f", 100) + " %",
                      _fmt(row.get("data_volumes_per_s"), ".1f")]
        if s["compile"]:
            cells += [_fmt(row.get("compile_s"), ".1f")]
        table.add_row(*cells)
    console = Console(width=max(Console().width, 190))
    console.print(table)
    for row in result["rows"]:
        if "error" in row:
            console.print(f"[red]{row['row']}[/red]: {_one_line(row['error'])}", highlight=False)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    text = json.dumps(result, indent=1)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    if args.json:
        print(text)
    else:
        print(result["host_line"])
        print_table(result)
    rows = result["rows"]
    return 1 if rows and all("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
