"""Engine pieces: label subsets, weights, channel adaptation, NaN handling, transfer."""

from __future__ import annotations

import pytest
import torch

from medssl_bench.engine import (
    FinetuneConfig,
    PretrainConfig,
    build_downstream,
    finetune,
    label_subset,
    pad_to_multiple,
    pretrain,
)
from medssl_bench.errors import DataError, TrainingError
from medssl_bench.weights import adapt_in_channels, load_weights, save_weights


def test_label_subsets_nested_nonempty_deterministic():
    fractions = [0.05, 0.1, 0.25, 0.5, 1.0]
    for seed in range(3):
        subsets = [set(label_subset(30, f, seed)) for f in fractions]
        assert all(len(s) >= 1 for s in subsets)
        assert all(a <= b for a, b in zip(subsets, subsets[1:], strict=False))
        assert subsets[-1] == set(range(30))
        assert [len(s) for s in subsets] == [2, 3, 8, 15, 30]
    assert label_subset(30, 0.25, 0) == label_subset(30, 0.25, 0)
    assert label_subset(30, 0.25, 0) != label_subset(30, 0.25, 1)
    assert label_subset(3, 0.05, 0) and len(label_subset(3, 0.05, 0)) == 1
    with pytest.raises(ValueError):
        label_subset(10, 0, 0)


def test_label_subsets_by_group_take_whole_groups_nested():
    groups = [f"v{i // 3}" for i in range(30)]  # ten groups of three cases
    subsets = [set(label_subset(30, f, 0, groups)) for f in (0.1, 0.25, 0.5, 1.0)]
    assert [len(s) for s in subsets] == [3, 9, 15, 30]
    assert all(a <= b for a, b in zip(subsets, subsets[1:], strict=False))
    for chosen in subsets:
        picked = {groups[i] for i in chosen}
        assert chosen == {i for i, g in enumerate(groups) if g in picked}
    assert label_subset(30, 0.25, 1, groups) != label_subset(30, 0.25, 0, groups)
    with pytest.raises(ValueError):
        label_subset(30, 0.5, 0, groups[:-1])


def test_weights_roundtrip_and_corrupt_file(tmp_path):
    parts = {"encoder": {"a.weight": torch.randn(3, 2)}, "decoder": {"b": torch.arange(4)}}
    path = save_weights(parts, tmp_path / "w.safetensors", {"note": "x"})
    back = load_weights(path)
    torch.testing.assert_close(back["encoder"]["a.weight"], parts["encoder"]["a.weight"])
    torch.testing.assert_close(back["decoder"]["b"], parts["decoder"]["b"])
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(DataError, match="cannot be read"):
        load_weights(path)


def test_adapt_in_channels():
    w = torch.randn(4, 2, 3, 3, 3)
    dup = adapt_in_channels({"k": w}, "k", 4, "duplicate")["k"]
    assert dup.shape == (4, 4, 3, 3, 3)
    torch.testing.assert_close(dup[:, 2], w[:, 0])
    torch.testing.assert_close(dup[:, 3], w[:, 1])
    avg = adapt_in_channels({"k": w}, "k", 3, "average")["k"]
    # identical inputs on every channel give the same response as before
    torch.testing.assert_close(avg.sum(1), w.sum(1))
    assert adapt_in_channels({"k": w}, "k", 2)["k"] is w


def test_pad_to_multiple_roundtrip():
    x = torch.randn(1, 1, 28, 30, 32)
    padded, crop = pad_to_multiple(x, 16)
    assert padded.shape[2:] == (32, 32, 32)
    torch.testing.assert_close(padded[(slice(None), slice(None), *crop)], x)


def _tiny(registry, **dataset):
    ds_cls = registry.get("dataset", "phantom3d")
    cfg = dict(size=16, n_unlabeled=4, n_train=4, n_val=2, n_test=2) | dataset
    data = ds_cls(ds_cls.Config(**cfg)).load()
    bb_cls = registry.get("backbone", "unet3d")
    return data, bb_cls(bb_cls.Config(filters=[4, 8]))


def test_nan_loss_stops_with_clear_message(registry, monkeypatch):
    data, backbone = _tiny(registry)
    task = registry.get("task", "rotation3d")()
    monkeypatch.setattr(type(task), "compute_loss",
                        lambda self, e, h, b: (torch.tensor(float("nan"), requires_grad=True), {}))
    with pytest.raises(TrainingError, match=r"rotation3d.*epoch 1, step 1.*learning rate"):
        pretrain(task, backbone, data.unlabeled, data.info, PretrainConfig(epochs=1),
                 torch.device("cpu"), 0)


