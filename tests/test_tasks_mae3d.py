"""mae3d: the mask hides the stated share of patches, the encoder never sees a masked token,
only masked patches enter the loss, targets are normalised per patch, same seed same batch,
a tiny model overfits, the capability check, and `bench run` with vit3d."""

from __future__ import annotations

import json

import pytest
import torch
from masked_fixtures import smooth
from task_e2e import MEDMNIST, PHANTOM

from medssl_bench import cli
from medssl_bench.errors import ConfigError
from medssl_bench.plugins import build_registry
from medssl_bench.spec import resolve_run
from medssl_bench_backbones.unet3d import UNet3D
from medssl_bench_backbones.vit3d import ViT3D
from medssl_bench_tasks.mae import MAE3D, keep_count, mae_loss, split_patches
from medssl_bench_tasks.masking import normalise_patches, patchify

TINY_VIT = {"embed_dim": 32, "depth": 2, "heads": 2, "patch_size": 8, "img_size": 32,
            "feature_size": 2}
QUICK = {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2}


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _setup(channels: int = 1, **task_values):
    torch.manual_seed(0)
    backbone = ViT3D(ViT3D.Config(**TINY_VIT))
    encoder = backbone.build_encoder(channels)
    task = MAE3D(MAE3D.Config(**{**QUICK, **task_values}))
    return task, backbone, encoder, task.build_heads(backbone, encoder)


@pytest.mark.parametrize(("patches", "masked"), [(64, 48), (8, 6), (512, 384), (10, 8),
                                                  (2, 1)])
def test_mask_hides_75_percent_of_patches(patches, masked):
    """MAE keeps int(L * 0.25) patches (the floor of the kept share): exactly 75 % when 4
    divides L, slightly more otherwise (10 patches: 2 kept, 8 masked)."""
    assert patches - keep_count(patches, 0.75) == masked


def test_masks_are_exact_random_and_per_volume():
    task, *_ = _setup()
    images = torch.rand(6, 1, 32, 32, 32)
    batch = task.make_batch(images, _gen(0))
    keep, mask = split_patches(batch["keys"], 8, 0.75)
    assert mask.shape == (6, 64) and keep.shape == (6, 16)
    assert (mask.sum(1) == 48).all(), "exactly 75 % of the 64 patches of every volume"
    assert not mask.gather(1, keep).any(), "the kept patches are the visible ones"
    assert len({tuple(m.tolist()) for m in mask}) == 6, "a different mask per volume"
    again = task.make_batch(images, _gen(0))
    assert torch.equal(split_patches(again["keys"], 8, 0.75)[1], mask), "same seed, same mask"
    # over many draws every patch is masked about 75 % of the time
    many = split_patches(torch.rand(4000, 32, 32, 32, generator=_gen(1)), 8, 0.75)[1]
    assert (many.float().mean(0) - 0.75).abs().max() < 0.05


def test_encoder_never_sees_masked_tokens():
    task, _, encoder, heads = _setup()
    images = smooth(2, 32)
    batch = task.make_batch(images, _gen(2))
    keep, mask = split_patches(batch["keys"], 8, 0.75)
    seen = []
    handle = encoder.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape))
    with torch.no_grad():
        loss, _ = task.compute_loss(encoder, heads, batch)
        visible = encoder(images, keep_index=keep)[0]
        # masked patches of the input changed: the encoded visible tokens stay the same
        voxel_mask = mask.view(2, 1, 4, 4, 4).repeat_interleave(8, 2).repeat_interleave(
            8, 3).repeat_interleave(8, 4)
        changed = torch.where(voxel_mask, torch.rand_like(images), images)
        torch.testing.assert_close(encoder(changed, keep_index=keep)[0], visible)
    handle.remove()
    assert torch.isfinite(loss)
    assert seen[0] == (2, 16, 32), "the blocks get the 16 visible tokens of 64, no mask tokens"


def test_only_masked_patches_enter_the_loss():
    task, _, encoder, heads = _setup()
    images = smooth(2, 32)
    batch = task.make_batch(images, _gen(3))
    _, mask = split_patches(batch["keys"], 8, 0.75)
    prediction = torch.randn(2, 64, 512)
    base = mae_loss(prediction, images, mask, 8, True)
    visible = (~mask[0]).nonzero()[0, 0]
    hidden = mask[0].nonzero()[0, 0]
    moved = prediction.clone()
    moved[0, visible] += 100.0
    assert torch.equal(mae_loss(moved, images, mask, 8, True), base)
    moved = prediction.clone()
    moved[0, hidden] += 1.0
    assert not torch.equal(mae_loss(moved, images, mask, 8, True), base)
    # the loss is the mean over masked patches of the per-patch MSE
    target = normalise_patches(images, 8)
    per_patch = (prediction - target).square().mean(-1)
    torch.testing.assert_close(base, per_patch[mask].mean())


