"""resenc3d: nnU-Net's ResEnc from dynamic-network-architectures. A library
``ResidualEncoderUNet`` state dict maps onto our encoder and decoder by the documented
prefixes and computes exactly what the library network computes; each tensor is stored once
(safetensors); the L/M/XL presets have nnU-Net's layout (L built, not run)."""

from __future__ import annotations

import pytest
import torch
from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
from dynamic_network_architectures.building_blocks.residual import BasicBlockD
from pydantic import ValidationError
from torch import nn

from medssl_bench.weights import load_weights, save_weights
from medssl_bench_backbones.resenc3d import ALIAS_SEGMENT, LIBRARY_PREFIXES, ResEnc3D

TINY = {"n_stages": 4, "base_features": 4, "max_features": 16, "blocks_per_stage": [1, 2, 2, 1]}


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _library(cfg: ResEnc3D.Config, cin: int, classes: int, deep_supervision: bool = False):
    kw = cfg.library_kwargs()
    return ResidualEncoderUNet(
        cin, kw["n_stages"], kw["features_per_stage"], nn.Conv3d, kw["kernel_sizes"],
        kw["strides"], kw["n_blocks_per_stage"], classes, kw["n_conv_per_stage_decoder"],
        kw["conv_bias"], kw["norm_op"], kw["norm_op_kwargs"], None, None, nn.LeakyReLU,
        kw["nonlin_kwargs"], deep_supervision=deep_supervision)


@pytest.mark.parametrize("deep_supervision", [False, True])
def test_library_state_dict_loads_by_prefix_and_computes_the_same(deep_supervision):
    cfg = ResEnc3D.Config(**TINY)
    backbone = ResEnc3D(cfg)
    net = _library(cfg, 2, 3, deep_supervision)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.2)
    split = backbone.split_library_state(net.state_dict())
    assert not split.unmatched
    encoder, decoder = backbone.build_encoder(2), backbone.build_decoder(backbone.build_encoder(2), 3)
    encoder.load_state_dict(split.parts["encoder"])  # strict
    decoder.load_state_dict(split.parts["decoder"])
    # what was dropped: aliases, the decoder's copy of the encoder, deep-supervision heads
    assert all(ALIAS_SEGMENT in k or k.startswith("decoder.encoder.")
               or k.startswith("decoder.seg_layers.") for k in split.dropped)
    assert "decoder.seg_layers.0.weight" in split.dropped
    # the full-resolution segmentation layer became `out`
    torch.testing.assert_close(decoder.out.weight, net.decoder.seg_layers[-1].weight)
    # our keys are the library's with the prefix removed
    lib_keys = {k for k in net.state_dict() if ALIAS_SEGMENT not in k}
    assert {LIBRARY_PREFIXES["encoder"] + k for k in encoder.state_dict()} == \
        {k for k in lib_keys if k.startswith("encoder.")}
    net.eval(), encoder.eval(), decoder.eval()
    x = torch.rand(1, 2, 16, 16, 24, generator=torch.Generator().manual_seed(0))
    want = net(x)[0] if deep_supervision else net(x)
    torch.testing.assert_close(decoder(encoder(x)), want)


def test_each_tensor_is_stored_once_and_round_trips_through_safetensors(tmp_path):
    backbone = ResEnc3D(ResEnc3D.Config(**TINY))
    encoder = backbone.build_encoder(1)
    state = encoder.state_dict()
    assert not [k for k in state if ALIAS_SEGMENT in k]
    assert len({v.data_ptr() for v in state.values()}) == len(state), "shared tensors"
    path = save_weights({"encoder": state}, tmp_path / "w.safetensors")
    fresh = backbone.build_encoder(1)
    fresh.load_state_dict(load_weights(path)["encoder"])
    x = torch.rand(1, 1, 16, 16, 16)
    encoder.eval(), fresh.eval()
    torch.testing.assert_close(fresh(x)[-1], encoder(x)[-1])


