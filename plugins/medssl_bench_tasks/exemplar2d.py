"""2D Exemplar networks with a triplet loss (the 2D version in Taleb et al. 2020).

The 3D task with two spatial dims: the batched augmentation in ``augment.py`` is written for
any number of dims (in 2D: flips of both axes, one rotation plane, brightness/contrast and a
zoom), and the triplet loss, negatives and memory bank are exemplar3d's. The defaults are the
paper's (the same probabilities as in 3D). The reference code's 2D augmentation differs:
an always-applied random quarter turn, both flips and an always-applied brightness/contrast
change; ``rotate_p=1, quarter_p=1, color_p=1, zoom_p=0`` comes close to it.
"""

from __future__ import annotations

from medssl_bench_tasks.exemplar import Exemplar3D


class Exemplar2D(Exemplar3D):
    """2D Exemplar: triplet loss pulling augmented copies together and other images apart."""

    name = "exemplar2d"
    spatial_dims = 2
    paper_input_size = (224, 224)
    min_input_size = (64, 64)