def test_targets_are_normalised_per_patch():
    images = smooth(2, 16, channels=2) * 0.5 + 0.25
    target = normalise_patches(images, 8)
    assert target.shape == (2, 8, 2 * 8**3)
    torch.testing.assert_close(target.mean(-1), torch.zeros(2, 8), atol=1e-5, rtol=0)
    torch.testing.assert_close(target.std(-1), torch.ones(2, 8), atol=1e-3, rtol=0)
    mask = torch.ones(2, 8, dtype=torch.bool)
    assert mae_loss(target, images, mask, 8, True) < 1e-10
    assert mae_loss(patchify(images, 8), images, mask, 8, False) == 0
    # an affine change of one patch's intensities leaves its normalised target unchanged
    shifted = images.clone()
    shifted[0, :, :8, :8, :8] = shifted[0, :, :8, :8, :8] * 3 + 1
    torch.testing.assert_close(normalise_patches(shifted, 8), target, atol=1e-3, rtol=0)


@pytest.mark.parametrize("channels", [1, 2, 4])
def test_predictions_cover_every_channel(channels):
    task, _, encoder, heads = _setup(channels)
    batch = task.make_batch(torch.rand(2, channels, 32, 32, 32), _gen(0))
    keep, _ = split_patches(batch["keys"], 8, 0.75)
    visible = encoder(batch["images"], keep_index=keep)[0]
    assert heads["decoder"](visible, keep, (4, 4, 4)).shape == (2, 64, channels * 512)


def test_tiny_model_overfits_a_fixed_batch():
    task, _, encoder, heads = _setup()
    batch = task.make_batch(smooth(2, 32), _gen(8))
    optimizer = torch.optim.Adam([*encoder.parameters(), *heads.parameters()], lr=3e-3)
    losses = []
    for _ in range(150):  # memorising normalised patches from positions: ~1 s
        loss, _ = task.compute_loss(encoder, heads, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses


def test_a_backbone_without_tokens_is_refused():
    task = MAE3D(MAE3D.Config(**QUICK))
    unet = UNet3D(UNet3D.Config(filters=[4, 8]))
    with pytest.raises(ConfigError, match="vit3d"):
        task.build_heads(unet, unet.build_encoder(1))
    registry = build_registry()
    with pytest.raises(ConfigError, match="--backbone vit3d"):
        resolve_run(registry, "data-efficiency", "mae3d")  # unet3d, the default
    assert "mae3d" not in resolve_run(registry, "data-efficiency", "all").task_names
    every = resolve_run(registry, "data-efficiency", "all", backbone="vit3d")
    assert "mae3d" in every.task_names


#: tiny vit3d and mae3d settings for `bench run` (task_e2e.TINY is sized for unet3d)
VIT_SETS = [f"backbone.{k}={v}" for k, v in TINY_VIT.items()] + [
    f"task.{k}={v}" for k, v in QUICK.items()] + [
    "pretrain.epochs=1", "pretrain.iterations_per_epoch=1", "pretrain.batch_size=2",
    "finetune.epochs=1", "finetune.warmup_epochs=0", "finetune.iterations_per_epoch=1",
    "protocol.seeds=[0]", "protocol.fractions=[100]"]


@pytest.mark.slow
@pytest.mark.parametrize("medmnist", [False, True], ids=["phantom3d", "adrenalmnist3d"])
def test_bench_run_beside_scratch(medmnist, tmp_path, monkeypatch, capsys):
    """`bench run --task mae3d --backbone vit3d` on the 16^3 phantom (8^3 patches) and on
    MedMNIST's 28^3 volumes (4^3 patches, a 7^3 token grid), beside scratch."""
    if medmnist and not MEDMNIST.is_file():
        pytest.skip(f"{MEDMNIST} is not beside the checkout")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    if medmnist:
        data = ["--dataset", "medmnist3d"]
        sets = [f"dataset.path={MEDMNIST}",
                *(s.replace("patch_size=8", "patch_size=4") for s in VIT_SETS)]
    else:
        data, sets = [], [*VIT_SETS, *PHANTOM]
    assert cli.main(["run", "--protocol", "data-efficiency", "--task", "mae3d", "--backbone",
                     "vit3d", "--device", "cpu", *data, "--set", *sets]) == 0
    capsys.readouterr()
    assert cli.main(["leaderboard", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {"mae3d", "scratch"} <= {row["task"] for row in rows}
    assert {row.get("backbone", "vit3d") for row in rows} == {"vit3d"}


def test_tasks_that_refuse_a_token_encoder_are_left_out_of_all_and_refused_by_name(registry):
    """spark3d declares it cannot work with a patch-token encoder (refuses): `--task all
    --backbone vit3d` leaves it out (and keeps mae3d and simmim3d, whose ViT path puts the
    token on the patch embeddings); naming it is refused before anything loads, naming a
    backbone that fits."""
    from medssl_bench.errors import ConfigError
    from medssl_bench.spec import expand_tasks

    on_vit = expand_tasks(registry, "all", 3, "vit3d")
    assert {"mae3d", "simmim3d"} <= set(on_vit) and "spark3d" not in on_vit
    on_cnn = expand_tasks(registry, "all", 3, "unet3d")
    assert {"simmim3d", "spark3d"} <= set(on_cnn) and "mae3d" not in on_cnn
    with pytest.raises(ConfigError, match=r"cannot run on a backbone offering tokens.*unet3d"):
        expand_tasks(registry, "spark3d", 3, "vit3d")
