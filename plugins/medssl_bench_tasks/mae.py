"""MAE (He et al., CVPR 2022) in 3D: most patches hidden at random, the ViT encoder sees the
visible tokens only, a light transformer decoder with mask tokens reconstructs the hidden
patches, and the loss is an MSE on per-patch normalised intensities of the masked patches.

Paper and code facts (He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners";
facebookresearch/mae ``models_mae.py``):

- masking: 75 % of patches (paper, Sec. 4 / Fig. 5; ``mask_ratio=0.75``), uniformly at
  random per image by an argsort of per-patch uniform noise; ``len_keep = int(L * (1 -
  mask_ratio))`` patches are kept (floor of the kept share, so the masked count is ``L -
  floor(L / 4)``: exactly 75 % when 4 divides L);
- the encoder runs on the kept tokens only (no mask tokens in the encoder);
- the decoder: a linear projection of the encoded tokens to the decoder width, a shared
  learned mask token (normal, std 0.02) at every masked position, fixed sin-cos position
  embeddings, 8 pre-norm transformer blocks of width 512 with 16 heads (``dec512d8b``,
  Table 1a/b: depth 8, width 512 are the defaults), LayerNorm and a linear layer to the
  ``patch^2 * channels`` intensities of each patch;
- the target is each patch's intensities normalised by that patch's mean and (unbiased)
  variance, ``(t - mean) / (var + 1e-6) ** .5`` (``norm_pix_loss``; Table 1d's default,
  "pixel (w/ norm)"); the loss is the per-patch MSE averaged over the masked patches only.

3D: cubic patches of the ViT encoder (vit3d: 16^3 by default, 8^3 as Primus / nnssl's 3D
MAE), 3D sin-cos position embeddings in the decoder, intensities ``C * p^3`` per patch.
The config defaults are the paper's (decoder 512 wide, 8 blocks); for 3D, whose volumes
hold many more tokens (a 160^3 crop: 1,000 tokens at 16^3, 8,000 at 8^3, against 196 in
MAE's 224^2 images) and whose decoder sees every token, ``decoder_dim``/``decoder_depth``
are the documented knobs (the ``quick`` preset uses 32 wide, 1 block). Our encoders have no
class token (Primus has none; MAE's is only for the linear probe).

nnssl's 3D MAE (``EvaMAETrainer``, ``run/run_training_wandb.py`` defaults): Primus-M encoder
(8^3 patches, 864 wide, 16 blocks, 12 heads), an EVA decoder as wide as the encoder with 6
blocks and 8 heads, AdamW lr 3e-5 (weight decay 5e-3, 50 warm-up epochs, then poly), drop path
0.2; ``protocols/recipes/openmind-mae.yaml`` uses those settings.

Needs a backbone whose encoder encodes a token subset (``requires = ("tokens",)``: vit3d).
The encoder is called through ``encoder(x, keep_index=...)`` (its ``forward``, what a compiled
or distributed wrapper sees). Randomness: :meth:`MAE3D.make_batch` draws one uniform key per
voxel; the key at each patch's first voxel orders the patches (MAE's argsort of noise), so
the mask follows the backbone's patch size without the task repeating it.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from medssl_bench.config import PluginConfig
from medssl_bench.errors import ConfigError
from medssl_bench.interfaces import Backbone, Encoder, ProxyTask
from medssl_bench_backbones.vit3d import sincos_3d
from medssl_bench_tasks.masking import normalise_patches, patchify


class MAEConfig(PluginConfig):
    """MAE options: the paper's defaults."""

    mask_ratio: float = Field(
        default=0.75, gt=0, lt=1,
        description="Share of patches masked (MAE: 0.75; nnssl's 3D MAE: 0.75). int(L * (1 - "
        "ratio)) patches stay visible (MAE's len_keep), at least one of each kind.")
    decoder_dim: int = Field(
        default=512, ge=8,
        description="Decoder width (MAE: 512, decoder_embed_dim). 3D volumes have many more "
        "tokens than MAE's images: a smaller decoder is the usual 3D saving.")
    decoder_depth: int = Field(
        default=8, ge=1, description="Decoder transformer blocks (MAE: 8, decoder_depth).")
    decoder_heads: int = Field(
        default=16, ge=1,
        description="Decoder attention heads (MAE: 16, decoder_num_heads); must divide "
        "decoder_dim.")
    norm_pix_loss: bool = Field(
        default=True,
        description="Targets normalised per patch by its mean and variance (MAE paper's "
        "default, Table 1d 'pixel (w/ norm)'; the code's flag --norm_pix_loss, off by "
        "default there). False: raw intensities.")


def keep_count(patches: int, ratio: float) -> int:
    """Visible patches out of ``patches``: MAE's ``int(L * (1 - ratio))``, at least one and,
    where there are two or more, at most ``patches - 1`` (so something is masked)."""
    keep = int(patches * (1 - ratio) + 1e-9)
    return max(1, min(keep, patches - 1)) if patches > 1 else 1


