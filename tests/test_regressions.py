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
