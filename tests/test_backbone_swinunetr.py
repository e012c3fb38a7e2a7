"""swinunetr: MONAI's Swin UNETR split into encoder and decoder with MONAI's keys kept. A
MONAI ``SwinUNETR`` state dict (v1 and v2) splits by the documented prefixes, loads strictly
and computes exactly what MONAI's network computes; the deepest feature is the Swin
transformer's own output; inputs must be multiples of 32."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import SwinUNETR as MonaiSwinUNETR

from medssl_bench.engine import check_input_size
from medssl_bench.errors import ConfigError
from medssl_bench_backbones.swinunetr import LIBRARY_PREFIXES, SwinUNETR

TINY = {"feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1], "window_size": 2}


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("use_v2", [False, True], ids=["v1", "v2"])
def test_monai_state_dict_splits_by_prefix_and_computes_the_same(use_v2):
    backbone = SwinUNETR(SwinUNETR.Config(**TINY, use_v2=use_v2))
    net = MonaiSwinUNETR(in_channels=2, out_channels=3, feature_size=12, depths=(1, 1, 1, 1),
                         num_heads=(1, 1, 1, 1), window_size=2, use_v2=use_v2)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.1)
    split = backbone.split_library_state(net.state_dict())
    assert not split.unmatched and not split.dropped
    encoder = backbone.build_encoder(2)
    decoder = backbone.build_decoder(encoder, 3)
    encoder.load_state_dict(split.parts["encoder"])  # strict, keys exactly MONAI's
    decoder.load_state_dict(split.parts["decoder"])
    assert set(encoder.state_dict()) | set(decoder.state_dict()) == set(net.state_dict())
    assert all(k.startswith(LIBRARY_PREFIXES["encoder"]) for k in encoder.state_dict())
    assert all(k.startswith(LIBRARY_PREFIXES["decoder"]) for k in decoder.state_dict())
    net.eval()
    encoder.eval()
    decoder.eval()
    x = torch.rand(1, 2, 32, 32, 64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(decoder(encoder(x)), net(x))
    # the deepest feature is the transformer's last (normalised) output, stride 32
    deepest = encoder(x)[-1]
    torch.testing.assert_close(deepest, net.swinViT(x, True)[4])
    assert deepest.shape == (1, 16 * 12, 1, 1, 2)


def test_v2_adds_the_residual_blocks_before_each_stage():
    v1 = SwinUNETR(SwinUNETR.Config(**TINY)).build_encoder(1).state_dict()
    v2 = SwinUNETR(SwinUNETR.Config(**TINY, use_v2=True)).build_encoder(1).state_dict()
    assert not any(k.startswith("swinViT.layers1c") for k in v1)
    assert any(k.startswith("swinViT.layers1c") for k in v2)


def test_default_is_feature_size_48_with_monai_layout():
    backbone = SwinUNETR()
    assert backbone.config.feature_size == 48 and not backbone.config.use_v2
    encoder = backbone.build_encoder(1)
    assert encoder.feature_channels == [48, 48, 96, 192, 384, 768]
    n = sum(p.numel() for p in (*encoder.parameters(),
                                *backbone.build_decoder(encoder, 14).parameters()))
    assert 5e7 < n < 7.5e7, f"Swin UNETR (feature size 48) has about 62M parameters, not {n:.3g}"


def test_inputs_must_be_multiples_of_32():
    backbone = SwinUNETR(SwinUNETR.Config(**TINY))
    assert backbone.size_multiple() == 32
    with pytest.raises(ConfigError, match="swinunetr"):
        check_input_size(backbone, (16, 64, 64))  # padded to 32: too small for instance norm
    check_input_size(backbone, (40, 64, 64))  # padded to 64


def test_feature_size_must_be_a_multiple_of_12():
    with pytest.raises(ValueError, match="multiple of 12"):
        SwinUNETR.Config(feature_size=16)