def test_batches_are_built_outside_mixed_precision(registry, monkeypatch):
    """make_batch runs in full precision (bf16 would round augmentation matrices); only the
    loss runs under autocast. CPU bf16 autocast stands in for CUDA's here."""
    from medssl_bench.runtime import Runtime

    data, backbone = _tiny(registry)
    task_cls = registry.get("task", "rotation3d")
    task = task_cls(task_cls.Config(hidden=8))
    seen = {}
    make_batch, compute_loss = task_cls.make_batch, task_cls.compute_loss

    def spy_batch(self, images, generator):
        seen["make_batch"] = torch.is_autocast_enabled("cpu")
        return make_batch(self, images, generator)

    def spy_loss(self, encoder, heads, batch):
        seen["compute_loss"] = torch.is_autocast_enabled("cpu")
        return compute_loss(self, encoder, heads, batch)

    monkeypatch.setattr(task_cls, "make_batch", spy_batch)
    monkeypatch.setattr(task_cls, "compute_loss", spy_loss)
    monkeypatch.setattr(Runtime, "autocast",
                        lambda self: torch.autocast("cpu", dtype=torch.bfloat16))
    pretrain(task, backbone, data.unlabeled, data.info,
             PretrainConfig(epochs=1, iterations_per_epoch=1, batch_size=2),
             torch.device("cpu"), 0)
    assert seen == {"make_batch": False, "compute_loss": True}


def test_pretrained_encoder_transfers_with_channel_adaptation(registry):
    data1, backbone = _tiny(registry, channels=1)
    data2, _ = _tiny(registry, channels=2)
    task = registry.get("task", "rotation3d")(registry.get("task", "rotation3d").Config(hidden=8))
    result = pretrain(task, backbone, data1.unlabeled, data1.info,
                      PretrainConfig(epochs=1, batch_size=2), torch.device("cpu"), 0)
    assert set(result.weights) == {"encoder"}
    model = build_downstream(backbone, data2.info, result.weights, FinetuneConfig())
    stem = model.encoder.state_dict()[model.encoder.stem_weight_key]
    pre = result.weights["encoder"][model.encoder.stem_weight_key]
    assert stem.shape[1] == 2
    torch.testing.assert_close(stem[:, 0], pre[:, 0])
    torch.testing.assert_close(stem[:, 1], pre[:, 0])
    key = "blocks.1.body.0.weight"
    torch.testing.assert_close(model.encoder.state_dict()[key], result.weights["encoder"][key])


def test_warmup_freezes_encoder_then_trains(registry):
    data, backbone = _tiny(registry)
    encoder = backbone.build_encoder(1)
    pretrained = {"encoder": {k: v.clone() for k, v in encoder.state_dict().items()}}
    common = dict(epochs=2, lr=1e-2, iterations_per_epoch=2, select="last")
    frozen = finetune(backbone, data.info, data.train, data.val, data.test, pretrained,
                      FinetuneConfig(freeze="frozen", **common), torch.device("cpu"), 0)
    thawed = finetune(backbone, data.info, data.train, data.val, data.test, pretrained,
                      FinetuneConfig(freeze="warmup", warmup_epochs=1, **common),
                      torch.device("cpu"), 0)
    key = "encoder.blocks.0.body.0.weight"
    torch.testing.assert_close(frozen.weights[key], pretrained["encoder"]["blocks.0.body.0.weight"])
    assert not torch.equal(thawed.weights[key], pretrained["encoder"]["blocks.0.body.0.weight"])
    assert "dice_mean" in frozen.test_metrics and len(frozen.val_history) == 2


def test_finetune_learns_segmentation(registry):
    """A few dozen steps on the phantom beat the untrained model clearly."""
    data, backbone = _tiny(registry, size=32, n_train=6)
    bb = type(backbone)(type(backbone).Config(filters=[8, 16, 32]))
    result = finetune(bb, data.info, data.train, data.train, data.train, None,
                      FinetuneConfig(epochs=6, lr=3e-3, iterations_per_epoch=6, loss="dice_ce"),
                      torch.device("cpu"), 0)
    assert result.test_metrics["dice_organ"] > 0.3, result.test_metrics


