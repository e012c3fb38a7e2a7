"""2D rotation prediction (Gidaris et al.; the 2D version in Taleb et al. 2020): 4 classes,
``rot90`` by 0, 90, 180 and 270 degrees in the image plane.

Shared with rotation3d: the MLP head, the loss (inherited ``compute_loss``) and the same
per-class batched rotation (one ``rot90`` per class present, never per sample), here
parametrised by the rotation table so any table works.
"""

from __future__ import annotations

from pydantic import Field

from medssl_bench.config import PluginConfig
from medssl_bench.errors import ConfigError
from medssl_bench_tasks.rotation import Rotation3D

#: (k, spatial axes) for ``torch.rot90``, as in the 3D table; class k rotates by k * 90 deg
#: (the reference code's ``np.rot90(image, rot)`` for rot in 0..3).
ROTATIONS_2D: tuple[tuple[int, tuple[int, int]], ...] = tuple((k, (0, 1)) for k in range(4))


class Rotation2D(Rotation3D):
    """2D rotation prediction: 4 classes of multiples of 90 degrees in the image plane."""

    name = "rotation2d"
    spatial_dims = 2
    paper_input_size = (224, 224)
    min_input_size = (16, 16)
    rotations = ROTATIONS_2D

    class Config(PluginConfig):
        copies_per_image: int = Field(
            default=4, ge=1, le=16,
            description="Rotated copies of each image per step, each with its own random class "
            "(as rotation3d; the 2D reference code uses 1, Gidaris et al. feed all 4).",
        )
        hidden: int = Field(
            default=1024, ge=1,
            description="Width of the hidden ReLU layer before the classifier (appendix).",
        )

    def check_input(self, image_shape, channels) -> None:
        if len(image_shape) != 2:
            super(Rotation3D, self).check_input(image_shape, channels)
        if len(set(image_shape)) != 1:
            raise ConfigError(
                f"Task 'rotation2d' rotates by 90 degrees and needs square images, but the "
                f"dataset gives {tuple(image_shape)}. Resize the dataset to a square."
            )

    @property
    def copies(self) -> int:
        return self.config.copies_per_image
