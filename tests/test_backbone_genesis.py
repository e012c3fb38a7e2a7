"""genesis-unet3d beyond the contract tests: Models Genesis' ContBatchNorm3d normalises with
the batch's statistics in evaluation too (the published code's behaviour), ``norm: batch``
with the running statistics; the encoder's features are the levels before pooling."""

from __future__ import annotations

import torch

from medssl_bench.plugins import build_registry

REGISTRY = build_registry(autoload=False)


def _encoder(**values):
    cls = REGISTRY.get("backbone", "genesis-unet3d")
    torch.manual_seed(0)
    return cls(cls.Config(width=0.125, **values)).build_encoder(1)


def test_contbatch_uses_batch_statistics_in_evaluation_too():
    x = torch.rand(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0)) * 5 + 3
    encoder = _encoder()
    train = encoder.train()(x)[-1]
    evaluated = encoder.eval()(x)[-1]
    torch.testing.assert_close(evaluated, train)
    # evaluation leaves the running statistics (and the batch count) alone; training moves them
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    encoder.eval()(x * 2)
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, before[key]), key
    encoder.train()(x * 2)
    moved = encoder.state_dict()
    assert not torch.equal(moved["down_tr64.ops.0.bn1.running_mean"],
                           before["down_tr64.ops.0.bn1.running_mean"])
    assert int(moved["down_tr64.ops.0.bn1.num_batches_tracked"]) == 2
    batch = _encoder(norm="batch")
    batch.load_state_dict(encoder.state_dict())  # the same weights fit either norm
    assert not torch.allclose(batch.eval()(x)[-1], train, atol=1e-3)


def test_features_are_each_level_before_pooling():
    encoder = _encoder()
    features = encoder(torch.rand(1, 1, 16, 16, 16))
    assert [tuple(f.shape[1:]) for f in features] == [
        (8, 16, 16, 16), (16, 8, 8, 8), (32, 4, 4, 4), (64, 2, 2, 2)]


def test_contbatch_running_statistics_follow_batch_norm_with_any_momentum():
    """In training ContBatchNorm3d is batch norm: the same output and running statistics as
    ``nn.BatchNorm3d``, with a momentum or (momentum=None) the cumulative average."""
    from medssl_bench_backbones.genesis_unet3d import ContBatchNorm3d

    for momentum in (0.1, None):
        cont, plain = ContBatchNorm3d(3, momentum=momentum), torch.nn.BatchNorm3d(3, momentum=momentum)
        for step in range(3):
            x = torch.randn(2, 3, 4, 4, 4, generator=torch.Generator().manual_seed(step)) + step
            torch.testing.assert_close(cont(x), plain(x))
        torch.testing.assert_close(cont.running_mean, plain.running_mean)
        torch.testing.assert_close(cont.running_var, plain.running_var)
        assert int(cont.num_batches_tracked) == int(plain.num_batches_tracked) == 3