def patch_order(keys: Tensor, patch: int) -> Tensor:
    """``(B, L)`` patch indices in random order: the argsort of each patch's key (the key
    at its first voxel), patches in row-major grid order as the encoder's tokens."""
    return keys[:, ::patch, ::patch, ::patch].flatten(1).argsort(1)


def split_patches(keys: Tensor, patch: int, ratio: float) -> tuple[Tensor, Tensor]:
    """``keep_index`` ``(B, K)`` (the visible patches) and ``mask`` ``(B, L)`` bool (True:
    masked) from a batch's keys."""
    order = patch_order(keys, patch)
    keep = order[:, :keep_count(order.shape[1], ratio)]
    mask = torch.ones_like(order, dtype=torch.bool)
    mask.scatter_(1, keep, False)
    return keep, mask


class MAEDecoder(nn.Module):
    """MAE's decoder: project, mask tokens in, sin-cos positions, blocks, norm, linear."""

    def __init__(self, embed_dim: int, patch: int, channels: int, dim: int, depth: int,
                 heads: int) -> None:
        from timm.models.vision_transformer import Block  # here: timm takes seconds to import

        super().__init__()
        self.patch_size = patch
        self.dim = dim
        self.embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(
            Block(dim, heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=nn.LayerNorm)
            for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.pred = nn.Linear(dim, channels * patch**3)
        self._positions: dict[tuple, Tensor] = {}
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.mask_token, std=0.02)

    def positions(self, grid: tuple[int, ...], like: Tensor) -> Tensor:
        key = (grid, like.device, like.dtype)
        if key not in self._positions:
            self._positions[key] = sincos_3d(self.dim, grid).flatten(2).transpose(1, 2).to(
                like.device, like.dtype)
        return self._positions[key]

    def forward(self, visible: Tensor, keep_index: Tensor, grid: tuple[int, ...]) -> Tensor:
        """``visible`` ``(B, K, D)`` at ``keep_index`` -> ``(B, L, C * p^3)`` predictions."""
        x = self.embed(visible)
        b, _, d = x.shape
        n = grid[0] * grid[1] * grid[2]
        full = self.mask_token.to(x.dtype).expand(b, n, d)
        full = full.scatter(1, keep_index[..., None].expand(-1, -1, d), x)
        x = full + self.positions(grid, x)
        for block in self.blocks:
            x = block(x)
        return self.pred(self.norm(x))


def mae_loss(prediction: Tensor, images: Tensor, mask: Tensor, patch: int,
             norm_pix: bool) -> Tensor:
    """MSE per patch on (per-patch normalised) intensities, averaged over masked patches."""
    target = normalise_patches(images, patch) if norm_pix else patchify(images, patch)
    per_patch = (prediction.float() - target.float()).square().mean(-1)
    m = mask.to(per_patch.dtype)
    return (per_patch * m).sum() / m.sum()


class MAE3D(ProxyTask):
    """MAE in 3D (He et al. 2022): 75 % of patches masked, ViT on visible tokens, MSE."""

    name = "mae3d"
    family = "masked-modelling"
    spatial_dims = 3
    transfers = ("encoder",)
    requires = ("tokens",)
    paper_input_size = (160, 160, 160)  # nnssl / OpenMind pretraining crops (Primus)
    min_input_size = (32, 32, 32)  # 8 patches at vit3d's default 16^3: 2 visible, 6 masked
    Config = MAEConfig
    presets = {
        "quick": {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2},
        "paper": {"mask_ratio": 0.75, "decoder_dim": 512, "decoder_depth": 8,
                  "decoder_heads": 16, "norm_pix_loss": True},
    }

    def build_heads(self, backbone: Backbone, encoder: Encoder) -> nn.ModuleDict:
        missing = [c for c in self.requires if c not in getattr(backbone, "provides", ())]
        if missing or not hasattr(encoder, "encode_tokens"):
            raise ConfigError(
                f"Task {self.name!r} encodes visible tokens only and needs a ViT encoder "
                f"(capability {', '.join(self.requires)}); backbone {backbone.name!r} has "
                "none. Use --backbone vit3d.")
        cfg = self.config
        if cfg.decoder_dim % cfg.decoder_heads:
            raise ConfigError(f"task.decoder_heads={cfg.decoder_heads} does not divide "
                              f"task.decoder_dim={cfg.decoder_dim}.")
        return nn.ModuleDict({"decoder": MAEDecoder(
            encoder.embed_dim, encoder.patch_size, encoder.in_channels, cfg.decoder_dim,
            cfg.decoder_depth, cfg.decoder_heads)})

    def make_batch(self, images: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        keys = torch.rand((images.shape[0], *images.shape[2:]), generator=generator,
                          device=images.device)
        return {"images": images, "keys": keys}

    def compute_loss(self, encoder, heads, batch):
        images = batch["images"]
        decoder = heads["decoder"]
        p = decoder.patch_size
        keep, mask = split_patches(batch["keys"], p, self.config.mask_ratio)
        grid = tuple(s // p for s in images.shape[2:])
        visible = encoder(images, keep_index=keep)[0]
        prediction = decoder(visible, keep, grid)
        loss = mae_loss(prediction, images, mask, p, self.config.norm_pix_loss)
        return loss, {}