def test_modules_the_forward_runs_follow_to_and_train():
    """``all_modules`` (what the library's blocks run) is no longer registered: moving the
    encoder or switching it to eval must still reach the layers it holds."""
    encoder = ResEnc3D(ResEnc3D.Config(**TINY, norm="batch")).build_encoder(1).double().eval()
    block = encoder.stem.convs[0]
    assert block.all_modules[0] is block.conv and block.conv.weight.dtype == torch.float64
    assert not block.all_modules[1].training
    assert encoder(torch.rand(1, 1, 16, 16, 16, dtype=torch.float64))[-1].dtype == torch.float64


def test_nnunet_initialisation():
    """He-normal convs with zero bias, and each residual block's last norm at zero (nnU-Net's
    ``ResidualEncoderUNet.initialize``)."""
    encoder = ResEnc3D(ResEnc3D.Config(**TINY)).build_encoder(1)
    blocks = [m for m in encoder.modules() if isinstance(m, BasicBlockD)]
    assert blocks and all(b.conv2.norm.weight.abs().sum() == 0 for b in blocks)
    assert encoder.stem.convs[0].conv.bias.abs().sum() == 0


def test_resenc_l_layout_and_size():
    """The default is ResEnc-L as nnssl/OpenMind pretrain it: 6 stages, 32-320 features,
    blocks 1/3/4/6/6/6, one conv per decoder stage, instance norm, leaky ReLU; about 100M
    parameters (built, not run)."""
    backbone = ResEnc3D()
    assert backbone.config.size == "L"
    kw = backbone.config.library_kwargs()
    assert kw["features_per_stage"] == [32, 64, 128, 256, 320, 320]
    assert kw["n_blocks_per_stage"] == [1, 3, 4, 6, 6, 6]
    assert kw["strides"] == [[1, 1, 1]] + [[2, 2, 2]] * 5
    assert kw["kernel_sizes"] == [[3, 3, 3]] * 6 and kw["n_conv_per_stage_decoder"] == [1] * 5
    assert kw["norm_op"] is nn.InstanceNorm3d and kw["conv_bias"]
    encoder = backbone.build_encoder(1)
    decoder = backbone.build_decoder(encoder, 2)
    assert encoder.feature_channels == [32, 64, 128, 256, 320, 320]
    assert [len(s.blocks) for s in encoder.stages] == [1, 3, 4, 6, 6, 6]
    assert any(isinstance(m, nn.LeakyReLU) for m in encoder.modules())
    assert any(isinstance(m, nn.InstanceNorm3d) for m in encoder.modules())
    n = sum(p.numel() for p in (*encoder.parameters(), *decoder.parameters()))
    assert 5e7 < n < 2e8, f"ResEnc-L has about 1e8 parameters, not {n:.3g}"
    assert backbone.size_multiple() == 32 and backbone.min_input_size() == 64


def test_m_and_xl_presets_and_overrides():
    m = ResEnc3D(ResEnc3D.Config(size="M")).config.library_kwargs()
    assert m["features_per_stage"] == [32, 64, 128, 256, 320]
    assert m["n_blocks_per_stage"] == [1, 3, 4, 6, 6]
    xl = ResEnc3D(ResEnc3D.Config(size="XL")).config.library_kwargs()
    assert xl["features_per_stage"] == [32, 64, 128, 256, 320, 320]
    seven = ResEnc3D(ResEnc3D.Config(n_stages=7)).config.library_kwargs()
    assert seven["features_per_stage"][-1] == 320 and seven["n_blocks_per_stage"][-1] == 6
    with pytest.raises(ValidationError, match="blocks_per_stage has 2 entries for 6 stages"):
        ResEnc3D.Config(n_stages=6, blocks_per_stage=[1, 1])


def test_keys_no_rule_matches_are_listed_never_guessed():
    backbone = ResEnc3D(ResEnc3D.Config(**TINY))
    lib = _library(backbone.config, 1, 2).state_dict()
    split = backbone.split_library_state({"module.encoder.stem.convs.0.conv.weight":
                                          lib["encoder.stem.convs.0.conv.weight"],
                                          "network_weights.extra": lib["decoder.seg_layers.2.bias"],
                                          **{k: v for k, v in lib.items() if k.startswith("decoder.")}})
    assert split.unmatched == ["module.encoder.stem.convs.0.conv.weight", "network_weights.extra"]
    assert "encoder" not in split.parts and "out.bias" in split.parts["decoder"]
