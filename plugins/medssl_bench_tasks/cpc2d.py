"""2D Contrastive Predictive Coding (the 2D version in Taleb et al. 2020; Hénaff et al.).

The 3D task with two spatial dims: a 5x5 grid of patches overlapping by half a patch (the
reference's 2D CPC: at 224 px, patches of 74 at stride 37), each encoded once to a 64-d
latent; the context of a centre patch is the 3 patches of the row above and the patch
itself (the 2D inverted pyramid), read by the GRU, and the latents two and three rows below
are predicted (the reference's 2D code skips the next row, which shares half the centre
patch). Grid geometry, index tensors, InfoNCE and the optional augmentation are cpc3d's
N-D code. Unlike the reference's 2D code, which feeds zero patches for context positions
outside the grid, borders are mirrored as in 3D.
"""

from __future__ import annotations

from pydantic import Field

from medssl_bench_tasks.cpc import CPC3D


class CPC2D(CPC3D):
    """2D Contrastive Predictive Coding over the row above each patch of an overlapping grid."""

    name = "cpc2d"
    spatial_dims = 2
    paper_input_size = (224, 224)
    #: 96 px: 5 half-overlapping patches of 32 px, the deepest reduction of timm models.
    min_input_size = (96, 96)
    presets = {}  # the 2D default grid (5x5, half overlap) is already cheap at 64 px

    class Config(CPC3D.Config):
        patches_per_side: int = Field(
            default=5, ge=3, description="Patches per axis (reference 2D CPC: 5, with "
            "half-patch overlap; 74 px patches at 224 px).")
        target_gap: int = Field(
            default=1, ge=0, description="Rows skipped between the centre and the first "
            "predicted row (reference 2D code: 1, as the next row overlaps the centre patch "
            "by half; 0 predicts the adjacent row as in Fig. 1a).")
