"""The runtime: where and how a training runs, asked by the training loop.

The loop (:mod:`medssl_bench.loop`) knows nothing of devices, precision or processes; it
asks a :class:`Runtime` to place tensors and modules, for the autocast context of a forward
pass, how many micro-batches make one optimizer step, to wrap the trained module, and to
combine values across processes. Today's runtime is one process on one device:

- placement: ``device`` (CPU or one CUDA GPU), pinned host memory for CUDA, the training
  cases held on the device when they fit (``data_placement``);
- precision: bf16 autocast on CUDA when ``amp`` (as 0.1), fp32 on the CPU;
- ``compile``: ``torch.compile`` of the modules the engine hands to :meth:`compiled`
  (off by default);
- ``grad_accumulation``: micro-batches per optimizer step (default 1);
- ``memory_format``: 3D convolution weights in channels-last order on the CPU (``auto``),
  where oneDNN's channels-last 3D convolutions run the quick U-Net's training step about
  1.3-1.5x faster; activations follow the weights' layout. Contiguous on CUDA, where eager
  channels-last 3D was measured slower (issue 13's H200 table).

Distributed data parallelism (torchrun) is the subclass
:class:`medssl_bench.distributed.DistributedRuntime`, which overrides the documented seams:
:meth:`wrap` (``DistributedDataParallel`` around the module that owns every trained
parameter), :meth:`no_sync` (skip the gradient all-reduce on accumulation micro-batches),
:meth:`loader` (each process reads its share of every global batch), :meth:`rank_seed`
(per-rank batch construction), :meth:`reduce_sum` (epoch means across processes),
:meth:`shard`/:meth:`gather`/:meth:`sync_buffers` (evaluation split between processes),
:meth:`from_main` (rank 0 decides, every process follows), :attr:`is_main` (only rank 0
reports progress and writes checkpoints), :attr:`rank` and :attr:`world_size`.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, TypeVar

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.data import DataLoader, RandomSampler, Sampler, default_collate
from torch.utils.data import Dataset as TorchDataset

from medssl_bench.device import make_generator, worker_init

T = TypeVar("T")


class ShardedBatches(Sampler[list[int]]):
    """This process's part of every global batch of ``sampler``'s draws.

    The draws are cut into global batches of ``batch_size * world`` consecutive indices (the
    batches one process with that batch size would take) and process ``rank`` takes the
    ``rank``-th ``batch_size`` of each; the last, shorter global batch is shared evenly. So N
    processes at batch ``b`` see exactly what one process at batch ``N * b`` sees. A pass
    whose length is not a multiple of ``world`` is completed by repeating its first draws:
    every process must take the same number of steps (a collective waits for all of them).
    """

    def __init__(self, sampler: Sampler[int], batch_size: int, rank: int = 0,
                 world: int = 1) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} of {world} processes")
        self.sampler, self.batch_size, self.rank, self.world = sampler, batch_size, rank, world

    def __len__(self) -> int:
        draws = math.ceil(len(self.sampler) / self.world) * self.world  # type: ignore[arg-type]
        return math.ceil(draws / (self.batch_size * self.world))

    def __iter__(self) -> Iterator[list[int]]:
        order = list(self.sampler)
        pad = -len(order) % self.world
        order += [order[i % len(order)] for i in range(pad)]
        step = self.batch_size * self.world
        for start in range(0, len(order), step):
            chunk = order[start:start + step]
            share = len(chunk) // self.world
            yield chunk[self.rank * share:(self.rank + 1) * share]


class DeviceBatches:
    """Batches drawn by index from cases stacked once on the device (``data``: what
    ``default_collate`` makes of all of them), in ``batch_sampler``'s order: what a DataLoader
    over the same sampler yields, without worker processes, per-step collation or
    host-to-device copies. The epoch's indices go to the device in one asynchronous copy, so
    a step never waits for the host."""

    def __init__(self, data: Any, batch_sampler: Sampler[list[int]]) -> None:
        self.data, self.batch_sampler = data, batch_sampler
        self.device = tree_leaves(data)[0].device

    def __len__(self) -> int:
        return len(self.batch_sampler)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        batches = list(self.batch_sampler)
        flat = torch.tensor([i for batch in batches for i in batch], dtype=torch.long)
        if self.device.type == "cuda":
            flat = flat.pin_memory()
        flat = flat.to(self.device, non_blocking=True)
        start = 0
        for batch in batches:
            index = flat[start:start + len(batch)]
            start += len(batch)
            yield tree_map(lambda t, i=index: t.index_select(0, i), self.data)


class EpochLoader:
    """One loader for a whole training run, reseeded every epoch.

    Building a loader per epoch would re-fork its workers (and drop whatever they cached);
    reseeding the sampler's generator instead keeps workers alive while epoch ``e`` still
    draws the same batches whatever ran before it (which resuming relies on). With ``world``
    processes the draws are those of one process at batch ``world * batch_size``, and this
    process (``rank``) reads its share of each batch (:class:`ShardedBatches`). With
    ``resident`` (the cases stacked on the device) the batches are :class:`DeviceBatches` of
    the same draws instead of a DataLoader's.
    """

    def __init__(self, dataset: TorchDataset, batch_size: int, iterations: int | None,
                 num_workers: int, pin_memory: bool, rank: int = 0, world: int = 1,
                 resident: Any = None) -> None:
        self.generator = torch.Generator()
        count = None if iterations is None else iterations * batch_size * world
        sampler = RandomSampler(dataset, replacement=iterations is not None, num_samples=count,
                                generator=self.generator)
        batches = ShardedBatches(sampler, batch_size, rank, world)
        self.loader: DataLoader | DeviceBatches
        if resident is not None:
            self.loader = DeviceBatches(resident, batches)
        else:
            self.loader = DataLoader(
                dataset, batch_sampler=batches, num_workers=num_workers,
                worker_init_fn=worker_init, pin_memory=pin_memory,
                persistent_workers=num_workers > 0,
            )

    def epoch(self, seed: int) -> DataLoader | DeviceBatches:
        self.generator.manual_seed(seed)
        return self.loader


def stack_on_device(dataset: TorchDataset, device: torch.device, placement: str) -> Any:
    """Every case of ``dataset`` collated into one batch on ``device`` (see
    ``TrainingConfig.data_placement``), or None where the DataLoader serves instead:
    ``loader``; ``auto`` off CUDA or when the cases would take more than a quarter of the
    free GPU memory; cases whose shapes differ (they cannot be stacked; with ``device`` a
    warning says so)."""
    if placement == "loader" or (placement == "auto" and device.type != "cuda"):
        return None
    count = len(dataset)  # type: ignore[arg-type]
    if count == 0:
        return None
    first = dataset[0]
    if placement == "auto":
        need = sum(t.numel() * t.element_size() for t in tree_leaves(default_collate([first]))
                   if isinstance(t, Tensor)) * count
        free, _ = torch.cuda.mem_get_info(device)
        if need > free // 4:
            return None
    try:
        stacked = default_collate([first, *(dataset[i] for i in range(1, count))])
    except RuntimeError as error:  # cases of different shapes
        if placement == "device":
            warnings.warn(f"data_placement=device: the training cases cannot be stacked "
                          f"({error}); the DataLoader serves them", stacklevel=2)
        return None
    return tree_map(lambda t: t.to(device) if isinstance(t, Tensor) else t, stacked)


@dataclass(frozen=True)
class Runtime:
    """One process on one device (see the module docstring for the seams DDP overrides)."""

    device: torch.device
    #: bf16 autocast on CUDA (the config's ``amp``); ignored on the CPU.
    amp: bool = True
    #: ``torch.compile`` the modules passed to :meth:`compiled`.
    compile: bool = False
    #: Micro-batches whose gradients add up to one optimizer step.
    grad_accumulation: int = 1
    #: When a non-finite loss is noticed: ``step`` (read the flag every step: a host
    #: synchronisation, free on the CPU), ``epoch`` (a flag kept on the device, read with the
    #: epoch's logs: no synchronisation per step), ``auto`` (``epoch`` on CUDA, else ``step``).
    nan_check: Literal["auto", "step", "epoch"] = "auto"
    #: Layout of 5-D (3D convolution) weights: ``auto`` (channels-last on the CPU, as they
    #: are on CUDA), ``channels_last`` or ``contiguous``. Results differ only in the last
    #: bits (the convolutions sum in another order).
    memory_format: Literal["auto", "channels_last", "contiguous"] = "auto"
    #: Training cases stacked on the device (``TrainingConfig.data_placement``).
    data_placement: Literal["auto", "device", "loader"] = "auto"

    @classmethod
    def local(cls, device: torch.device | str, cfg: Any = None) -> Runtime:
        """A single-process runtime on ``device``, with ``cfg``'s (a PretrainConfig or
        FinetuneConfig) ``amp``, ``compile`` and ``grad_accumulation`` when given."""
        runtime = cls(torch.device(device))
        return runtime.configured(cfg) if cfg is not None else runtime

    def configured(self, cfg: Any) -> Runtime:
        """This runtime with a training config's precision, compile, accumulation and data
        placement."""
        return replace(self, amp=bool(cfg.amp), compile=bool(cfg.compile),
                       grad_accumulation=int(cfg.grad_accumulation),
                       data_placement=cfg.data_placement)

    # ------------------------------------------------------------------ placement
    @property
    def pin_memory(self) -> bool:
        return self.device.type == "cuda"

    def to_device(self, tensor: Tensor) -> Tensor:
        return tensor.to(self.device, non_blocking=True)

    @property
    def channels_last(self) -> bool:
        """Whether 5-D weights are kept channels-last (see ``memory_format``)."""
        if self.memory_format == "auto":
            return self.device.type == "cpu"
        return self.memory_format == "channels_last"

    def place(self, module: nn.Module) -> nn.Module:
        """Move ``module``'s parameters and buffers to the device (in place), 5-D weights in
        the runtime's memory format (only those: a 2D or mixed model keeps its other
        tensors as they are)."""
        module = module.to(self.device)
        if self.channels_last:
            for param in module.parameters():
                if param.dim() == 5:
                    param.data = param.data.contiguous(memory_format=torch.channels_last_3d)
        return module

    def generator(self, seed: int) -> torch.Generator:
        """A generator on the device seeded by :meth:`rank_seed` (proxy-task batches are drawn
        where they are built)."""
        return make_generator(self.rank_seed(seed), self.device)

    def rank_seed(self, seed: int) -> int:
        """The seed of this process's own batch-construction randomness (augmentations,
        patches): ``seed`` in one process; under DDP derived from ``seed`` and the rank, so
        ranks draw differently and a run repeats for a given number of processes."""
        return seed

    def loader(self, dataset: TorchDataset, batch_size: int, iterations: int | None,
               num_workers: int) -> EpochLoader:
        """The batches of a training (DDP: this process's share of each global batch), from
        cases held on the device where ``data_placement`` says so."""
        return EpochLoader(dataset, batch_size, iterations, num_workers, self.pin_memory,
                           self.rank, self.world_size,
                           stack_on_device(dataset, self.device, self.data_placement))

    @property
    def nan_check_every_step(self) -> bool:
        """Whether the loop reads the loss's finiteness every step (see ``nan_check``)."""
        if self.nan_check == "auto":
            return self.device.type != "cuda"
        return self.nan_check == "step"

    # ------------------------------------------------------------------ precision, compile
    @property
    def precision(self) -> Literal["bf16", "fp32"]:
        return "bf16" if self.amp and self.device.type == "cuda" else "fp32"

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The context of a forward pass: bf16 autocast on CUDA when ``amp``, else nothing
        (bf16 conv3d is slow on the CPU)."""
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def compiled(self, module: nn.Module) -> nn.Module:
        """``module`` compiled in place when ``compile`` (its state dict keeps its keys, so
        checkpoints and transferred weights are unchanged); as it is otherwise."""
        if self.compile:
            module.compile()
        return module

    # ------------------------------------------------------------------ processes (DDP seams)
    @property
    def rank(self) -> int:
        return 0

    @property
    def world_size(self) -> int:
        return 1

    @property
    def is_main(self) -> bool:
        """Whether this process reports progress and writes checkpoints."""
        return self.rank == 0

    def wrap(self, module: nn.Module) -> nn.Module:
        """What the loop calls for a step's forward; ``module`` owns every trained parameter.
        DDP returns ``DistributedDataParallel(module)``; one process returns it unchanged."""
        return module

    @contextlib.contextmanager
    def no_sync(self, module: nn.Module) -> Iterator[None]:
        """Around the backward pass of a micro-batch that does not end an optimizer step
        (DDP: ``module.no_sync()``, no gradient all-reduce yet)."""
        yield

    def reduce_sum(self, values: Sequence[float]) -> list[float]:
        """``values`` summed over processes (DDP: one all-reduce of them as a tensor);
        unchanged in one process. The loop sums its epoch's step logs and step count so."""
        return list(values)

    def from_main(self, fn: Callable[[], T]) -> T:
        """``fn()`` computed by the main process and handed to every process (DDP: a
        broadcast; an exception is raised everywhere). For what all processes must agree
        on: whether a unit is done, a cached encoder, a checkpoint to resume."""
        return fn()

    def gather(self, value: T) -> list[T]:
        """``value`` of every process, in rank order (one process: ``[value]``)."""
        return [value]

    def shard(self, count: int, batch_size: int) -> list[int]:
        """The indices of ``count`` cases this process evaluates, batched by ``batch_size``:
        every case in exactly one process, and every batch one of those that one process
        would evaluate (DDP: every ``world_size``-th whole batch), so normalisation with the
        batch's own statistics (Models Genesis' ``ContBatchNorm3d``) sees the same batches."""
        return list(range(count))

    def sync_buffers(self, module: nn.Module) -> None:
        """Make ``module``'s buffers (normalisation statistics) the main process's before an
        evaluation shared between processes; nothing to do in one process."""
