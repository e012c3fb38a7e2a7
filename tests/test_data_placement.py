"""Training cases held on the device (``data_placement=device``): the batches, and so the training,
are exactly the DataLoader's."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset as TorchDataset

from medssl_bench.engine import FinetuneConfig, PretrainConfig, finetune, pretrain
from medssl_bench.identity import semantic
from medssl_bench.runtime import EpochLoader, Runtime, stack_on_device

CPU = torch.device("cpu")


class Cases(TorchDataset):
    """Labelled cases whose every value tells its index (so a wrong draw shows)."""

    def __init__(self, count: int, shapes: list[tuple[int, ...]] | None = None) -> None:
        self.count, self.shapes = count, shapes

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int):
        shape = self.shapes[index] if self.shapes else (1, 3, 3)
        noise = torch.rand(shape, generator=torch.Generator().manual_seed(index))
        return torch.full(shape, float(index)) + noise, index % 3


@pytest.mark.parametrize(("iterations", "batch", "rank", "world"),
                         [(None, 2, 0, 1), (None, 3, 0, 1), (4, 2, 0, 1), (None, 2, 1, 2),
                          (3, 3, 0, 2)])
def test_device_batches_are_the_dataloaders_batches(iterations, batch, rank, world):
    torch.manual_seed(0)
    cases = Cases(7)
    resident = stack_on_device(cases, CPU, "device")
    loaders = [EpochLoader(cases, batch, iterations, 0, False, rank, world),
               EpochLoader(cases, batch, iterations, 0, False, rank, world, resident)]
    for seed in (0, 1, 0):
        plain, held = ([list(loader.epoch(seed)) for loader in loaders])
        assert len(plain) == len(held) == len(loaders[1].epoch(seed)) > 0
        for (images, labels), (h_images, h_labels) in zip(plain, held, strict=True):
            assert torch.equal(images, h_images) and torch.equal(labels, h_labels)
            assert h_labels.dtype == labels.dtype


def test_where_cases_are_held():
    cases = Cases(4)
    assert stack_on_device(cases, CPU, "loader") is None
    assert stack_on_device(cases, CPU, "auto") is None  # auto: CUDA only
    images, labels = stack_on_device(cases, CPU, "device")
    assert images.shape == (4, 1, 3, 3) and labels.tolist() == [0, 1, 2, 0]
    uneven = Cases(2, shapes=[(1, 3, 3), (1, 4, 4)])
    with pytest.warns(UserWarning, match="cannot be stacked"):
        assert stack_on_device(uneven, CPU, "device") is None
    assert Runtime.local(CPU, PretrainConfig(data_placement="device")).data_placement == "device"
    # result-neutral: not part of a run key
    assert semantic(PretrainConfig(data_placement="device")) == semantic(PretrainConfig())
    assert semantic(FinetuneConfig(data_placement="loader")) == semantic(FinetuneConfig())


def test_pretraining_and_fine_tuning_train_the_same_from_the_device(registry):
    ds = registry.get("dataset", "phantom3d")
    data = ds(ds.Config(size=16, n_unlabeled=5, n_train=5, n_val=2, n_test=2)).load()
    bb = registry.get("backbone", "unet3d")
    backbone = bb(bb.Config(filters=[4, 8]))
    task_cls = registry.get("task", "rotation3d")
    results = {}
    for where in ("loader", "device"):
        pre = pretrain(task_cls(task_cls.Config(hidden=8)), backbone, data.unlabeled, data.info,
                       PretrainConfig(epochs=2, batch_size=2, data_placement=where), CPU, 0)
        tuned = finetune(backbone, data.info, data.train, data.val, data.test, pre.weights,
                         FinetuneConfig(epochs=2, warmup_epochs=1, batch_size=2,
                                        data_placement=where), CPU, 0)
        results[where] = (pre, tuned)
    (pre_off, tuned_off), (pre_on, tuned_on) = results["loader"], results["device"]
    assert pre_on.history == pre_off.history
    for part in pre_off.weights:
        for key, value in pre_off.weights[part].items():
            assert torch.equal(pre_on.weights[part][key], value), (part, key)
    assert tuned_on.test_metrics == tuned_off.test_metrics
    assert tuned_on.val_history == tuned_off.val_history
