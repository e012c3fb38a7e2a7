"""The from-scratch baseline."""

from __future__ import annotations

from medssl_bench.config import PluginConfig
from medssl_bench.interfaces import ProxyTask


class Scratch(ProxyTask):
    """No pretraining: the encoder starts from random weights (the baseline every protocol runs)."""

    name = "scratch"
    spatial_dims = 3  # nominal: check_input accepts any dims, so 2D protocols use it too
    pretrains = False
    baseline = True

    class Config(PluginConfig):
        pass

    def check_input(self, image_shape, channels) -> None:
        """Scratch works with any number of spatial dimensions."""
