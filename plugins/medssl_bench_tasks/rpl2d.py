"""2D relative patch location (Doersch et al.; the 2D version in Taleb et al. 2020).

The 3D task with two spatial dims: a 3x3 grid of jittered patches, the centre patch and a
query, 8-way classification of the query's position. Everything else (the N-D patch grid and
gather in ``patches.py``, the shared patch embedder, the head and the loss) is rpl3d's; only
the 2D defaults differ.
"""

from __future__ import annotations

from pydantic import Field

from medssl_bench_tasks.rpl import RelativePatchLocation3D


class RelativePatchLocation2D(RelativePatchLocation3D):
    """2D relative patch location: 8-way position of a query patch relative to the centre."""

    name = "rpl2d"
    spatial_dims = 2
    paper_input_size = (224, 224)
    #: 64 px: cells of 21, patches of 13 with jitter 8, padded up to the backbone's minimum.
    min_input_size = (64, 64)

    class Config(RelativePatchLocation3D.Config):
        grid: int = Field(
            default=3, ge=3, le=7,
            description="Cells per side of the patch grid; odd so there is a centre cell "
            "(Doersch et al. and Taleb et al.'s 2D RPL: 3x3, giving 8 classes).",
        )
        jitter: int = Field(
            default=8, ge=0,
            description="Random gap per axis between neighbouring patches: each patch is "
            "(cell - jitter) pixels at an offset 0..jitter inside its cell. 8 follows the "
            "reference code's 2D patch tasks (jigsaw, jitter 8); at 224 px cells are 74 and "
            "patches 66 pixels.",
        )
        queries_per_volume: int = Field(
            default=1, ge=1, le=8,
            description="Query patches per image per step, each with its own random position "
            "(the paper and reference code use one query per centre patch).",
        )
