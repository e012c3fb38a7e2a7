"""2D: the timm backbone, rotation2d labels, phantom2d, the fundus layouts (tiny fixtures
written here), the slices adapter, the 2D protocol defaults and an end-to-end 2D run."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from datasets_fixtures import fundus_picture, write_aptos
from PIL import Image

from medssl_bench.errors import ConfigError, DataError
from medssl_bench.interfaces import global_pool
from medssl_bench.plugins import build_registry
from medssl_bench.weights import adapt_in_channels
from medssl_bench_backbones.timm2d import Timm2D
from medssl_bench_datasets.fundus import Fundus, load_fundus_image
from medssl_bench_datasets.phantom2d import Phantom2D, generate_case
from medssl_bench_datasets.slices import Slices
from medssl_bench_tasks.rotation import rotate
from medssl_bench_tasks.rotation2d import ROTATIONS_2D, Rotation2D

TINY_DENSENET = {"growth_rate": 8, "block_config": [2, 2, 2, 2]}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy shared CPU two threads
    per process oversubscribe it (a DenseNet-121 forward at 32 px went from 0.1 s to 14 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- timm2d


@pytest.mark.parametrize(
    ("model", "kwargs", "channels"),
    [
        ("resnet18", {}, 1),
        ("densenet121", {}, 3),  # the paper's encoder, at a tiny input
        ("densenet121", TINY_DENSENET, 4),
        ("mobilenetv3_small_050", {}, 3),
    ],
)
def test_timm2d_shapes(model, kwargs, channels):
    backbone = Timm2D(Timm2D.Config(model=model, model_kwargs=kwargs, decoder_channels=[16, 8]))
    encoder = backbone.build_encoder(channels)
    x = torch.rand(2, channels, 32, 32)
    features = encoder(x)
    assert [f.shape[1] for f in features] == encoder.feature_channels
    assert features[-1].shape[-1] == 32 // backbone.size_multiple()
    assert encoder.state_dict()[encoder.stem_weight_key].shape[1] == channels
    assert backbone.build_classifier(encoder, 5)(features).shape == (2, 5)
    assert global_pool(features).shape == (2, encoder.feature_channels[-1])
    for skips in (True, False):
        decoder = backbone.build_decoder(encoder, 3, skip_connections=skips)
        assert decoder(features).shape == (2, 3, 32, 32)


def test_timm2d_channel_adaptation():
    """A 1-channel pretrained encoder loads into a 3-channel one through stem_weight_key."""
    backbone = Timm2D(Timm2D.Config(model_kwargs=TINY_DENSENET))
    one, three = backbone.build_encoder(1), backbone.build_encoder(3)
    state = adapt_in_channels(one.state_dict(), three.stem_weight_key, 3)
    three.load_state_dict(state)
    assert three(torch.rand(2, 3, 32, 32))[-1].isfinite().all()


# --------------------------------------------------------------------------- rotation2d


def test_rotation2d_labels_undo_to_the_input():
    task = Rotation2D(Rotation2D.Config(copies_per_image=4))
    images = torch.rand(3, 2, 16, 16, generator=torch.Generator().manual_seed(0))
    batch = task.make_batch(images, torch.Generator().manual_seed(1))
    copies = task.config.copies_per_image
    assert batch["inputs"].shape == (3 * copies, 2, 16, 16)
    assert set(batch["labels"].tolist()) <= set(range(4))
    for i, label in enumerate(batch["labels"].tolist()):
        undone = rotate(batch["inputs"][i : i + 1], label, inverse=True, table=ROTATIONS_2D)
        torch.testing.assert_close(undone[0], images[batch["sources"][i]])
    assert batch["sources"].bincount().tolist() == [copies] * 3
    rotated = [rotate(images[:1], k, table=ROTATIONS_2D) for k in range(4)]
    assert all(not torch.equal(rotated[a], rotated[b])
               for a in range(4) for b in range(a + 1, 4))
    torch.testing.assert_close(rotated[1], torch.rot90(images[:1], 1, dims=(2, 3)))


def test_rotation2d_refuses_3d_and_non_square():
    from medssl_bench.errors import ConfigError

    task = Rotation2D()
    with pytest.raises(ConfigError, match="2D"):
        task.check_input((16, 16, 16), 1)
    with pytest.raises(ConfigError, match="square"):
        task.check_input((16, 24), 1)


# --------------------------------------------------------------------------- phantom2d


def test_phantom2d_deterministic_and_grades_carry_more_lesions():
    a, mask_a = generate_case(32, 7, 3)
    b, mask_b = generate_case(32, 7, 3)
    assert a.shape == (3, 32, 32) and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, b) and torch.equal(mask_a, mask_b)
    area = [np.mean([generate_case(32, s, g)[1].float().mean().item() for s in range(3)])
            for g in range(5)]
    assert area[0] == 0
    assert all(x < y for x, y in zip(area, area[1:], strict=False)), area


def test_phantom2d_splits():
    cfg = Phantom2D.Config(size=32, n_unlabeled=3, n_train=6, n_val=2, n_test=3)
    data = Phantom2D(cfg).load()
    again = Phantom2D(cfg).load()
    assert data.info.main_metric == "kappa" and data.info.num_classes == 5
    assert data.split_hash == again.split_hash
    image, label = data.train[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert label.dtype == torch.long and 0 <= int(label) < 5
    torch.testing.assert_close(image, again.train[0][0])
    pool = [data.unlabeled[i] for i in range(3)]
    labeled = [data.train[i][0] for i in range(6)] + [data.test[i][0] for i in range(3)]
    assert not any(torch.equal(p, q) for p in pool for q in labeled)
    other = Phantom2D(cfg.model_copy(update={"seed": 1})).load()
    assert other.split_hash != data.split_hash


# --------------------------------------------------------------------------- fundus


def test_fundus_border_crop(tmp_path):
    framed = np.zeros((50, 80, 3), np.uint8)
    framed[10:40, 25:55] = (200, 120, 40)  # a bright square in a black frame
    Image.fromarray(framed).save(tmp_path / "x.png")
    out = load_fundus_image(tmp_path / "x.png", 16, threshold=10)
    assert out.shape == (3, 16, 16) and out.dtype == np.uint8
    assert out[0].min() > 150, "the dark border was not cropped away"
    assert abs(int(out[0].mean()) - 200) <= 2 and abs(int(out[2].mean()) - 40) <= 2


def test_fundus_aptos_layout(tmp_path):
    root = tmp_path / "aptos"
    rows = write_aptos(root, per_grade=4, unlabeled=2)
    cfg = Fundus.Config(root=str(root), image_size=16, cache_dir=str(tmp_path / "cache"))
    data = Fundus(cfg).load()
    assert data.info.extra["layout"] == "aptos" and data.info.main_metric == "kappa"
    n = len(data.train) + len(data.val) + len(data.test)
    assert n == len(rows) and len(data.test) == 4  # 20 % of 20, one per grade
    assert sorted(int(data.test[i][1]) for i in range(len(data.test))) != [0] * 4
    assert set(data.train_ids).isdisjoint({rows[i][0] for i in range(len(rows))} - set(
        data.train_ids)) and len(set(data.train_ids)) == len(data.train)
    image, label = data.train[0]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32 and 0 <= image.min()
    assert dict(rows)[data.train_ids[0]] == int(label)
    assert len(data.unlabeled) == len(data.train) + len(data.val) + 2
    assert list((tmp_path / "cache").glob("*.npy")), "no uint8 cache written"
    assert Fundus(cfg).load().split_hash == data.split_hash  # from the cache, same split
    tests = []
    for fold in range(5):
        part = Fundus(cfg.model_copy(update={"fold": fold})).load()
        tests.append({tuple(part.test[i][0].flatten()[:8].tolist()) for i in range(len(part.test))})
    assert sum(len(t) for t in tests) == len(rows)
    assert len(set().union(*tests)) == len(rows), "cross-validation test folds overlap"


def test_fundus_eyepacs_layout(tmp_path):
    root = tmp_path / "eyepacs"
    (root / "train").mkdir(parents=True)
    rows = [(f"{10 + i}_{'left' if i % 2 else 'right'}", i % 5) for i in range(10)]
    for n, (image, level) in enumerate(rows):
        fundus_picture(n, level).save(root / "train" / f"{image}.jpeg", quality=95)
    with (root / "trainLabels.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows([("image", "level"), *rows])
    data = Fundus(Fundus.Config(root=str(root), image_size=16,
                                cache_dir=str(tmp_path / "cache"))).load()
    assert data.info.extra["layout"] == "eyepacs"
    assert len(data.train) + len(data.val) + len(data.test) == 10
    assert data.train[0][0].shape == (3, 16, 16)


def test_fundus_errors_name_the_file(tmp_path):
    cache = str(tmp_path / "cache")
    with pytest.raises(DataError, match="train.csv"):
        Fundus(Fundus.Config(root=str(tmp_path), cache_dir=cache)).load()
    root = tmp_path / "aptos"
    rows = write_aptos(root, per_grade=2)
    missing = root / "train_images" / f"{rows[3][0]}.png"
    missing.unlink()
    with pytest.raises(DataError, match=rows[3][0]):
        Fundus(Fundus.Config(root=str(root), cache_dir=cache)).load()
    missing.write_bytes(b"not a png")
    with pytest.raises(DataError, match=f"{rows[3][0]}.png.*cannot be read"):
        Fundus(Fundus.Config(root=str(root), cache_dir=cache, image_size=16)).load()
    assert not list((tmp_path / "cache").rglob("*.tmp*")), "a failed cache build left a file"
    (root / "train.csv").write_text("id_code,diagnosis\nabc,7\n")
    with pytest.raises(DataError, match="line 2"):
        Fundus(Fundus.Config(root=str(root), cache_dir=cache)).load()


# --------------------------------------------------------------------------- slices


def test_slices_of_phantom3d():
    source = {"size": 16, "n_unlabeled": 2, "n_train": 3, "n_val": 1, "n_test": 2}
    data = Slices(Slices.Config(source_config=source, axis=2, stride=2)).load()
    assert data.info.image_size == (16, 16) and data.info.kind == "segmentation"
    assert len(data.train) == 3 * 8 and len(data.test) == 2 * 8 and len(data.unlabeled) == 16
    image, target = data.train[5]
    assert image.shape == (1, 16, 16) and target.shape == (16, 16)
    assert len(set(data.train_ids)) == len(data.train)
    train = {data.train[i][0].numpy().tobytes() for i in range(len(data.train))}
    test = {data.test[i][0].numpy().tobytes() for i in range(len(data.test))}
    assert train.isdisjoint(test), "slices of one volume crossed splits"


def test_slices_label_fractions_count_volumes():
    """10 % of the labels on slices means 10 % of the annotated volumes, with all their
    slices (the same annotation effort as the 3D task), unless label_unit is 'slice'."""
    from medssl_bench.engine import label_subset

    source = {"size": 16, "n_unlabeled": 2, "n_train": 10, "n_val": 1, "n_test": 1}
    data = Slices(Slices.Config(source_config=source, axis=0, stride=4)).load()
    assert len(data.train) == 10 * 4 and len(data.train_groups) == len(data.train)
    volume = {i: data.train.case_of(i)[0] for i in range(len(data.train))}
    for fraction, volumes in ((0.1, 1), (0.25, 3), (0.5, 5), (1.0, 10)):
        chosen = label_subset(len(data.train), fraction, 0, data.train_groups)
        assert len({volume[i] for i in chosen}) == volumes
        assert len(chosen) == 4 * volumes  # every slice of a chosen volume
    per_slice = Slices(Slices.Config(source_config=source, axis=0, stride=4,
                                     label_unit="slice")).load()
    assert per_slice.train_groups == []
    assert len(label_subset(len(per_slice.train), 0.1, 0, per_slice.train_groups)) == 4


# --------------------------------------------------------------------------- protocol


def test_2d_runs_get_the_appendix_defaults():
    from medssl_bench.spec import resolve_run

    registry = build_registry(autoload=False)
    two = resolve_run(registry, "data-efficiency", "rotation2d", "timm2d", "phantom2d", None)
    three = resolve_run(registry, "data-efficiency", "rotation3d", None, None, None)
    assert (two.configs["pretrain"].lr, two.configs["finetune"].lr) == (5e-4, 5e-5)
    assert two.configs["finetune"].warmup_epochs == 5
    assert (three.configs["pretrain"].lr, three.configs["finetune"].lr) == (1e-3, 1e-5)
    assert three.configs["finetune"].warmup_epochs == 25


def test_2d_datasets_get_a_2d_backbone_by_default(registry):
    """Without --backbone a 2D dataset gets timm2d (unet3d crashed deep inside PyTorch); a
    backbone of the wrong dims is refused before anything trains, naming one that fits."""
    from medssl_bench.spec import resolve_run

    for dataset in ("phantom2d", "fundus", "slices"):
        run = resolve_run(registry, "data-efficiency", "rotation2d", dataset=dataset)
        assert run.names["backbone"] == "timm2d", dataset
    assert resolve_run(registry, "data-efficiency", "rotation3d").names["backbone"] == "unet3d"
    with pytest.raises(ConfigError, match=r"Backbone 'unet3d' is 3D but dataset 'phantom2d' is "
                       r"2D\. Use a 2D backbone: --backbone timm2d"):
        resolve_run(registry, "data-efficiency", "rotation2d", "unet3d", "phantom2d")
    with pytest.raises(ConfigError, match=r"'timm2d' is 2D .* --backbone unet3d"):
        resolve_run(registry, "data-efficiency", "rotation3d", "timm2d")


def test_validate_refuses_a_backbone_of_other_dims(capsys):
    from medssl_bench.cli import main

    code = main(["validate", "--protocol", "data-efficiency", "--task", "rotation2d",
                 "--dataset", "fundus", "--backbone", "unet3d"])
    err = capsys.readouterr().err
    assert code == 2 and "--backbone timm2d" in err and "Traceback" not in err


def _run(tmp_path, dataset: str, *extra: str, backbone: str | None = "timm2d") -> int:
    from medssl_bench.cli import main

    return main([
        "run", "--protocol", "data-efficiency", "--task", "rotation2d", "--dataset", dataset,
        *(["--backbone", backbone] if backbone else []), "--device", "cpu",
        "--tracking-uri", f"sqlite:///{tmp_path}/m.db",
        "--set", "pretrain.epochs=1", "finetune.epochs=1", "protocol.fractions=[100]",
        "protocol.seeds=[0]", "pretrain.iterations_per_epoch=2",
        "finetune.iterations_per_epoch=2", *extra,
    ])


def test_end_to_end_2d_runs(tmp_path, monkeypatch):
    """rotation2d on phantom2d and on an APTOS-layout folder, through `bench run` (one MLflow
    store for both: creating one costs more than the tiny runs)."""
    import mlflow

    monkeypatch.chdir(tmp_path)
    assert _run(tmp_path, "phantom2d", "dataset.size=32", "dataset.n_unlabeled=4",
                "dataset.n_train=4", "dataset.n_val=2", "dataset.n_test=3",
                backbone=None) == 0  # the 2D default backbone, end to end
    write_aptos(tmp_path / "aptos", per_grade=2)
    assert _run(tmp_path, "fundus", f"dataset.root={tmp_path / 'aptos'}",
                "dataset.image_size=32") == 0
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/m.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    finished = [r for r in runs if "test_kappa" in r.data.metrics]
    assert sorted(r.data.tags["dataset"] for r in finished) == ["fundus"] * 2 + ["phantom2d"] * 2
    assert {r.data.tags["task"] for r in finished} == {"rotation2d", "scratch"}
    assert {r.data.tags["backbone"] for r in finished} == {"timm2d"}


def test_fundus_eyepacs_keeps_both_eyes_of_a_patient_together(tmp_path):
    from medssl_bench_datasets.fundus import patient_of

    assert patient_of("10_left") == patient_of("10_right") == "10"
    assert patient_of("000c1434d8d7") == "000c1434d8d7"
    ids = [f"{p}_{eye}" for p in range(30) for eye in ("left", "right")]
    labels = [p % 5 for p in range(30) for _ in range(2)]
    splits = Fundus(Fundus.Config(root=str(tmp_path))).split_indices(ids, labels)
    patient_split = {}
    for name, indices in splits.items():
        for i in indices:
            assert patient_split.setdefault(patient_of(ids[i]), name) == name
    assert sorted(i for part in splits.values() for i in part) == list(range(60))


def test_validate_checks_the_slices_source_data_path(tmp_path, monkeypatch, capsys):
    from medssl_bench.cli import main

    monkeypatch.chdir(tmp_path)
    argv = ["validate", "--protocol", "data-efficiency", "--task", "rotation2d",
            "--dataset", "slices", "--device", "cpu", "--set", "dataset.source=msd"]
    assert main(argv) == 2
    assert "dataset.source_config.root is not set" in capsys.readouterr().err
    (tmp_path / "Task").mkdir()
    assert main([*argv, f"dataset.source_config.root={tmp_path / 'Task'}"]) == 0
