"""vit3d's own tests: position embeddings resampled faithfully, the token-subset path equal to
the full forward, the feature pyramid as documented, and a tiny `bench run` with it."""

from __future__ import annotations

import json

import pytest
import torch
from task_e2e import PHANTOM
from torch.nn import functional as F

from medssl_bench import cli
from medssl_bench_backbones.vit3d import ViT3D, sincos_3d

TINY = {"embed_dim": 32, "depth": 2, "heads": 2, "patch_size": 8, "img_size": 32,
        "feature_size": 2}


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _encoder(channels: int = 1, **values):
    torch.manual_seed(0)
    backbone = ViT3D(ViT3D.Config(**{**TINY, **values}))
    return backbone, backbone.build_encoder(channels).eval()


def test_sizes_follow_vit():
    assert ViT3D.Config(size="S").dims() == (384, 12, 6)
    assert ViT3D.Config(size="B").dims() == (768, 12, 12)
    assert ViT3D.Config(size="L").dims() == (1024, 24, 16)
    assert ViT3D.Config(size="S", depth=3).dims() == (384, 3, 6)
    with pytest.raises(ValueError, match="does not divide"):
        ViT3D.Config(embed_dim=30, heads=4)


def test_learned_position_embeddings_native_and_resampled():
    _, enc = _encoder()
    pos = enc.pos_embed
    assert pos.grid == (4, 4, 4)
    assert pos((4, 4, 4)) is pos.weight, "the native grid uses the embeddings as they are"
    with torch.no_grad():  # a linear ramp along z in every channel, constant elsewhere
        ramp = torch.linspace(0, 1, 4).view(1, 1, 4, 1, 1)
        pos.weight.copy_(ramp.expand_as(pos.weight))
    big = pos((8, 6, 4))
    assert big.shape == (1, 32, 8, 6, 4)
    torch.testing.assert_close(
        big, F.interpolate(pos.weight, size=(8, 6, 4), mode="trilinear", align_corners=False))
    z = big[0, 0, :, 0, 0]
    assert (z.diff() >= 0).all(), "a ramp stays monotonic"
    assert z.min() >= 0 and z.max() <= 1, "no overshoot"
    assert torch.allclose(big[0, 0, 3], big[0, 0, 3, 0, 0].expand(6, 4)), "constant in x, y"
    # the same tokens at another input size use the resampled embeddings
    x = torch.rand(1, 1, 64, 48, 32)
    embed = enc.patch_embed(x)
    torch.testing.assert_close(enc.tokens(x), (embed + big).flatten(2).transpose(1, 2))


def test_sincos_embeddings_are_computed_at_each_grid():
    _, enc = _encoder(pos_embed="sincos")
    assert not list(enc.pos_embed.parameters())
    torch.testing.assert_close(enc.pos_embed((4, 4, 4)), sincos_3d(32, (4, 4, 4)))
    other = enc.pos_embed((2, 4, 6))
    torch.testing.assert_close(other, sincos_3d(32, (2, 4, 6)))
    # distinct positions get distinct embeddings; the origin's are sin 0 / cos 0
    flat = other.flatten(2)[0].T
    assert torch.cdist(flat, flat).add(torch.eye(len(flat))).min() > 0
    assert set(flat[0].unique().tolist()) <= {0.0, 1.0}


def test_encode_tokens_with_all_tokens_equals_the_deepest_features():
    _, enc = _encoder(channels=2)
    x = torch.rand(2, 2, 32, 24, 16)
    with torch.no_grad():
        deepest = enc(x)[-1]
        tokens = enc.tokens(x)
        n = tokens.shape[1]
        assert n == 4 * 3 * 2
        every = torch.arange(n).expand(2, n)
        encoded = enc.encode_tokens(tokens, every)
        torch.testing.assert_close(encoded, deepest.flatten(2).transpose(1, 2))
        torch.testing.assert_close(enc(x, keep_index=every)[0], encoded)


def test_encode_tokens_sees_only_the_kept_tokens():
    _, enc = _encoder()
    x = torch.rand(2, 1, 32, 32, 32)
    keep = torch.tensor([[0, 5, 9], [63, 1, 2]])
    with torch.no_grad():
        tokens = enc.tokens(x)
        a = enc.encode_tokens(tokens, keep)
        dropped = torch.ones(2, 64, dtype=torch.bool)
        dropped[torch.arange(2)[:, None], keep] = False
        changed = tokens.clone()
        changed[dropped] = torch.randn(int(dropped.sum()), 32)
        b = enc.encode_tokens(changed, keep)
    assert a.shape == (2, 3, 32)
    torch.testing.assert_close(a, b)


def test_pyramid_levels_strides_and_blocks():
    backbone, enc = _encoder(patch_size=16, embed_dim=48, depth=12, heads=4, feature_size=4)
    assert enc.feature_blocks == [3, 6, 9, 12], "UNETR's blocks 3, 6, 9, 12 of 12"
    assert enc.feature_strides == [2, 4, 8, 16]
    assert enc.feature_channels == [8, 16, 32, 48]
    x = torch.rand(1, 1, 32, 32, 64)
    with torch.no_grad():
        features = enc(x)
    assert [tuple(f.shape[2:]) for f in features] == [
        (16, 16, 32), (8, 8, 16), (4, 4, 8), (2, 2, 4)]
    assert backbone.size_multiple() == 16
    decoder = backbone.build_decoder(enc, 3)
    with torch.no_grad():
        assert decoder(features).shape == (1, 3, 32, 32, 64)


def test_bench_run_rotation3d_with_vit3d(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    backbone = [f"backbone.{k}={v}" for k, v in TINY.items()]
    assert cli.main([
        "run", "--protocol", "data-efficiency", "--task", "rotation3d", "--backbone", "vit3d",
        "--device", "cpu", "--set", *backbone, "pretrain.epochs=1",
        "pretrain.iterations_per_epoch=1", "pretrain.batch_size=2", "finetune.epochs=1",
        "finetune.warmup_epochs=0", "finetune.iterations_per_epoch=1", "protocol.seeds=[0]",
        "protocol.fractions=[100]", *PHANTOM]) == 0
    capsys.readouterr()
    assert cli.main(["leaderboard", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {"rotation3d", "scratch"} <= {row["task"] for row in rows}
