"""Models Genesis and Parts2Whole: the transforms' guarantees, determinism, learning, and
what transfers to fine-tuning. Tiny volumes and networks (2-core CI)."""

from __future__ import annotations

import pytest
import torch

from medssl_bench.engine import FinetuneConfig, PretrainConfig, build_downstream, pretrain
from medssl_bench.interfaces import DatasetInfo
from medssl_bench_tasks.genesis import Genesis3D
from medssl_bench_tasks.parts2whole import Parts2Whole3D, crop_and_resize, sample_parts
from medssl_bench_tasks.restoration import bezier_table, local_shuffle_round, nonlinear_intensity


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _smooth(batch: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Low-frequency volumes in [0, 1]: learnable in a few steps, unlike white noise."""
    coarse = torch.rand(batch, 1, 4, 4, 4, generator=_gen(seed))
    return torch.nn.functional.interpolate(coarse, size=(size,) * 3, mode="trilinear")


# --------------------------------------------------------------------------- Bezier


def test_bezier_tables_are_monotone_onto_unit_interval():
    control = torch.rand(256, 2, 2, generator=_gen(1))
    decreasing = torch.rand(256, generator=_gen(2)) < 0.5
    table = bezier_table(control, decreasing, 4096, 4096)
    steps = table[:, 1:] - table[:, :-1]
    assert (steps[~decreasing] >= 0).all() and (steps[decreasing] <= 0).all()
    assert torch.equal(table[:, 0], decreasing.float())
    assert torch.equal(table[:, -1], 1 - decreasing.float())
    assert table.min() >= 0 and table.max() <= 1


def test_nonlinear_transform_follows_the_drawn_direction():
    values = torch.linspace(0, 1, 16**3).view(1, 1, 16, 16, 16).repeat(32, 1, 1, 1, 1)
    out, control, decreasing = nonlinear_intensity(values, _gen(3))
    flat = out.flatten(1)
    steps = flat[:, 1:] - flat[:, :-1]
    assert decreasing.any() and (~decreasing).any()
    assert (steps[~decreasing] >= -1e-6).all() and (steps[decreasing] <= 1e-6).all()
    ends = torch.stack([flat[:, 0], flat[:, -1]], 1)
    expected = torch.stack([decreasing.float(), 1 - decreasing.float()], 1)
    torch.testing.assert_close(ends, expected, atol=1e-5, rtol=0)
    assert control.shape == (32, 2, 2) and flat.min() >= 0 and flat.max() <= 1


# --------------------------------------------------------------------------- local shuffling


@pytest.mark.parametrize("separable", [True, False])
def test_local_shuffle_permutes_inside_windows_only(separable):
    x = torch.rand(2, 1, 32, 32, 32, generator=_gen(4))
    out, ids = local_shuffle_round(x, 1000, (3, 3, 3), _gen(5), separable=separable,
                                   return_windows=True)
    for b in range(2):
        windows = ids[b].unique()
        assert len(windows) - 1 == 1000  # 1,000 windows plus the untouched id -1
        keep = ids[b] < 0
        assert torch.equal(out[b, 0][keep], x[b, 0][keep])
        # Sorting by (window, value): equal iff every window holds the same multiset.
        key_in = torch.sort(ids[b].double().flatten() * 2 + x[b, 0].double().flatten()).values
        key_out = torch.sort(ids[b].double().flatten() * 2 + out[b, 0].double().flatten()).values
        assert torch.equal(key_in, key_out)
        assert not torch.equal(out[b], x[b])


def test_local_shuffle_windows_fit_their_maximum_sides():
    x = torch.rand(1, 1, 32, 32, 16, generator=_gen(6))
    _, ids = local_shuffle_round(x, 200, (4, 3, 2), _gen(7), return_windows=True)
    for window in ids.unique()[1:]:
        where = (ids[0] == window).nonzero()
        extent = where.max(0).values - where.min(0).values + 1
        assert (extent <= torch.tensor([4, 3, 2])).all()
        assert extent.prod() == len(where)  # a solid box


# --------------------------------------------------------------------------- cutouts


def _masks(cfg: dict, kinds: list[str], batch: int = 48, size=(32, 32, 32)):
    task = Genesis3D(Genesis3D.Config(paint_rate=1.0, **cfg))
    mask, kind = task.cutout_mask(batch, size, kinds, _gen(8), torch.device("cpu"))
    return mask.flatten(1).float().mean(1), kind


@pytest.mark.parametrize("kind,field", [("inner", "inner_cutout_fraction"),
                                        ("outer", "outer_cutout_fraction")])
@pytest.mark.parametrize("bounds", [(0.1, 0.25), (0.3, 0.5)])
def test_paper_cutout_fractions_stay_in_range(kind, field, bounds):
    fraction, kinds = _masks({field: bounds}, [kind])
    assert (kinds == (1 if kind == "inner" else 2)).all()
    assert (fraction >= bounds[0]).all() and (fraction <= bounds[1]).all(), fraction


def test_inner_and_outer_cutouts_never_both_apply():
    cfg = {"inner_rate": 0.5, "inner_cutout_fraction": (0.02, 0.05),
           "outer_cutout_fraction": (0.6, 0.7)}
    fraction, kinds = _masks(cfg, ["inner", "outer"], batch=64)
    assert set(kinds.tolist()) == {1, 2}
    assert ((fraction[kinds == 1] >= 0.02) & (fraction[kinds == 1] <= 0.05)).all()
    assert ((fraction[kinds == 2] >= 0.6) & (fraction[kinds == 2] <= 0.7)).all()
    # The reference boxes keep a 3-voxel margin: an inner cutout leaves the border shell
    # exposed, an outer one masks all of it. Both at once would break one of the two.
    task = Genesis3D(Genesis3D.Config(paint_rate=1.0, inner_rate=0.5, cutout_scheme="code"))
    mask, kinds = task.cutout_mask(64, (32, 32, 32), ["inner", "outer"], _gen(9),
                                   torch.device("cpu"))
    shell = torch.ones(32, 32, 32, dtype=torch.bool)
    shell[3:-3, 3:-3, 3:-3] = False
    border = mask[:, shell]
    assert (~border[kinds == 1]).all() and border[kinds == 2].all()


def test_code_cutout_fractions_match_the_reference_scale():
    inner, _ = _masks({"cutout_scheme": "code"}, ["inner"], size=(64, 64, 32))
    outer, _ = _masks({"cutout_scheme": "code"}, ["outer"], size=(64, 64, 32))
    assert inner.max() < 0.2 and 0.02 < inner.mean() < 0.1  # reference: mean 5.5 %
    assert 0.5 < outer.mean() < 0.85  # reference: mean 68 %


def test_transform_selection_and_identity():
    images = _smooth(4, 16)
    identity = Genesis3D(Genesis3D.Config(transforms=["identity"])).make_batch(images, _gen())
    assert torch.equal(identity["inputs"], identity["targets"])
    none = Genesis3D(Genesis3D.Config(transforms=[])).make_batch(images, _gen())
    assert torch.equal(none["inputs"], none["targets"])
    only = Genesis3D(Genesis3D.Config(transforms=["nonlinear"], nonlinear_rate=1.0))
    batch = only.make_batch(images, _gen())
    assert not torch.equal(batch["inputs"], batch["targets"])
    with pytest.raises(ValueError):
        Genesis3D.Config(transforms=["identity", "nonlinear"])


# --------------------------------------------------------------------------- Parts2Whole


def test_parts_cover_between_a_sixteenth_and_a_quarter():
    scale, centre = sample_parts(2000, 1 / 16, 1 / 4, 2, _gen(10), torch.device("cpu"))
    volume = scale.prod(1)
    assert (volume >= 1 / 16 - 1e-6).all() and (volume <= 1 / 4 + 1e-6).all()
    assert ((centre - scale) >= -1 - 1e-6).all() and ((centre + scale) <= 1 + 1e-6).all()
    assert scale.std(0).min() > 0.05  # aspect ratios vary


def test_crop_and_resize_samples_the_box():
    ramp = torch.linspace(-1, 1, 32).view(1, 1, 32, 1, 1).expand(1, 1, 32, 32, 32)
    scale = torch.tensor([[0.5, 1.0, 1.0]])
    centre = torch.tensor([[0.25, 0.0, 0.0]])
    part = crop_and_resize(ramp.contiguous(), scale, centre, "bilinear")
    assert part.shape == ramp.shape
    assert abs(part.min().item() - (-0.25)) < 0.05 and abs(part.max().item() - 0.75) < 0.05


# --------------------------------------------------------------------------- both tasks


@pytest.mark.parametrize("task_cls", [Genesis3D, Parts2Whole3D])
def test_same_seed_same_pairs(task_cls):
    images = _smooth(3, 16)
    a = task_cls().make_batch(images, _gen(11))
    b = task_cls().make_batch(images, _gen(11))
    c = task_cls().make_batch(images, _gen(12))
    for key in a:
        assert torch.equal(a[key], b[key])
    assert not torch.equal(a["inputs"], c["inputs"])


def _tiny_backbone(registry):
    cls = registry.get("backbone", "unet3d")
    return cls(cls.Config(filters=[8, 16, 32], width=1.0))


@pytest.mark.parametrize("task_cls", [Genesis3D, Parts2Whole3D])
def test_restoration_loss_falls(registry, task_cls):
    torch.manual_seed(0)
    task = task_cls()
    backbone = _tiny_backbone(registry)
    encoder = backbone.build_encoder(1)
    heads = task.build_heads(backbone, encoder)
    params = [*encoder.parameters(), *heads.parameters()]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    images = 0.3 * _smooth(2, 16, seed=13)  # away from the untrained sigmoid's 0.5
    generator = _gen(14)
    losses = []
    for _ in range(12):
        loss, _ = task.compute_loss(encoder, heads, task.make_batch(images, generator))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.25 * first, losses


class _Volumes(torch.utils.data.Dataset):
    def __init__(self, count: int, size: int) -> None:
        self.data = _smooth(count, size, seed=15)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.data[index]


@pytest.mark.parametrize("task_cls", [Genesis3D, Parts2Whole3D])
def test_decoder_transfer(registry, task_cls):
    backbone = _tiny_backbone(registry)
    info = DatasetInfo(kind="segmentation", num_classes=2, channels=1, image_size=(16, 16, 16),
                       class_names=("background", "foreground"), metrics=("dice",),
                       main_metric="dice")
    cfg = PretrainConfig(epochs=1, batch_size=2, iterations_per_epoch=1)
    result = pretrain(task_cls(), backbone, _Volumes(2, 16), info, cfg, torch.device("cpu"), 0)
    model = build_downstream(backbone, info, result.weights, FinetuneConfig())
    for key, value in model.encoder.state_dict().items():
        assert torch.equal(value, result.weights["encoder"][key])
    decoder = model.head.state_dict()
    if task_cls is Parts2Whole3D:
        assert "decoder" not in result.weights  # fine-tuning gets a random decoder
        return
    pretrained = result.weights["decoder"]
    assert set(pretrained) == set(decoder)
    for key, value in decoder.items():
        if key.startswith("out."):  # the output layer: 1 restored channel vs 2 classes
            assert value.shape != pretrained[key].shape
        else:
            assert torch.equal(value, pretrained[key]), key
    fresh = backbone.build_decoder(backbone.build_encoder(1), 2).state_dict()
    assert any(not torch.equal(fresh[k], decoder[k]) for k in decoder if not k.startswith("out."))


def test_restoration_output_layer_never_transferred(registry):
    """With one class per restored channel the output layers' shapes match; the restoration
    layer must still not become the segmentation layer."""
    backbone = _tiny_backbone(registry)
    info = DatasetInfo(kind="segmentation", num_classes=1, channels=1, image_size=(16, 16, 16),
                       class_names=("foreground",), metrics=("dice",), main_metric="dice")
    cfg = PretrainConfig(epochs=1, batch_size=2, iterations_per_epoch=1)
    result = pretrain(Genesis3D(), backbone, _Volumes(2, 16), info, cfg, torch.device("cpu"), 0)
    pretrained = result.weights["decoder"]
    torch.manual_seed(123)
    model = build_downstream(backbone, info, result.weights, FinetuneConfig())
    decoder = model.head.state_dict()
    out_keys = [k for k in decoder if k.startswith("out.")]
    assert out_keys and all(decoder[k].shape == pretrained[k].shape for k in out_keys)
    assert not any(torch.equal(decoder[k], pretrained[k]) for k in out_keys)
    assert all(torch.equal(decoder[k], pretrained[k]) for k in decoder if k not in out_keys)
