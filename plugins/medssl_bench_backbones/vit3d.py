"""3D Vision Transformer (Primus-style) with a UNETR-style feature pyramid and a light
segmentation decoder.

Encoder: a strided ``Conv3d`` patch embedding (``patch_embed``, 16^3 patches by default, 8^3
as Primus uses), 3D position embeddings (learned by default, fixed sin-cos as an option) added
to the tokens, pre-norm transformer blocks (timm's ``Block``: LayerNorm, attention, LayerNorm,
MLP) and a final LayerNorm. Sizes follow ViT (Dosovitskiy et al. 2021, Table 1): S 384/12/6,
B 768/12/12, L 1024/24/16 (embed dim / depth / heads), MLP ratio 4. Primus (Wald et al.
2025, MIC-DKFZ/dynamic-network-architectures ``architectures/primus.py``) uses EVA blocks
(SwiGLU MLP of ratio 8/3, rotary and learned absolute position embeddings) at S 396/12/6,
B 792/12/12, M 864/16/12, L 1056/24/16 with 8^3 patches; the ``embed_dim``/``depth``/
``heads`` fields give those sizes too.

Position embeddings are made for the token grid of ``img_size`` (Primus: the 160^3 crops of
OpenMind). A learned embedding is resampled trilinearly when an input's grid differs (as
timm/DINOv2 resample 2D ones); the sin-cos embedding is computed at the input's grid.

For MAE the encoder encodes a SUBSET of tokens: :meth:`ViT3DEncoder.tokens` (patch
embedding + position, ``(B, N, D)``, tokens in row-major grid order) and
:meth:`ViT3DEncoder.encode_tokens` (the tokens at ``keep_index`` through the blocks and the
final norm). ``encoder(x, keep_index=...)`` does both through ``forward`` (what a compiled or
DDP wrapper sees) and returns ``[visible tokens (B, K, D)]``.

Multi-scale features (the choice, documented): ``forward(x)`` returns UNETR's pyramid
(Hatamizadeh et al. 2022: the outputs of blocks 3, 6, 9 and 12 of 12, i.e. evenly spaced
blocks). The deepest level is the final-norm tokens reshaped to the token grid (stride =
patch, ``embed_dim`` channels, no parameters beyond the ViT, so probes and pooling read the
pretrained tokens). Each shallower level takes an earlier block's tokens on the grid and
upsamples them by learned 2x transposed convolutions (UNETR's ``PrUp`` blocks, without its
extra residual convolutions): ``levels - 1`` levels at strides patch/2, patch/4, patch/8
with ``feature_size`` x 8, 4, 2 channels (UNETR: feature_size 16 -> 128, 64, 32). Those
upsamplers belong to the encoder (``pyramid``) so any decoder sees a CNN-like pyramid; a
pretraining task that reads only the deepest level (or MAE, which encodes token subsets)
leaves them at their initialisation, as UNETR's decoder is at fine-tuning.

Decoder: a U-Net path over that pyramid (transposed conv x2, concatenation with the level's
features unless ``skip_connections=False``, a residual conv block), then a transposed conv to
the input's resolution when the finest level is coarser, and the 1x1x1 ``out`` layer.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn
from torch.nn import functional as F

from medssl_bench.config import PluginConfig
from medssl_bench.interfaces import Backbone, Encoder
from medssl_bench_backbones.unet3d import PooledClassifier, UNet3DDecoder

#: ViT sizes (Dosovitskiy et al. 2021, Table 1): embed dim, depth, heads.
SIZES: dict[str, tuple[int, int, int]] = {
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
}


def sincos_3d(dim: int, grid: tuple[int, int, int]) -> Tensor:
    """Fixed 3D sin-cos position embeddings ``(1, dim, *grid)``: per axis (z, y, x) a 1D
    sin-cos embedding of ``2 * (dim // 6)`` channels (MAE's 2D recipe extended to three axes,
    frequencies ``1 / 10000^(i / f)``); channels left over when 6 does not divide ``dim``
    are zero."""
    f = dim // 6
    parts = []
    omega = 1.0 / 10000 ** (torch.arange(f, dtype=torch.float64) / max(f, 1))
    coords = torch.meshgrid(*(torch.arange(g, dtype=torch.float64) for g in grid), indexing="ij")
    for c in coords:
        angle = c[None] * omega.view(-1, 1, 1, 1)
        parts += [angle.sin(), angle.cos()]
    emb = torch.cat(parts, 0) if f else torch.zeros(0, *grid, dtype=torch.float64)
    if emb.shape[0] < dim:
        emb = torch.cat([emb, emb.new_zeros(dim - emb.shape[0], *grid)], 0)
    return emb[None].float()


class PositionEmbedding3D(nn.Module):
    """3D position embeddings on a token grid, ``(1, dim, *grid)`` at the grid asked for.

    ``learned``: a parameter made for ``grid`` (trunc-normal, std 0.02, as ViT/MAE), resampled
    trilinearly (``align_corners=False``) to any other grid. ``sincos``: fixed, computed at
    the grid asked for."""

    def __init__(self, dim: int, grid: tuple[int, int, int], kind: str) -> None:
        super().__init__()
        self.dim, self.grid, self.kind = dim, tuple(grid), kind
        if kind == "learned":
            self.weight = nn.Parameter(torch.zeros(1, dim, *grid))
            nn.init.trunc_normal_(self.weight, std=0.02)
        else:
            self.register_buffer("weight", sincos_3d(dim, self.grid), persistent=False)

    def forward(self, grid: tuple[int, ...]) -> Tensor:
        grid = tuple(int(g) for g in grid)
        if grid == self.grid:
            return self.weight
        if self.kind == "learned":
            return F.interpolate(self.weight, size=grid, mode="trilinear", align_corners=False)
        return sincos_3d(self.dim, grid).to(self.weight.device, self.weight.dtype)


def _upsampler(cin: int, cout: int, steps: int) -> nn.Sequential:
    """``steps`` 2x transposed convolutions (``cin`` -> ``cout``), instance norm and GELU
    between them (UNETR's transposed-conv upsampling of a block's tokens)."""
    layers: list[nn.Module] = []
    for i in range(steps):
        if i:
            layers += [nn.InstanceNorm3d(cout, affine=True), nn.GELU()]
        layers.append(nn.ConvTranspose3d(cin if i == 0 else cout, cout, 2, stride=2))
    return nn.Sequential(*layers)


class ViT3DEncoder(Encoder):
    spatial_dims = 3

    def __init__(self, in_channels: int, cfg: ViT3D.Config) -> None:
        # imported here, not with the module: the registry imports every plugin in every
        # `bench` process and parallel worker, and timm takes seconds to import
        from timm.models.vision_transformer import Block

        super().__init__()
        dim, depth, heads = cfg.dims()
        p = cfg.patch_size
        self.in_channels = in_channels
        self.patch_size = p
        self.stem_weight_key = "patch_embed.weight"
        self.patch_embed = nn.Conv3d(in_channels, dim, p, stride=p)
        grid = (cfg.img_size // p,) * 3
        self.pos_embed = PositionEmbedding3D(dim, grid, cfg.pos_embed)
        rates = torch.linspace(0, cfg.drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(
            Block(dim, heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=True, drop_path=rates[i],
                  norm_layer=nn.LayerNorm)
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        levels = min(cfg.levels, int(math.log2(p)) + 1)
        # blocks whose outputs feed the levels, shallowest first (UNETR: 3, 6, 9, 12 of 12)
        self.feature_blocks = [max(1, round(depth * (i + 1) / levels)) for i in range(levels)]
        ups = list(range(levels - 1, 0, -1))  # 2x steps of each shallower level
        chans = [cfg.feature_size * 2 ** (levels - s) for s in ups]  # fs*2 .. fs*8 at p/2
        self.pyramid = nn.ModuleList(_upsampler(dim, c, s) for c, s in zip(chans, ups, strict=True))
        self.feature_channels = [*chans, dim]
        self.feature_strides = [p // 2**s for s in ups] + [p]
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        # ViT/MAE: xavier-uniform linear layers, zero biases, unit LayerNorm; the patch
        # embedding as a linear layer (MAE initialises its flattened weight the same way)
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv3d) and m.kernel_size == m.stride:
            nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
            nn.init.zeros_(m.bias)

    def grid(self, spatial: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(s // self.patch_size for s in spatial)

    def tokens(self, x: Tensor, masked: Tensor | None = None,
               mask_token: Tensor | None = None) -> Tensor:
        """Patch embedding plus position: ``(B, N, D)``, N tokens in row-major grid order.
        ``masked`` (``(B, 1, *grid)`` bool) and ``mask_token`` (``(D,)``): the embeddings of
        masked patches are replaced by the token before the position is added (SimMIM)."""
        t = self.patch_embed(x)
        if masked is not None and mask_token is not None:
            t = torch.where(masked, mask_token.to(t.dtype).view(1, -1, 1, 1, 1), t)
        t = t + self.pos_embed(tuple(t.shape[2:])).to(t.dtype)
        return t.flatten(2).transpose(1, 2)

    def on_grid(self, tokens: Tensor, spatial: tuple[int, ...]) -> Tensor:
        """``(B, N, D)`` tokens of an input of size ``spatial`` as a ``(B, D, *grid)`` map."""
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2],
                                              *self.grid(spatial))

    def encode_tokens(self, tokens: Tensor, keep_index: Tensor | None = None) -> Tensor:
        """The tokens at ``keep_index`` (``(B, K)`` long; all when None) through every block
        and the final norm: ``(B, K, D)``. Other tokens are never seen."""
        if keep_index is not None:
            tokens = tokens.gather(1, keep_index[..., None].expand(-1, -1, tokens.shape[-1]))
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)

    def forward(self, x: Tensor, keep_index: Tensor | None = None) -> list[Tensor]:
        if keep_index is not None:
            return [self.encode_tokens(self.tokens(x), keep_index)]
        grid = self.grid(tuple(x.shape[2:]))
        t = self.tokens(x)
        taken = {}
        wanted = set(self.feature_blocks[:-1])
        for i, block in enumerate(self.blocks, start=1):
            t = block(t)
            if i in wanted:
                taken[i] = t
        b, _, d = t.shape

        def on_grid(z: Tensor) -> Tensor:
            return z.transpose(1, 2).reshape(b, d, *grid)

        features = [up(on_grid(taken[i]))
                    for up, i in zip(self.pyramid, self.feature_blocks[:-1], strict=True)]
        return [*features, on_grid(self.norm(t))]


class ViT3D(Backbone):
    """3D ViT (Primus-style patch embedding, ViT S/B/L) with a UNETR-style pyramid decoder."""

    name = "vit3d"
    spatial_dims = 3
    # tokens / encode_tokens / forward(x, keep_index=...): MAE; attention blocks
    provides = ("tokens", "attention")

    class Config(PluginConfig):
        size: Literal["S", "B", "L"] = Field(
            default="B",
            description="ViT size (Dosovitskiy et al. 2021, Table 1): S 384/12/6, B 768/12/12, "
            "L 1024/24/16 (embed dim / depth / heads). embed_dim, depth and heads override it "
            "(Primus' sizes: S 396/12/6, B 792/12/12, M 864/16/12, L 1056/24/16).")
        embed_dim: int | None = Field(
            default=None, ge=8, description="Token width; None: the size's.")
        depth: int | None = Field(
            default=None, ge=1, description="Transformer blocks; None: the size's.")
        heads: int | None = Field(
            default=None, ge=1, description="Attention heads (must divide the token width); "
            "None: the size's.")
        patch_size: Literal[4, 8, 16] = Field(
            default=16,
            description="Side of the cubic patches (ViT/MAE: 16; Primus and nnssl's 3D MAE: 8; "
            "4 for tiny CPU runs). Inputs must be multiples of it.")
        img_size: int = Field(
            default=160, ge=4,
            description="Side of the cubic input the position embeddings are made for "
            "(Primus/OpenMind: 160^3 crops); other inputs resample them.")
        pos_embed: Literal["learned", "sincos"] = Field(
            default="learned",
            description="Position embeddings: learned (ViT, Primus' absolute embedding; "
            "resampled trilinearly for other grids) or fixed 3D sin-cos (MAE's encoder uses "
            "fixed 2D sin-cos; computed at each input's grid).")
        mlp_ratio: float = Field(
            default=4.0, gt=0,
            description="MLP hidden width over token width (ViT: 4; Primus' SwiGLU: 8/3).")
        drop_path_rate: float = Field(
            default=0.0, ge=0, lt=1,
            description="Stochastic depth, rising linearly over the blocks to this rate "
            "(Primus: 0).")
        levels: int = Field(
            default=4, ge=1, le=5,
            description="Levels of the feature pyramid (UNETR: 4, from blocks 3/6/9/12 of 12); "
            "at most log2(patch_size) + 1.")
        feature_size: int = Field(
            default=16, ge=1,
            description="UNETR's feature_size: the pyramid levels at strides patch/2, /4, /8 "
            "get 8, 4, 2 times this many channels (UNETR: 16).")
        head_dropout: float = Field(
            default=0.0, ge=0, lt=1, description="Dropout before the classification layer.")

        @model_validator(mode="after")
        def _heads_divide(self):
            dim, _, heads = self.dims()
            if dim % heads:
                raise ValueError(f"heads={heads} does not divide embed_dim={dim}")
            return self

        def dims(self) -> tuple[int, int, int]:
            dim, depth, heads = SIZES[self.size]
            return (self.embed_dim or dim, self.depth or depth, self.heads or heads)

    presets = {
        "quick": {"embed_dim": 32, "depth": 2, "heads": 2, "patch_size": 8, "img_size": 32,
                  "feature_size": 2},
        "paper": {"size": "B", "patch_size": 16, "img_size": 160},
    }

    def build_encoder(self, in_channels: int) -> ViT3DEncoder:
        return ViT3DEncoder(in_channels, self.config)

    def build_decoder(self, encoder: Encoder, out_channels: int,
                      skip_connections: bool = True) -> UNet3DDecoder:
        # the U-Net path over the pyramid, then up from the patch grid to the input's size
        return UNet3DDecoder(list(encoder.feature_channels), out_channels, "instance",
                             skip_connections, final_stride=encoder.feature_strides[0])

    def build_classifier(self, encoder: Encoder, num_classes: int) -> PooledClassifier:
        return PooledClassifier(encoder.feature_channels[-1], num_classes, self.config.head_dropout)

    def size_multiple(self) -> int:
        return self.config.patch_size

    def min_input_size(self) -> int:
        """One token per axis; the decoder's first norm then sees 2^3 voxels."""
        return self.config.patch_size
