"""SimMIM (simmim3d): masks hide exactly the stated share on the patch grid, the mask token
replaces exactly the masked voxels, only masked voxels enter the L1, the head is SimMIM's
linear one, a tiny model overfits, and `bench run` works on phantom3d and MedMNIST.
Tiny volumes and networks (2-core CI)."""

from __future__ import annotations

import math

import pytest
import torch
from masked_fixtures import smooth
from torch import nn

from medssl_bench.errors import ConfigError
from medssl_bench.plugins import build_registry
from medssl_bench_tasks.masking import expand_to, masked_count, random_patch_mask
from medssl_bench_tasks.simmim import SimMIM3D, pixel_shuffle_3d, reconstruction_loss

REGISTRY = build_registry(autoload=False)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _backbone(filters=(4, 8)):
    cls = REGISTRY.get("backbone", "unet3d")
    return cls(cls.Config(filters=list(filters), width=1.0))


class _Spy(nn.Module):
    """Records what the encoder is given."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder
        self.seen = None

    def forward(self, x):
        self.seen = x.detach().clone()
        return self.encoder(x)


@pytest.mark.parametrize("ratio", [0.6, 0.75, 0.3])
@pytest.mark.parametrize("shape,patch", [((64, 64, 32), 16), ((32, 32, 32), 8), ((16, 16, 16), 4)])
def test_mask_hides_the_stated_share_of_whole_patches(ratio, shape, patch):
    task = SimMIM3D(SimMIM3D.Config(mask_ratio=ratio, mask_patch_size=patch))
    images = torch.rand(5, 1, *shape, generator=_gen(1))
    mask = task.make_batch(images, _gen(2))["mask"]
    grid = tuple(s // patch for s in shape)
    total = math.prod(grid)
    assert mask.shape == (5, *grid)
    expected = math.ceil(total * ratio - 1e-9)  # SimMIM's MaskGenerator: ceil(L * ratio)
    assert (mask.flatten(1).sum(1) == expected).all()
    voxels = expand_to(mask, shape)[:, 0]
    share = voxels.flatten(1).float().mean(1)
    torch.testing.assert_close(share, torch.full((5,), expected / total))
    # every patch is wholly masked or wholly visible
    blocks = voxels.reshape(5, grid[0], patch, grid[1], patch, grid[2], patch)
    per_patch = blocks.float().mean((2, 4, 6))
    assert ((per_patch == 0) | (per_patch == 1)).all()
    assert not torch.equal(mask[0], mask[1])  # independent per sample


def test_masked_count_rounding_rules():
    assert masked_count(36, 0.6, "ceil") == 22  # SimMIM, 6x6 grid of a 192 image: ceil(21.6)
    assert masked_count(49, 0.6, "keep_round") == 49 - 20  # SparK, 7x7: keep round(19.6)
    assert masked_count(2, 0.6, "ceil") == 1  # one patch always stays visible
    assert masked_count(1, 0.6, "ceil") == 1


def test_mask_token_replaces_exactly_the_masked_voxels():
    task = SimMIM3D(SimMIM3D.Config(mask_patch_size=4))
    backbone = _backbone()
    spy = _Spy(backbone.build_encoder(2))
    heads = task.build_heads(backbone, spy.encoder)
    images = torch.rand(3, 2, 16, 16, 16, generator=_gen(3))
    batch = task.make_batch(images, _gen(4))
    task.compute_loss(spy, heads, batch)
    masked = expand_to(batch["mask"], (16, 16, 16)).expand_as(images)
    token = heads["mask_token"].input.token.detach().view(1, 2, 1, 1, 1).expand_as(images)
    assert torch.equal(spy.seen[~masked], images[~masked])
    assert torch.equal(spy.seen[masked], token[masked])
    assert spy.seen.shape == images.shape  # the encoder sees the whole volume


def test_only_masked_voxels_enter_the_loss():
    images = torch.rand(2, 2, 16, 16, 16, generator=_gen(5))
    mask = random_patch_mask(2, (4, 4, 4), 38, _gen(6), "cpu")
    masked = expand_to(mask, (16, 16, 16))
    prediction = torch.rand(2, 2, 16, 16, 16, generator=_gen(7))
    base = reconstruction_loss(prediction, images, masked)
    visible_voxel = (~masked[:, 0]).nonzero()[0]
    masked_voxel = masked[:, 0].nonzero()[0]
    for voxel, changes in ((visible_voxel, False), (masked_voxel, True)):
        other = prediction.clone()
        b, d, h, w = voxel.tolist()
        other[b, 1, d, h, w] += 5.0
        assert bool(reconstruction_loss(other, images, masked) != base) is changes
    # SimMIM's normalisation: sum over masked voxels / (count * channels)
    m = masked.expand_as(images)
    expected = (prediction - images).abs()[m].sum() / (masked.sum() * 2)
    torch.testing.assert_close(base, expected, rtol=1e-4, atol=1e-6)
    mse = reconstruction_loss(prediction, images, masked, "mse")
    torch.testing.assert_close(mse, (prediction - images)[m].square().mean(), rtol=1e-4, atol=0)


def test_linear_head_is_one_conv_and_a_pixel_shuffle():
    x = torch.arange(2 * 16 * 2 * 3 * 1, dtype=torch.float32).view(2, 16, 2, 3, 1)
    y = pixel_shuffle_3d(x, 2)
    assert y.shape == (2, 2, 4, 6, 2)
    for c, d, h, w in [(0, 0, 0, 0), (1, 3, 5, 1), (0, 2, 1, 1), (1, 1, 4, 0)]:
        i, j, k = d % 2, h % 2, w % 2
        assert y[1, c, d, h, w] == x[1, c * 8 + i * 4 + j * 2 + k, d // 2, h // 2, w // 2]
    task = SimMIM3D(SimMIM3D.Config(mask_patch_size=4))
    backbone = _backbone((4, 8, 16))
    encoder = backbone.build_encoder(3)
    heads = task.build_heads(backbone, encoder)
    assert heads["head"].stride == 4 and heads["head"].proj.kernel_size == (1, 1, 1)
    assert heads["head"](encoder(torch.rand(1, 3, 16, 16, 16))).shape == (1, 3, 16, 16, 16)
    decoder = SimMIM3D(SimMIM3D.Config(head="decoder")).build_heads(backbone, encoder)["head"]
    assert decoder(encoder(torch.rand(1, 3, 16, 16, 16))).shape == (1, 3, 16, 16, 16)


def test_patch_size_must_divide_the_volume():
    task = SimMIM3D(SimMIM3D.Config(mask_patch_size=12))
    with pytest.raises(ConfigError, match="task.mask_patch_size=12"):
        task.make_batch(torch.rand(1, 1, 16, 16, 16), _gen())
    with pytest.raises(ConfigError, match="task.mask_patch_size=12"):
        task.check_input((16, 16, 16), 1)  # before anything trains (bench run's preflight)


def _vit(patch=4):
    cls = REGISTRY.get("backbone", "vit3d")
    return cls(cls.Config(img_size=16, patch_size=patch, embed_dim=16, depth=2, heads=2,
                          feature_size=4))


def test_on_a_vit_the_token_replaces_exactly_the_masked_patch_embeddings():
    """SimMIM's ViT path: masked patches' embeddings become the learned token before the
    position embedding is added; visible ones are the patch embedding; every token (masked
    or not) goes through the blocks; the head predicts the whole volume."""
    torch.manual_seed(0)
    backbone = _vit(patch=4)
    encoder = backbone.build_encoder(1)
    task = SimMIM3D(SimMIM3D.Config(mask_patch_size=8))  # 2 x 2 x 2 ViT patches per mask patch
    heads = task.build_heads(backbone, encoder)
    images = torch.rand(2, 1, 16, 16, 16, generator=_gen(1))
    batch = task.make_batch(images, _gen(2))
    seen = {}
    original = encoder.encode_tokens

    def spy(tokens, keep_index=None):
        seen["tokens"] = tokens.detach().clone()
        seen["keep"] = keep_index
        return original(tokens, keep_index)

    encoder.encode_tokens = spy
    loss, _ = task.compute_loss(encoder, heads, batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    tokens = seen["tokens"]  # (B, 64, D): a 4^3 grid of ViT patches
    assert tokens.shape == (2, 64, 16) and seen["keep"] is None  # nothing dropped
    with torch.no_grad():
        embedded = encoder.patch_embed(images)  # (B, D, 4, 4, 4)
        pos = encoder.pos_embed((4, 4, 4))
        plain = (embedded + pos).flatten(2).transpose(1, 2)
        filled = (heads["mask_token"].token.view(1, -1, 1, 1, 1) + pos).flatten(2).transpose(1, 2)
    masked = expand_to(batch["mask"], (4, 4, 4)).flatten(1)  # (B, 64), per ViT patch
    assert masked.any() and (~masked).any()
    torch.testing.assert_close(tokens[~masked], plain[~masked])
    torch.testing.assert_close(tokens[masked], filled.expand_as(tokens)[masked])
    assert heads["head"].stride == 4  # one ViT patch of voxels per token


def test_a_vit_needs_whole_tokens_per_mask_patch_and_the_linear_head():
    backbone = _vit(patch=4)
    encoder = backbone.build_encoder(1)
    with pytest.raises(ConfigError, match="multiple of the ViT patch"):
        SimMIM3D(SimMIM3D.Config(mask_patch_size=6)).build_heads(backbone, encoder)
    with pytest.raises(ConfigError, match="task.head=linear"):
        SimMIM3D(SimMIM3D.Config(mask_patch_size=8, head="decoder")).build_heads(backbone,
                                                                                 encoder)


@pytest.mark.parametrize("backbone_kind", ["unet3d", "vit3d"])
def test_tiny_model_overfits_a_fixed_batch(backbone_kind):
    torch.manual_seed(0)
    task = SimMIM3D(SimMIM3D.Config(mask_patch_size=4))
    backbone = _backbone() if backbone_kind == "unet3d" else _vit(patch=4)
    encoder = backbone.build_encoder(1)
    heads = task.build_heads(backbone, encoder)
    batch = task.make_batch(smooth(2), _gen(8))
    params = [*encoder.parameters(), *heads.parameters()]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    losses = []
    for _ in range(30):
        loss, _ = task.compute_loss(encoder, heads, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses
