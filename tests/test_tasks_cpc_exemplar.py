"""cpc3d and exemplar3d: the CPC context is the paper's inverted pyramid, targets and
negatives are the right patches, the exemplar positive is a transform of its anchor and the
negative another volume, and a tiny model learns both tasks."""

from __future__ import annotations

import itertools

import torch
from torch import nn

from medssl_bench_backbones.unet3d import UNet3D
from medssl_bench_tasks.augment import (
    AffineParams,
    apply_affine,
    apply_factored,
    sample_affine,
    sample_affine_factors,
)
from medssl_bench_tasks.cpc import CPC3D, augmented_patches, grid_geometry, pyramid_context
from medssl_bench_tasks.exemplar import Exemplar3D, derangement

torch.set_num_threads(1)


def _images(batch: int, channels: int = 1, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, channels, size, size, size, generator=torch.Generator().manual_seed(seed))


def _tiny():
    backbone = UNet3D(UNet3D.Config(filters=[8, 16, 32]))
    return backbone, backbone.build_encoder


# --------------------------------------------------------------------------- CPC geometry


def test_pyramid_is_centre_plus_the_3x3_row_above():
    centres, context, targets = pyramid_context(4, 1, 2, "middle")
    assert centres.shape == (16, 3) and context.shape == (16, 10, 3) and targets.shape == (16, 2, 3)
    rows = {tuple(c.tolist()): (ctx.tolist(), tgt.tolist())
            for c, ctx, tgt in zip(centres, context, targets, strict=True)}
    ctx, tgt = rows[(1, 1, 2)]
    assert ctx == [[0, y, z] for y in (0, 1, 2) for z in (1, 2, 3)] + [[1, 1, 2]]
    assert tgt == [[2, 1, 2], [3, 1, 2]]
    # at the border the window is mirrored (y=-1 -> 1, z=4 -> 2), as in the reference
    ctx, _ = rows[(1, 0, 3)]
    assert ctx == [[0, y, z] for y in (1, 0, 1) for z in (2, 3, 2)] + [[1, 0, 3]]


def test_pyramid_widens_upwards_and_covers_every_valid_row():
    centres, context, targets = pyramid_context(7, 2, 2, "all")
    assert sorted(set(centres[:, 0].tolist())) == [2, 3, 4]
    assert context.shape[1] == 25 + 9 + 1
    i = centres.tolist().index([3, 3, 3])
    ctx = context[i].tolist()
    assert ctx[:25] == [[1, y, z] for y in range(1, 6) for z in range(1, 6)]
    assert ctx[25:34] == [[2, y, z] for y in range(2, 5) for z in range(2, 5)]
    assert ctx[34] == [3, 3, 3]
    assert targets[i].tolist() == [[4, 3, 3], [5, 3, 3]]


def test_grid_paper_and_reference_sizes():
    paper = grid_geometry((128, 128, 128), 7, 0.5)
    assert paper.patch == (32,) * 3 and paper.stride == (16,) * 3 and paper.start == (0,) * 3
    reference = grid_geometry((128, 128, 128), 4, 0.0)
    assert reference.patch == (32,) * 3 and reference.stride == (32,) * 3


def test_cpc_batch_patches_targets_and_negatives():
    task = CPC3D()
    images = _images(2)
    batch = task.make_batch(images, torch.Generator().manual_seed(0))
    patches = batch["patches"]
    grid = grid_geometry((32, 32, 32), 7, 0.5)
    p, s = grid.patch[0], grid.stride[0]
    assert patches.shape == (2, 7, 7, 7, 1, p, p, p)
    torch.testing.assert_close(patches[1, 2, 3, 4], images[1, :, 2 * s:2 * s + p,
                                                             3 * s:3 * s + p, 4 * s:4 * s + p])
    n3 = 7**3
    centres, context, targets = pyramid_context(7, 1, 2, "all", gap=1)  # overlapping grid: gap 1
    q = centres.shape[0]
    flat = lambda c: (c[..., 0] * 7 + c[..., 1]) * 7 + c[..., 2]  # noqa: E731
    assert torch.equal(batch["context_index"][:q], flat(context))
    assert torch.equal(batch["context_index"][q:], flat(context) + n3)
    target = batch["target_index"]
    assert torch.equal(target[q:], flat(targets) + n3)
    # targets are the next rows of the same column
    x, yz = (target % n3) // 49, target % 49
    assert torch.equal(x, centres[:, :1].repeat(2, 1) + torch.tensor([2, 3]))  # gap 1
    assert torch.equal(yz, (centres[:, 1:2] * 7 + centres[:, 2:3]).repeat(2, 1).expand(-1, 2))
    negative = batch["negative_index"]
    assert negative.shape == (2 * q, 2, task.config.num_negatives)
    assert not (negative == target.unsqueeze(-1)).any()
    volume_of_query = torch.arange(2).repeat_interleave(q).view(-1, 1, 1)
    other_volume = negative // n3 != volume_of_query
    assert other_volume.any() and (~other_volume).any()


