"""Regression tests for bugs found by end-to-end runs of the CLI (each tiny and fast)."""

from __future__ import annotations

import pytest
import torch


def test_medmnist_28_cubed_fits_the_default_unet(registry):
    """28^3 MedMNIST volumes are padded to 32^3 by the model, which the five-level
    instance-norm U-Net accepts; the size check must not refuse them (it compared the
    unpadded size with min_input_size)."""
    from medssl_bench.engine import check_input_size, pad_to_multiple
    from medssl_bench.errors import ConfigError

    cls = registry.get("backbone", "unet3d")
    backbone = cls(cls.Config(width=0.125))
    check_input_size(backbone, (28, 28, 28))
    encoder = backbone.build_encoder(1).eval()
    x, _ = pad_to_multiple(torch.rand(1, 1, 28, 28, 28), backbone.size_multiple())
    with torch.no_grad():
        encoder(x)
    with pytest.raises(ConfigError, match="at least 17 voxels"):
        check_input_size(backbone, (16, 28, 28))


def test_medmnist_npz_with_corrupt_deflate_stream_is_a_data_error(tmp_path):
    """A .npz whose compressed member is damaged raises zlib.error from numpy, which escaped
    as a traceback; it must be the same 'cannot be read' DataError as a truncated file."""
    import io
    import struct
    import zipfile

    import numpy as np

    from medssl_bench.errors import DataError
    from medssl_bench_datasets.medmnist3d import read_npz

    buffer = io.BytesIO()
    np.savez_compressed(buffer, train_images=np.random.default_rng(0).random((4, 8, 8, 8)))
    raw = bytearray(buffer.getvalue())
    with zipfile.ZipFile(io.BytesIO(bytes(raw))) as archive:
        offset = archive.infolist()[0].header_offset
    name_len, extra_len = struct.unpack("<HH", raw[offset + 26:offset + 30])
    start = offset + 30 + name_len + extra_len  # the member's deflate stream
    raw[start:start + 8] = b"\xff" * 8  # a reserved deflate block type: zlib.error
    path = tmp_path / "damaged.npz"
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="cannot be read"):
        read_npz(path)


def test_task_of_the_wrong_dims_is_refused_before_training(registry):
    from medssl_bench.errors import ConfigError
    from medssl_bench.spec import resolve_run

    with pytest.raises(ConfigError, match="'rotation2d' is 2D but the dataset is 3D"):
        resolve_run(registry, "data-efficiency", "rotation3d,rotation2d")


def test_preflight_stops_an_impossible_task_before_any_training(tmp_path, monkeypatch, capsys):
    """A task that cannot build a batch at the dataset's size fails with one message and exit
    code 2 before scratch or anything else trains."""
    import medssl_bench.units as units
    from medssl_bench import cli

    monkeypatch.chdir(tmp_path)
    trained = []
    # the unit runners imported these by name: patch them where they look them up
    monkeypatch.setattr(units, "pretrain", lambda *a, **k: trained.append("pretrain"))
    monkeypatch.setattr(units, "finetune", lambda *a, **k: trained.append("finetune"))
    code = cli.main(["run", "--protocol", "data-efficiency", "--task", "jigsaw3d", "--device", "cpu",
                     "--set", "dataset.size=32", "task.grid=5", "task.jitter=10"])
    err = capsys.readouterr().err
    assert code == 2 and "jitter" in err and "Traceback" not in err
    assert not trained
