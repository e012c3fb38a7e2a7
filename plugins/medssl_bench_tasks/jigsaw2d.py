"""2D jigsaw puzzles (Noroozi & Favaro 2016; the 2D version in Taleb et al. 2020).

The 3D task with two spatial dims: 3x3 jittered pieces shuffled by one of P permutations
chosen by maximal Hamming distance. With 9 pieces there are only 9! = 362,880 permutations,
so the greedy selection searches all of them by default (``candidates`` >= 9! makes the pool
exhaustive); with P=100 that gives a minimum pairwise distance of 6 where a random set has
about 4 (the reference's 2D file ``permutations_100_max.bin`` has a minimum of 2).
"""

from __future__ import annotations

import math

from pydantic import Field

from medssl_bench_tasks.jigsaw import Jigsaw3D


class Jigsaw2D(Jigsaw3D):
    """2D jigsaw puzzles: which of P maximally different permutations shuffled 3x3 pieces."""

    name = "jigsaw2d"
    spatial_dims = 2
    paper_input_size = (224, 224)
    #: 64 px: cells of 21, pieces of 13 with jitter 8, padded up to the backbone's minimum.
    min_input_size = (64, 64)
    #: 9 pieces are cheap in 2D, so the quick preset keeps the paper's 3x3 puzzle (jigsaw3d's
    #: 2x2x2 quick puzzle would give 2x2 = 4 pieces, fewer permutations than P).
    presets = {"quick": {}, "paper": {"grid": 3, "num_permutations": 100}}

    class Config(Jigsaw3D.Config):
        jitter: int = Field(
            default=8, ge=0,
            description="Random gap per axis between neighbouring pieces: each piece is "
            "(cell - jitter) pixels at an offset 0..jitter inside its cell (reference 2D "
            "jigsaw: 8; at 224 px cells are 74 and pieces 66 pixels).",
        )
        candidates: int = Field(
            default=math.factorial(9), ge=2,
            description="Size of the candidate pool for 'hamming' selection; at least "
            "(grid^2)! means every permutation (9! = 362,880 for 3x3, searched exhaustively "
            "in about 2 s and cached).",
        )