def test_too_small_images_get_a_clear_message(registry):
    from medssl_bench.errors import ConfigError

    data, _ = _tiny(registry, size=16)
    bb_cls = registry.get("backbone", "unet3d")
    deep = bb_cls(bb_cls.Config(width=0.25))  # five levels: needs 32 voxels per axis
    with pytest.raises(ConfigError, match=r"too small.*backbone.filters"):
        finetune(deep, data.info, data.train, data.val, data.test, None, FinetuneConfig(epochs=1),
                 torch.device("cpu"), 0)


def test_selection_uses_the_protocol_metric_and_survives_nan(registry, monkeypatch):
    """The tested epoch is chosen by the metric the protocol ranks by; an undefined (NaN)
    validation score never wins over a defined one, and all-NaN falls back to the last epoch."""
    import medssl_bench.engine as engine

    data, backbone = _tiny(registry)
    scores = iter([{"dice_mean": 0.9, "acc": float("nan")}, {"dice_mean": 0.1, "acc": 0.5},
                   {"dice_mean": 0.2, "acc": float("nan")}] * 3)
    real = engine.evaluate
    monkeypatch.setattr(engine, "evaluate", lambda model, ds, *a, **k:
                        next(scores) if ds is data.val else real(model, ds, *a, **k))
    common = dict(epochs=3, iterations_per_epoch=1)
    cpu = torch.device("cpu")
    by_dice = finetune(backbone, data.info, data.train, data.val, data.test, None,
                       FinetuneConfig(**common), cpu, 0)
    by_acc = finetune(backbone, data.info, data.train, data.val, data.test, None,
                      FinetuneConfig(**common), cpu, 0, select_metric="acc")
    assert by_dice.best_epoch == 0 and by_acc.best_epoch == 1
    monkeypatch.setattr(engine, "evaluate", lambda model, ds, *a, **k:
                        {"dice_mean": float("nan")} if ds is data.val else real(model, ds, *a, **k))
    all_nan = finetune(backbone, data.info, data.train, data.val, data.test, None,
                       FinetuneConfig(**common), cpu, 0)
    assert all_nan.best_epoch == 2


def test_selection_takes_the_lowest_value_of_a_lower_is_better_metric(registry, monkeypatch):
    """A dataset that declares a metric lower-is-better (a distance) gets the epoch with the
    lowest validation value tested."""
    import dataclasses

    import medssl_bench.engine as engine

    data, backbone = _tiny(registry)
    info = dataclasses.replace(data.info, metrics=(*data.info.metrics, "hd95"),
                               lower_is_better=("hd95",))
    scores = iter([{"dice_mean": 0.1, "hd95": 9.0}, {"dice_mean": 0.2, "hd95": 2.0},
                   {"dice_mean": 0.9, "hd95": 5.0}])
    real = engine.evaluate
    monkeypatch.setattr(engine, "evaluate", lambda model, ds, *a, **k:
                        next(scores) if ds is data.val else real(model, ds, *a, **k))
    result = finetune(backbone, info, data.train, data.val, data.test, None,
                      FinetuneConfig(epochs=3, iterations_per_epoch=1), torch.device("cpu"), 0,
                      select_metric="hd95")
    assert result.best_epoch == 1


def test_pretraining_refuses_too_small_images_before_training(registry):
    from medssl_bench.errors import ConfigError

    data, _ = _tiny(registry, size=16)
    bb_cls = registry.get("backbone", "unet3d")
    with pytest.raises(ConfigError, match="too small"):
        pretrain(registry.get("task", "rotation3d")(), bb_cls(bb_cls.Config(width=0.25)),
                 data.unlabeled, data.info, PretrainConfig(epochs=1), torch.device("cpu"), 0)


def test_worker_processes_change_nothing(registry):
    """Data-loader workers are a speed setting: same seed, same weights with or without."""
    data, backbone = _tiny(registry)
    results = [finetune(backbone, data.info, data.train, data.val, data.test, None,
                        FinetuneConfig(epochs=2, iterations_per_epoch=2, num_workers=workers,
                                       select="last"), torch.device("cpu"), 0)
               for workers in (0, 2)]
    for key, value in results[0].weights.items():
        torch.testing.assert_close(results[1].weights[key], value)
