"""Every registered backbone, tested the moment it registers (as tests/test_contract_tasks.py
does for tasks), at its CPU-sized ``quick`` preset and at the tiny variants listed in
``VARIANTS``: encoder features as declared (highest resolution first), a decoder back to the
input's size whose last layer is ``out`` (what fine-tuning replaces after Models Genesis), a
classifier, ``size_multiple``/``min_input_size`` honoured on non-cubic inputs, pretrained
weights loading across channel counts, and gradients reaching every parameter."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from medssl_bench.interfaces import Backbone, global_pool
from medssl_bench.plugins import build_registry
from medssl_bench.weights import adapt_state_in_channels

REGISTRY = build_registry(autoload=False)
BACKBONES = REGISTRY.names("backbone")

#: Extra tiny configurations per backbone, beside the ``quick`` preset every backbone gets.
VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "unet3d": {
        "tiny": {"filters": [8, 16, 32]},
        "batch-norm": {"filters": [8, 16, 32], "norm": "batch"},  # min_input_size is smaller
        "group-norm": {"filters": [4, 8, 16], "norm": "group"},
    },
    "genesis-unet3d": {
        "tiny": {"width": 0.125},
        "batch-norm-prelu": {"width": 0.125, "norm": "batch", "act": "prelu"},
    },
    "timm2d": {
        # a pyramid that starts at stride 4: the decoder's last upsampling is x4
        "partial-pyramid": {"model_kwargs": {"growth_rate": 8, "block_config": [2, 2, 2, 2]},
                            "out_indices": [1, 2, 3], "decoder_channels": [16, 8]},
        "resnet18": {"model": "resnet18", "decoder_channels": [16, 8]},
    },
    "resenc3d": {
        "tiny": {"n_stages": 3, "base_features": 4, "max_features": 8,
                 "blocks_per_stage": [1, 2, 1]},
        "batch-norm-two-convs": {"n_stages": 3, "base_features": 4, "max_features": 8,
                                 "blocks_per_stage": [1, 1, 1], "norm": "batch",
                                 "decoder_convs": 2},
    },
    "swinunetr": {
        "v2": {"feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1],
               "window_size": 2, "use_v2": True},
    },
    "vit3d": {
        # 16^3 patches: the pyramid's finest level is at stride 2, the decoder ends with a x2
        "patch16-sincos": {"embed_dim": 24, "depth": 2, "heads": 2, "patch_size": 16,
                           "img_size": 32, "pos_embed": "sincos", "feature_size": 2},
        "two-levels": {"embed_dim": 16, "depth": 3, "heads": 2, "patch_size": 4, "img_size": 16,
                       "levels": 2, "feature_size": 2},
    },
}


def _params() -> list:
    params = []
    for name in BACKBONES:
        cls = REGISTRY.get("backbone", name)
        configs = {"quick": dict(cls.presets.get("quick", {})), **VARIANTS.get(name, {})}
        params += [pytest.param(name, values, id=f"{name}-{variant}")
                   for variant, values in configs.items()]
    return params


PARAMS = _params()


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors gain nothing from intra-op threads (and the CPU may be shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _backbone(name: str, values: dict[str, Any]) -> Backbone:
    cls = REGISTRY.get("backbone", name)
    return cls(cls.Config.model_validate(values))


def _shape(backbone: Backbone) -> tuple[int, ...]:
    """The smallest input the backbone accepts, one axis a size multiple larger (non-cubic)."""
    low, step = backbone.min_input_size(), backbone.size_multiple()
    return (low + step, *([low] * (backbone.spatial_dims - 1)))


def _input(backbone: Backbone, channels: int, shape=None, batch: int = 2) -> torch.Tensor:
    shape = shape or _shape(backbone)
    return torch.rand((batch, channels, *shape), generator=torch.Generator().manual_seed(0))


def test_variants_name_registered_backbones():
    assert set(VARIANTS) <= set(BACKBONES), "VARIANTS names a backbone that is not registered"


@pytest.mark.parametrize(("name", "values"), PARAMS)
def test_size_multiple_and_min_input_size(name, values):
    backbone = _backbone(name, values)
    step, low = backbone.size_multiple(), backbone.min_input_size()
    assert isinstance(step, int) and step >= 1
    assert isinstance(low, int) and low >= step
    assert low % step == 0, "the smallest accepted size must itself be a multiple of size_multiple"


@pytest.mark.parametrize(("name", "values"), PARAMS)
@pytest.mark.parametrize("channels", [1, 3])
def test_encoder_features(name, values, channels):
    backbone = _backbone(name, values)
    encoder = backbone.build_encoder(channels)
    assert encoder.in_channels == channels
    assert encoder.spatial_dims == backbone.spatial_dims == REGISTRY.get("backbone", name).spatial_dims
    x = _input(backbone, channels)
    features = encoder(x)
    assert isinstance(features, list | tuple) and len(features) == len(encoder.feature_channels)
    assert [f.shape[1] for f in features] == list(encoder.feature_channels)
    assert all(f.shape[0] == 2 and f.dim() == x.dim() for f in features)
    sizes = [f.shape[2:] for f in features]
    assert all(all(a >= b for a, b in zip(hi, lo, strict=True))
               for hi, lo in zip(sizes, sizes[1:], strict=False)), "highest resolution first"
    assert global_pool(features).shape == (2, encoder.embed_dim)
    assert encoder.embed_dim == encoder.feature_channels[-1]
    assert encoder.state_dict()[encoder.stem_weight_key].shape[1] == channels


@pytest.mark.parametrize(("name", "values"), PARAMS)
def test_decoder_and_classifier_shapes(name, values):
    backbone = _backbone(name, values)
    encoder = backbone.build_encoder(2)
    low, step = backbone.min_input_size(), backbone.size_multiple()
    for shape in (_shape(backbone), (low,) * backbone.spatial_dims,
                  (low, *([low + 2 * step] * (backbone.spatial_dims - 1)))):
        x = _input(backbone, 2, shape)
        features = encoder(x)
        for classes in (2, 5):
            assert backbone.build_classifier(encoder, classes)(features).shape == (2, classes)
        for skips in (True, False):
            decoder = backbone.build_decoder(encoder, 3, skip_connections=skips)
            out = getattr(decoder, "out", None)
            assert isinstance(out, nn.Module), f"{name}: the decoder has no `out` layer"
            # a conv, or a library's wrapper of one (MONAI's UnetOutBlock: out.conv.conv)
            weights = [p for key, p in out.named_parameters() if key.endswith("weight")]
            assert weights and weights[-1].shape[0] == 3
            seen = []
            handle = out.register_forward_hook(lambda m, a, result, seen=seen: seen.append(result))
            y = decoder(features)
            handle.remove()
            assert y.shape == (2, 3, *shape), f"decoder output {tuple(y.shape)} for input {shape}"
            assert len(seen) == 1 and seen[0] is y, "`out` must be the decoder's final layer"


@pytest.mark.parametrize(("name", "values"), PARAMS)
@pytest.mark.parametrize("channels", [2, 4])
@pytest.mark.parametrize("mode", ["duplicate", "average"])
def test_pretrained_encoder_loads_with_other_channel_counts(name, values, channels, mode):
    """Pretrained on one channel, fine-tuned on 2 or 4: every input-facing weight is adapted
    (``finetune.channel_adaptation``) and the state loads strictly; nothing else changes."""
    backbone = _backbone(name, values)
    pretrained = backbone.build_encoder(1).state_dict()
    target = backbone.build_encoder(channels)
    state = adapt_state_in_channels(pretrained, target.state_dict(), channels, mode)
    target.load_state_dict(state)  # strict: every key and shape fits
    stem = target.stem_weight_key
    weight = target.state_dict()[stem]
    assert weight.shape[1] == channels
    for c in range(channels):
        want = pretrained[stem][:, 0] if mode == "duplicate" else pretrained[stem][:, 0] / channels
        torch.testing.assert_close(weight[:, c], want)
    loaded = target.state_dict()
    for key, value in pretrained.items():
        if value.shape == loaded[key].shape:
            assert torch.equal(loaded[key], value), f"{key} changed while adapting channels"
    assert all(torch.isfinite(f).all() for f in target(_input(backbone, channels)))


@pytest.mark.parametrize(("name", "values"), PARAMS)
def test_gradients_reach_every_parameter(name, values):
    backbone = _backbone(name, values)
    encoder = backbone.build_encoder(2)
    heads = nn.ModuleDict({
        "decoder": backbone.build_decoder(encoder, 3, skip_connections=True),
        "plain": backbone.build_decoder(encoder, 3, skip_connections=False),
        "classifier": backbone.build_classifier(encoder, 4),
    })
    features = encoder(_input(backbone, 2))
    loss = sum(head(features).square().mean() for head in heads.values())
    loss.backward()
    for part, module in (("encoder", encoder), *heads.items()):
        for key, p in module.named_parameters():
            assert p.grad is not None, f"{part}.{key} gets no gradient"
            assert torch.isfinite(p.grad).all(), f"{part}.{key}: non-finite gradient"