def test_cpc_binary_negative_is_another_column_same_rows():
    task = CPC3D(CPC3D.Config(loss="binary", patches_per_side=4, overlap=0.0,
                              centre_rows="middle"))
    batch = task.make_batch(_images(2), torch.Generator().manual_seed(0))
    target, negative = batch["target_index"], batch["negative_index"]
    assert target.shape == negative.shape == (32, 2)
    column = lambda i: (i // 64, i % 16)  # noqa: E731
    assert torch.equal((negative % 64) // 16, (target % 64) // 16)  # same rows
    tv, tc = column(target)
    nv, nc = column(negative)
    assert ((tv != nv) | (tc != nc)).all()
    assert torch.equal(nv[:, 0], nv[:, 1]) and torch.equal(nc[:, 0], nc[:, 1])


def test_cpc_augmentation_without_crops_only_flips_along_x():
    images = _images(2)
    grid = grid_geometry((32, 32, 32), 4, 0.0)
    out = augmented_patches(images, grid, torch.Generator().manual_seed(0), 1.0, 1.0)
    plain = CPC3D(CPC3D.Config(patches_per_side=4, overlap=0.0)).make_batch(
        images, torch.Generator())["patches"]
    same = (out == plain).flatten(4).all(-1)
    flipped = (out == plain.flip(5)).flatten(4).all(-1)
    assert (same | flipped).all() and (~same).any() and (~flipped).any()
    cropped = augmented_patches(images, grid, torch.Generator().manual_seed(0))
    # the zero frame of the 7/8 patch crop (8 -> 7 voxels, padded by one after)
    assert (cropped[..., :, -1, :] == 0).all() and (cropped[..., :, :, -1] == 0).all()


# --------------------------------------------------------------------------- exemplar


def test_derangement_has_no_fixed_points():
    for n in range(2, 9):
        for seed in range(20):
            perm = derangement(n, torch.Generator().manual_seed(seed), "cpu")
            assert sorted(perm.tolist()) == list(range(n))
            assert (perm != torch.arange(n)).all()


def test_exemplar_without_augmentation_positive_is_anchor():
    task = Exemplar3D(Exemplar3D.Config(flip_p=0, rotate_p=0, color_p=0, zoom_p=0))
    images = _images(3, 2)
    batch = task.make_batch(images, torch.Generator().manual_seed(0))
    torch.testing.assert_close(batch["positives"], images)
    assert (batch["negative_index"] != torch.arange(3)).all()


def _signed_permutations(x: torch.Tensor):
    for perm in itertools.permutations((2, 3, 4)):
        for flips in itertools.product((False, True), repeat=3):
            dims = [d for d, f in zip((2, 3, 4), flips, strict=True) if f]
            y = x.permute(0, 1, *perm)
            yield y.flip(dims) if dims else y


def test_exemplar_flips_and_quarter_turns_map_anchor_exactly_onto_positive():
    task = Exemplar3D(Exemplar3D.Config(quarter_p=1.0, color_p=0, zoom_p=0))
    images = _images(6, 2, size=16)
    positives = task.make_batch(images, torch.Generator().manual_seed(1))["positives"]
    changed = 0
    for anchor, positive in zip(images, positives, strict=True):
        candidates = list(_signed_permutations(anchor[None]))
        assert any(torch.equal(c[0], positive) for c in candidates)
        changed += not torch.equal(anchor, positive)
    assert changed


def test_grid_sample_path_agrees_with_exact_path():
    params = AffineParams(quarter_p=1.0, zoom_p=0)
    matrices = sample_affine(8, (12, 12, 12), params, torch.Generator().manual_seed(2), "cpu")
    x = _images(8, 1, size=12)
    torch.testing.assert_close(apply_affine(x, matrices, exact_fast_path=False),
                               apply_affine(x, matrices), atol=1e-5, rtol=0)


def _smooth(batch: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    coarse = torch.rand(batch, channels, 5, 5, 5, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(coarse, size=(size,) * 3, mode="trilinear")


def _free_planes(factors) -> torch.Tensor:
    eye = torch.eye(2)
    return ((factors.planar[:, :, 1:3, 1:3] - eye).abs().amax((2, 3)) > 1e-6).sum(1)


def test_per_plane_path_equals_one_trilinear_pass_with_at_most_one_free_angle():
    """Flips, quarter turns, one arbitrary-angle plane and zoom factor exactly into index ops,
    one 2D pass and a 1D lerp, so the positives are those of a single trilinear resampling."""
    params = AffineParams(quarter_p=0.5, rotate_p=0.4, zoom_p=0.6)
    factors = sample_affine_factors(24, (14, 14, 14), params, torch.Generator().manual_seed(4),
                                    "cpu")
    x = _smooth(24, 2, 14)
    single = _free_planes(factors) <= 1
    assert single.sum() >= 12 and (~single).any()
    fast, composed = apply_factored(x, factors), apply_affine(x, factors.compose())
    torch.testing.assert_close(fast[single], composed[single], atol=1e-5, rtol=0)


def test_per_plane_path_every_carried_axis_in_mixed_batches():
    """Each rotation plane alone (so each axis carried: W rows in place, H after a swap, D as
    pixel-major rows) with flips, quarter turns and zoom, in batches that mix resampled,
    permuted and untouched samples: exactly the single trilinear resampling."""
    for seed in range(6):
        params = AffineParams(quarter_p=0.3, rotate_p=0.35, zoom_p=0.5)
        factors = sample_affine_factors(8, (11, 11, 11), params,
                                        torch.Generator().manual_seed(100 + seed), "cpu")
        x = _smooth(8, 1 + seed % 2, 11)
        single = _free_planes(factors) <= 1
        fast, composed = apply_factored(x, factors), apply_affine(x, factors.compose())
        torch.testing.assert_close(fast[single], composed[single], atol=1e-5, rtol=0)


def test_per_plane_path_is_the_reference_sequence_of_resamplings():
    """With several free angles, each plane is its own resampling (as the reference code's
    ndimage.rotate per plane): the same as resampling factor after factor."""
    params = AffineParams(quarter_p=0.0, rotate_p=0.8, zoom_p=0.5)
    factors = sample_affine_factors(6, (12, 12, 12), params, torch.Generator().manual_seed(1),
                                    "cpu")
    assert (_free_planes(factors) >= 2).any()
    x = _smooth(6, 1, 12)
    expected = x
    for i in range(factors.planar.shape[1] + 1):
        expected = apply_affine(expected, factors.exact[:, i])
        if i < factors.planar.shape[1]:
            expected = apply_affine(expected, factors.planar[:, i])
    torch.testing.assert_close(apply_factored(x, factors), expected, atol=1e-5, rtol=0)


def test_factored_sampling_composes_to_the_same_maps():
    params = AffineParams()
    factors = sample_affine_factors(16, (9, 9, 9), params, torch.Generator().manual_seed(7), "cpu")
    torch.testing.assert_close(
        factors.compose(), sample_affine(16, (9, 9, 9), params, torch.Generator().manual_seed(7),
                                         "cpu"))
    # non-cubic volumes fall back to the composed resampling
    x = torch.rand(16, 1, 9, 10, 11)
    factors = sample_affine_factors(16, (9, 10, 11), params, torch.Generator().manual_seed(7),
                                    "cpu")
    torch.testing.assert_close(apply_factored(x, factors), apply_affine(x, factors.compose()))


def test_arbitrary_rotation_keeps_content_and_channels_move_together():
    task = Exemplar3D(Exemplar3D.Config(quarter_p=0.0, rotate_p=1.0, color_p=0, zoom_p=0,
                                        flip_p=0))
    one = _images(2, 1, size=16)
    images = one.repeat(1, 4, 1, 1, 1)
    positives = task.make_batch(images, torch.Generator().manual_seed(0))["positives"]
    assert not torch.allclose(positives, images)
    for c in range(1, 4):
        torch.testing.assert_close(positives[:, c], positives[:, 0])


class _StubEncoder(nn.Module):
    """Features whose global pooling is the first four voxels of each image."""

    embed_dim = 4

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x.flatten(1)[:, :4, None]]


def test_exemplar_margin_and_distance_options():
    images = _images(4, size=8)
    losses = {}
    for distance, margin in [("l2", 0.0), ("l2", 1.0), ("msd", 1.0)]:
        task = Exemplar3D(Exemplar3D.Config(distance=distance, margin=margin, activation="none"))
        encoder = _StubEncoder()
        torch.manual_seed(0)
        heads = task.build_heads(None, encoder)
        batch = task.make_batch(images, torch.Generator().manual_seed(0))
        loss, _ = task.compute_loss(encoder, heads, batch)
        z = heads["embedding"](torch.cat([images, batch["positives"]]).flatten(1)[:, :4])
        a, p = z[:4], z[4:]
        n = a[batch["negative_index"]]
        if distance == "l2":
            d_ap, d_an = (a - p).norm(dim=1), (a - n).norm(dim=1)
        else:
            d_ap, d_an = (a - p).pow(2).mean(1), (a - n).pow(2).mean(1)
        torch.testing.assert_close(loss, torch.relu(d_ap - d_an + margin).mean(), atol=1e-5, rtol=0)
        losses[(distance, margin)] = loss.item()
    assert losses[("l2", 1.0)] > losses[("l2", 0.0)]


def test_memory_bank_negatives_are_other_volumes_and_hard_mining_picks_closest():
    encoder = _StubEncoder()
    task = Exemplar3D(Exemplar3D.Config(negatives="memory_bank", hard_negatives=True,
                                        activation="none", bank_size=8))
    heads = task.build_heads(None, encoder)
    nn.init.eye_(heads["embedding"].weight[:4])
    nn.init.zeros_(heads["embedding"].bias)
    first = _images(3, size=8, seed=1)
    task.compute_loss(encoder, heads, task.make_batch(first, torch.Generator().manual_seed(0)))
    assert heads["bank"].filled() == 3
    # the second batch repeats volume 0 of the first: it must not be its own negative
    second = torch.cat([first[:1], _images(1, size=8, seed=2)])
    batch = task.make_batch(second, torch.Generator().manual_seed(0))
    z = task.embed(encoder, heads, second)
    stored = heads["bank"].embeddings[:3].clone()
    prints = heads["bank"].fingerprints[:3].clone()
    negatives, valid = task._bank_negatives(heads["bank"], z, batch["fingerprints"], None)
    assert valid.all()
    assert not torch.equal(negatives[0], stored[0])
    distances = torch.cdist(z, stored)
    distances[0, 0] = float("inf")
    torch.testing.assert_close(negatives, stored[distances.argmin(1)])
    loss, _ = task.compute_loss(encoder, heads, batch)
    assert torch.isfinite(loss) and heads["bank"].filled() == 5
    assert prints.shape == (3,)


# --------------------------------------------------------------------------- learning


def _overfit(task, steps: int, batch_size: int = 4) -> tuple[float, float]:
    torch.manual_seed(0)
    backbone, build = _tiny()
    encoder = build(1)
    heads = task.build_heads(backbone, encoder)
    params = [*encoder.parameters(), *heads.parameters()]
    optimizer = torch.optim.Adam(params, lr=1e-3)
    # distinct smooth volumes: global pooling cannot tell i.i.d. noise volumes apart
    coarse = torch.rand(batch_size, 1, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    images = torch.nn.functional.interpolate(coarse, size=(32, 32, 32), mode="trilinear")
    images = images + 0.3 * torch.arange(batch_size).view(-1, 1, 1, 1, 1)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        loss, _ = task.compute_loss(encoder, heads, task.make_batch(images, generator))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    k = max(1, steps // 5)
    return sum(losses[:k]) / k, sum(losses[-k:]) / k


def test_cpc_tiny_model_learns():
    task = CPC3D(CPC3D.Config(patches_per_side=4, overlap=0.0, code_size=64,
                              num_negatives=31))
    start, end = _overfit(task, 25, batch_size=2)
    assert end < 0.8 * start, (start, end)


def test_exemplar_tiny_model_learns():
    task = Exemplar3D(Exemplar3D.Config(code_size=64))
    start, end = _overfit(task, 30)
    assert end < 0.8 * start, (start, end)


def test_cpc_targets_share_no_voxels_with_the_centre_by_default():
    """With half-overlapping patches the first predicted row would be half the centre patch
    itself (a shortcut); the default gap skips it."""
    task = CPC3D()
    assert task.config.overlap > 0 and task.target_gap == 1
    assert CPC3D(CPC3D.Config(patches_per_side=4, overlap=0.0)).target_gap == 0
    centres, _, targets = pyramid_context(7, 1, 2, "all", gap=task.target_gap)
    assert (targets[:, 0, 0] - centres[:, 0] >= 2).all()  # stride is half a patch


def test_pooled_outputs_never_alias_a_kept_batch():
    """Outputs come from reused buffers (medssl_bench_tasks.patches.BUFFERS); a batch the
    caller still holds must never be overwritten by the next one, a dropped one is reused."""
    from medssl_bench_tasks.patches import BufferPool

    pool = BufferPool(min_bytes=0)
    first = pool.empty((2, 3, 4))
    first.fill_(1.0)
    second = pool.empty((2, 3, 4))
    assert second.data_ptr() != first.data_ptr()
    view = first[1]
    del first
    third = pool.empty((2, 3, 4))
    held = {second.data_ptr(), view.data_ptr() - 12 * 4}
    assert third.data_ptr() not in held
    reused = third.data_ptr()
    del third
    assert pool.empty((2, 3, 4)).data_ptr() == reused
    images = torch.rand(3, 1, 64, 64, 64)  # large enough for the shared pool
    for task in (Exemplar3D(), CPC3D()):
        kept = task.make_batch(images, torch.Generator().manual_seed(0))
        frozen = {k: v.clone() for k, v in kept.items()}
        task.make_batch(images, torch.Generator().manual_seed(1))
        for key, value in kept.items():
            assert torch.equal(value, frozen[key]), (task.name, key)


def test_permuted_copy_matches_permute():
    from medssl_bench_tasks.augment import permuted_copy

    for shape in ((1, 1, 5, 6, 7), (3, 2, 4, 5, 6)):
        x = torch.rand(shape)
        for order in itertools.permutations((2, 3, 4)):
            full = (0, 1, *order)
            assert torch.equal(permuted_copy(x, full), x.permute(*full).contiguous())


def test_cpc_quick_preset_runs_on_32_cubed_with_the_default_unet():
    """Patches smaller than the 5-level U-Net's input are zero-padded up to it, so the quick
    phantom (32^3) works; volumes_per_step bounds a step's cost."""
    from medssl_bench_backbones.unet3d import UNet3D

    task = CPC3D(CPC3D.Config(**CPC3D.presets["quick"]))
    backbone = UNet3D(UNet3D.Config(filters=[4, 8, 16, 32, 64]))
    encoder = backbone.build_encoder(1)
    heads = task.build_heads(backbone, encoder)
    batch = task.make_batch(torch.rand(4, 1, 32, 32, 32), torch.Generator().manual_seed(0))
    assert batch["patches"].shape[0] == 2  # two volumes of the four
    loss, _ = task.compute_loss(encoder, heads, batch)
    assert torch.isfinite(loss)


def test_cpc_context_and_scores_stay_fp32_under_autocast():
    """Under mixed precision the GRU and the InfoNCE scores run in fp32 (CUDA autocast would
    put a cuDNN GRU in fp16 without a grad scaler and round einsum's logits to bf16)."""
    backbone, build = _tiny()
    encoder = build(1)
    task = CPC3D(CPC3D.Config(patches_per_side=4, overlap=0.0, code_size=32, num_negatives=7))
    heads = task.build_heads(backbone, encoder)
    batch = task.make_batch(_images(2), torch.Generator().manual_seed(0))
    dtypes = {}
    def record(name):
        def hook(module, args, out):
            dtypes[name] = (out[0] if isinstance(out, tuple) else out).dtype
        return hook

    for name in ("context", "predict"):
        heads[name].register_forward_hook(record(name))
    einsum = torch.einsum

    def spy(*args):
        result = einsum(*args)
        dtypes["scores"] = result.dtype
        return result

    torch.einsum = spy
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = task.compute_loss(encoder, heads, batch)
    finally:
        torch.einsum = einsum
    assert dtypes == {"context": torch.float32, "predict": torch.float32,
                      "scores": torch.float32}
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
