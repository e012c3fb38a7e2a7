"""`bench weights import` / `list` and `bench run --init weights:NAME`: checkpoints built in
each published layout (same keys, shapes, nesting, prefixes and dtypes; random values), a
pickle that would run code refused, partial loads refused unless allowed, and a fine-tune
from imported Models Genesis weights on the leaderboard beside scratch."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import torch
from pydantic import Field
from torch import nn

from medssl_bench import cli
from medssl_bench.config import PluginConfig
from medssl_bench.errors import ConfigError
from medssl_bench.hookspecs import hookimpl
from medssl_bench.imports import WeightsError, import_weights, read_checkpoint
from medssl_bench.interfaces import Backbone, Encoder
from medssl_bench.plugins import build_registry
from medssl_bench.weights import load_weights, save_weights
from medssl_bench_backbones.weight_formats import SwinUNETRFormat

REGISTRY = build_registry(autoload=False)

#: The LUConvs of Models Genesis' published UNet3D (pytorch/unet3d.py, n_class=1, relu):
#: (input channels, output channels), transcribed from its DownTransition/UpTransition
#: arithmetic; the published Genesis_Chest_CT.pt has exactly these layers.
PUBLISHED_LUCONVS = {
    "down_tr64.ops.0": (1, 32), "down_tr64.ops.1": (32, 64),
    "down_tr128.ops.0": (64, 64), "down_tr128.ops.1": (64, 128),
    "down_tr256.ops.0": (128, 128), "down_tr256.ops.1": (128, 256),
    "down_tr512.ops.0": (256, 256), "down_tr512.ops.1": (256, 512),
    "up_tr256.ops.0": (768, 256), "up_tr256.ops.1": (256, 256),
    "up_tr128.ops.0": (384, 128), "up_tr128.ops.1": (128, 128),
    "up_tr64.ops.0": (192, 64), "up_tr64.ops.1": (64, 64),
}
PUBLISHED_UP_CONVS = {"up_tr256": 512, "up_tr128": 256, "up_tr64": 128}

PHANTOM = ["dataset.size=16", "dataset.n_unlabeled=4", "dataset.n_train=4", "dataset.n_val=2",
           "dataset.n_test=2", "finetune.epochs=1", "finetune.warmup_epochs=0",
           "finetune.iterations_per_epoch=1", "protocol.seeds=[0]", "protocol.fractions=[100]"]


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("BENCH_CACHE_DIR", raising=False)
    return tmp_path


def published_genesis_state() -> dict[str, torch.Tensor]:
    """Genesis_Chest_CT.pt's state dict as the published definition names and shapes it
    (without ``module.``), random values, float32 (num_batches_tracked: int64 scalars)."""
    g = torch.Generator().manual_seed(0)
    state: dict[str, torch.Tensor] = {}

    def bn(prefix: str, c: int) -> None:
        state.update({f"{prefix}.weight": torch.rand(c, generator=g),
                      f"{prefix}.bias": torch.randn(c, generator=g),
                      f"{prefix}.running_mean": torch.randn(c, generator=g),
                      f"{prefix}.running_var": torch.rand(c, generator=g) + 0.5,
                      f"{prefix}.num_batches_tracked": torch.tensor(7)})

    for name, (cin, cout) in PUBLISHED_LUCONVS.items():
        state[f"{name}.conv1.weight"] = torch.randn(cout, cin, 3, 3, 3, generator=g) * 0.01
        state[f"{name}.conv1.bias"] = torch.randn(cout, generator=g)
        bn(f"{name}.bn1", cout)
    for name, c in PUBLISHED_UP_CONVS.items():
        state[f"{name}.up_conv.weight"] = torch.randn(c, c, 2, 2, 2, generator=g) * 0.01
        state[f"{name}.up_conv.bias"] = torch.randn(c, generator=g)
    state["out_tr.final_conv.weight"] = torch.randn(1, 64, 1, 1, 1, generator=g)
    state["out_tr.final_conv.bias"] = torch.randn(1, generator=g)
    return state


def genesis_file(path, state, extra: dict | None = None, legacy: bool = False):
    """Wrapped as the published file: ``{"state_dict": {"module." + key: ...}}``; ``legacy``:
    in the pre-1.6 (non-zip) serialization of a 2019 PyTorch."""
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, **(extra or {})},
               path, _use_new_zipfile_serialization=not legacy)
    return path


def genesis_state_from_our_model(width: float) -> dict[str, torch.Tensor]:
    """Our genesis-unet3d's encoder and decoder, named as the published model names them."""
    cls = REGISTRY.get("backbone", "genesis-unet3d")
    backbone = cls(cls.Config(width=width))
    torch.manual_seed(1)
    encoder = backbone.build_encoder(1)
    decoder = backbone.build_decoder(encoder, 1)
    state = dict(encoder.state_dict())
    for key, value in decoder.state_dict().items():
        state[key.replace("out.", "out_tr.final_conv.", 1) if key.startswith("out.")
              else key] = value
    return state


def _import(*argv: str) -> int:
    return cli.main(["weights", "import", *argv])


# --------------------------------------------------------------------------- genesis


def test_published_genesis_checkpoint_loads_every_weight_into_genesis_unet3d(workdir, capsys):
    """The full-size published layout: every tensor lands, none is dropped or left random,
    the values are the file's, and the provenance is recorded."""
    state = published_genesis_state()
    file = genesis_file(workdir / "Genesis_Chest_CT.pt", state,
                        {"epoch": 3, "optimizer_state_dict": {"state": {}, "param_groups": []}})
    assert _import(str(file), "--format", "genesis", "--licence", "by request form",
                   "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dropped"] == {} and report["random"] == []
    assert len(report["loaded"]) == len(state) == 106
    prov = report["provenance"]
    assert prov["sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()
    assert (prov["name"], prov["format"], prov["backbone"], prov["source_file"],
            prov["licence"]) == ("Genesis_Chest_CT", "genesis", "genesis-unet3d",
                                 "Genesis_Chest_CT.pt", "by request form")
    assert prov["backbone_config"]["width"] == 1.0 and prov["in_channels"] == 1
    stored = load_weights(workdir / ".medssl_bench/cache/weights/Genesis_Chest_CT.safetensors")
    assert torch.equal(stored["encoder"]["down_tr512.ops.1.conv1.weight"],
                       state["down_tr512.ops.1.conv1.weight"])
    assert torch.equal(stored["decoder"]["up_tr64.ops.0.bn1.running_var"],
                       state["up_tr64.ops.0.bn1.running_var"])
    assert torch.equal(stored["decoder"]["out.weight"], state["out_tr.final_conv.weight"])
    assert stored["encoder"]["down_tr64.ops.0.bn1.num_batches_tracked"].dtype == torch.int64
    assert len(stored["encoder"]) + len(stored["decoder"]) == len(state)

    assert cli.main(["weights", "list", "--json"]) == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert listed["sha256"] == prov["sha256"] and listed["licence"] == "by request form"
    assert re.match(r"\d{4}-\d\d-\d\dT", listed["date"])


@pytest.mark.parametrize("legacy", [False, True])
def test_imported_genesis_network_computes_what_the_checkpoint_does(workdir, legacy):
    """The imported encoder and decoder give the same outputs as the network the file was
    saved from (names and layout match, not only counts), from either serialization."""
    state = genesis_state_from_our_model(0.25)
    file = genesis_file(workdir / "g.pt", state, legacy=legacy)
    prov, _ = import_weights(REGISTRY, file, "genesis", workdir / "cache", name="g")
    cls = REGISTRY.get("backbone", "genesis-unet3d")
    backbone = cls(cls.Config.model_validate(prov.backbone_config))
    stored = load_weights(workdir / "cache/weights/g.safetensors")

    def net(encoder_state, decoder_state):
        encoder = backbone.build_encoder(1)
        decoder = backbone.build_decoder(encoder, 1)
        encoder.load_state_dict(encoder_state)
        decoder.load_state_dict(decoder_state)
        return lambda x: decoder(encoder(x))

    original = net({k: v for k, v in state.items() if k.startswith("down_tr")},
                   {k.replace("out_tr.final_conv.", "out."): v for k, v in state.items()
                    if not k.startswith("down_tr")})
    imported = net(stored["encoder"], stored["decoder"])
    x = torch.rand(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(imported(x), original(x))


def test_partial_load_is_refused_unless_allowed(workdir, capsys):
    state = published_genesis_state()
    missing = [k for k in state if k.startswith("down_tr512.")]
    for key in missing:
        del state[key]
    state["rotation_head.weight"] = torch.zeros(4, 512)  # not in the network: dropped
    file = genesis_file(workdir / "part.pt", state)
    assert _import(str(file), "--format", "genesis") != 0
    err = capsys.readouterr().err
    assert "Partial load refused" in err and "--allow-partial" in err
    assert "Traceback" not in err
    assert not (workdir / ".medssl_bench/cache/weights/part.safetensors").exists()

    assert _import(str(file), "--format", "genesis", "--allow-partial", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert sorted(report["random"]) == sorted(f"encoder.{k}" for k in missing)
    assert report["dropped"] == {"rotation_head.weight": "no such layer in the backbone"}
    assert report["provenance"]["allow_partial"] is True


def test_weights_of_another_width_are_dropped_by_shape_never_placed_elsewhere(workdir, capsys):
    """Settings that contradict the file (--set backbone.width) leave each tensor out with its
    shape in the reason; none lands on another layer whose shape happens to fit."""
    state = genesis_state_from_our_model(0.25)
    file = genesis_file(workdir / "g.pt", state)
    assert _import(str(file), "--format", "genesis", "--set", "backbone.width=0.125") != 0
    assert "Partial load refused" in capsys.readouterr().err
    assert _import(str(file), "--format", "genesis", "--set", "backbone.width=0.125",
                   "--allow-partial", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dropped"] and all(why.startswith("shape ") for key, why in
                                     report["dropped"].items() if not key.startswith("out."))
    assert report["dropped"]["out.weight"].startswith("the original task's output layer")
    assert not any(key.startswith("decoder.out.") for key in report["random"])
    assert report["loaded"]  # width-free shapes (counters, the 1-class out.bias) still fit
    for placed in report["loaded"]:  # each at its own name
        part, _, key = placed.partition(".")
        assert key.replace("out.", "out_tr.final_conv.") in state


@pytest.mark.parametrize("writer", ["torch.save", "torch.save legacy", "pickle.dump"])
def test_a_pickle_that_would_run_code_is_refused(workdir, capsys, writer):
    marker = workdir / "pwned"

    class Payload:
        def __reduce__(self):
            import os

            return (os.mkdir, (str(marker),))

    file = workdir / "evil.pt"
    content = {"state_dict": {"module.down_tr64.ops.0.conv1.weight": Payload()}}
    if writer == "pickle.dump":
        import pickle

        file.write_bytes(pickle.dumps(content))
    else:
        torch.save(content, file, _use_new_zipfile_serialization=writer == "torch.save")
    assert _import(str(file), "--format", "genesis") != 0
    err = capsys.readouterr().err
    assert not marker.exists(), "loading the checkpoint ran its code"
    assert err.count("error:") == 1 and "Traceback" not in err
    assert "Refused evil.pt" in err and "weights_only=True" in err
    if writer.startswith("torch.save"):
        assert "mkdir" in err  # names what it would have called
    assert not list((workdir / ".medssl_bench").rglob("*.safetensors"))


def test_wrong_format_and_missing_backbone_are_one_message(workdir, capsys):
    file = genesis_file(workdir / "g.pt", genesis_state_from_our_model(0.125))
    assert _import(str(file), "--format", "safetensors", "--backbone", "genesis-unet3d") != 0
    assert "is not a safetensors file" in capsys.readouterr().err
    assert _import(str(file), "--format", "genesis", "--backbone", "unet3d") != 0
    assert "holds 'genesis-unet3d' weights" in capsys.readouterr().err
    assert _import(str(file), "--format", "genesys") != 0
    assert "Did you mean 'genesis'" in capsys.readouterr().err
    assert _import(str(file), "--format", "genesis", "--name", "g") == 0
    capsys.readouterr()
    assert _import(str(file), "--format", "genesis", "--name", "g") != 0
    assert "exist already" in capsys.readouterr().err


# --------------------------------------------------------------------------- other formats


def test_our_safetensors_need_a_backbone_and_load_an_encoder(workdir, capsys):
    cls = REGISTRY.get("backbone", "unet3d")
    encoder = cls(cls.Config(filters=[4, 8])).build_encoder(1)
    file = save_weights({"encoder": encoder.state_dict()}, workdir / "mine.safetensors")
    assert _import(str(file), "--format", "safetensors") != 0
    assert "add --backbone NAME" in capsys.readouterr().err
    assert _import(str(file), "--format", "safetensors", "--backbone", "unet3d") != 0
    assert "Partial load refused" not in capsys.readouterr().err  # shapes differ: nothing fits
    assert _import(str(file), "--format", "safetensors", "--backbone", "unet3d", "--set",
                   "backbone.filters=[4,8]", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["random"] == [] and len(report["loaded"]) == len(encoder.state_dict())
    assert report["provenance"]["parts"] == ["encoder"]  # the decoder is new, not partial


def _resenc(num_classes: int = 2) -> nn.Module:
    from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet

    return ResidualEncoderUNet(
        input_channels=1, n_stages=3, features_per_stage=[4, 8, 16], conv_op=nn.Conv3d,
        kernel_sizes=3, strides=[1, 2, 2], n_blocks_per_stage=[1, 1, 1],
        num_classes=num_classes, n_conv_per_stage_decoder=[1, 1], conv_bias=True,
        norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
        nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=False)


def nnunet_checkpoint(path, net: nn.Module, compiled: bool = False):
    """nnU-Net v2's checkpoint_final.pth: network_weights beside the trainer's state, with the
    numpy floats its logger keeps."""
    import numpy as np

    prefix = "_orig_mod." if compiled else ""
    torch.save({
        "network_weights": {prefix + k: v for k, v in net.state_dict().items()},
        "optimizer_state": {"state": {}, "param_groups": [{"lr": 0.01}]},
        "grad_scaler_state": None,
        "logging": {"mean_fg_dice": [np.float64(0.5)], "epoch_end_timestamps": [1.0]},
        "_best_ema": np.float64(0.5), "current_epoch": 1000,
        "init_args": {"plans": {"configurations": {}}, "configuration": "3d_fullres",
                      "fold": 0, "dataset_json": {}},
        "trainer_name": "nnUNetTrainer", "inference_allowed_mirroring_axes": (0, 1, 2),
    }, path)
    return path


@pytest.mark.parametrize(("fmt", "compiled"), [("nnunet", False), ("openmind", True)])
def test_nnunet_layouts_read_and_map_to_the_library_keys(workdir, fmt, compiled):
    """checkpoint_final.pth reads without unpickling code (numpy scalars allowed), unwraps
    network_weights, strips _orig_mod., and drops decoder.encoder.* (a copy of the encoder)."""
    net = _resenc()
    file = nnunet_checkpoint(workdir / "checkpoint_final.pth", net, compiled)
    fmt_cls = REGISTRY.get("weight_format", fmt)
    assert fmt_cls.backbone == "resenc3d"
    f = fmt_cls(fmt_cls.Config())
    mapped, dropped = f.map_keys(f.unwrap(read_checkpoint(file, f)))
    want = {k for k in net.state_dict() if not k.startswith("decoder.encoder.")}
    assert set(mapped) == want
    assert set(dropped) == {k for k in net.state_dict() if k.startswith("decoder.encoder.")}
    assert torch.equal(mapped["encoder.stem.convs.0.conv.weight"],
                       net.state_dict()["encoder.stem.convs.0.conv.weight"])


def test_openmind_primus_is_refused_with_one_message(workdir, capsys):
    from dynamic_network_architectures.architectures.primus import Primus

    net = Primus(input_channels=1, embed_dim=48, patch_embed_size=(8, 8, 8), num_classes=2,
                 eva_depth=1, eva_numheads=2, input_shape=(16, 16, 16))
    file = nnunet_checkpoint(workdir / "primus.pth", net, compiled=True)
    assert _import(str(file), "--format", "openmind") != 0
    err = capsys.readouterr().err
    assert "OpenMind Primus checkpoint" in err and err.count("error:") == 1


def _swin_library_state(feature_size: int = 12) -> dict[str, torch.Tensor]:
    from monai.networks.nets import SwinUNETR

    torch.manual_seed(0)
    return SwinUNETR(in_channels=1, out_channels=2, feature_size=feature_size).state_dict()


def test_swinunetr_release_layout_maps_to_monai_keys(workdir):
    """model_swinvit.pt: the transformer alone under module., timm's mlp.fc1/fc2."""
    library = _swin_library_state()
    swin = {k[len("swinViT."):]: v for k, v in library.items() if k.startswith("swinViT.")}
    published = {f"module.{k.replace('mlp.linear1', 'mlp.fc1').replace('mlp.linear2', 'mlp.fc2')}": v
                 for k, v in swin.items()}
    assert any(".mlp.fc1." in k for k in published)
    torch.save({"state_dict": published, "epoch": 100}, workdir / "model_swinvit.pt")
    f = REGISTRY.get("weight_format", "swinunetr")(None)
    mapped, dropped = f.map_keys(f.unwrap(read_checkpoint(workdir / "model_swinvit.pt", f)))
    assert set(mapped) == {k for k in library if k.startswith("swinViT.")} and not dropped
    for key, value in mapped.items():
        assert torch.equal(value, library[key])


def test_swinunetr_monai_ssl_layout_maps_through_monai_filter(workdir):
    """ssl_pretrained_weights.pth: {"model": {"encoder.layers1.0.0.blocks..", ..}}."""
    library = _swin_library_state()
    ssl = {}
    for key, value in library.items():
        if key.startswith("swinViT.patch_embed"):
            ssl["encoder." + key[len("swinViT."):]] = value
        elif key.startswith("swinViT.layers"):
            rest = key[len("swinViT."):]  # layersN.0.X -> layersN.0.0.X
            ssl["encoder." + rest[:10] + "0." + rest[10:]] = value
    ssl["encoder.mask_token"] = torch.zeros(1, 1, 12)
    torch.save({"model": ssl}, workdir / "ssl_pretrained_weights.pth")
    f = REGISTRY.get("weight_format", "swinunetr")(None)
    mapped, dropped = f.map_keys(f.unwrap(read_checkpoint(
        workdir / "ssl_pretrained_weights.pth", f)))
    assert set(mapped) == {k for k in library if k.startswith("swinViT.")}
    assert set(dropped) == {"encoder.mask_token"}


def test_voco_layout_renames_swin_vit(workdir):
    library = _swin_library_state()
    published = {f"module.{k.replace('swinViT.', 'swin_vit.')}": v for k, v in library.items()}
    torch.save(published, workdir / "VoCo_10k.pt")
    f = REGISTRY.get("weight_format", "voco")(None)
    assert f.backbone == "swinunetr"
    mapped, _ = f.map_keys(f.unwrap(read_checkpoint(workdir / "VoCo_10k.pt", f)))
    assert set(mapped) == set(library)


# --------------------------------------------------------------------------- bench run --init


def _run_init(*extra: str) -> int:
    return cli.main(["run", "--protocol", "data-efficiency", "--device", "cpu",
                     "--backbone", "genesis-unet3d", "--set", *PHANTOM, *extra])


def test_finetune_from_imported_genesis_weights_beside_scratch(workdir, capsys):
    """Imported Models Genesis weights (built from its model definition, wrapped as the
    published file) fine-tune as their own leaderboard entry beside scratch, on the same
    label subset; the run key holds the file's sha256; a mismatched backbone is one message."""
    file = genesis_file(workdir / "Genesis_Chest_CT.pt", genesis_state_from_our_model(0.25))
    assert _import(str(file), "--format", "genesis", "--name", "genesis") == 0
    capsys.readouterr()
    assert _run_init("--init", "weights:genesis") == 0
    out = capsys.readouterr().out
    assert "Fine-tuning from imported weights genesis" in out
    assert cli.main(["leaderboard", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    by_task = {row["task"]: row for row in rows}
    assert set(by_task) == {"weights:genesis", "scratch"}
    assert by_task["weights:genesis"]["family"] == "imported"

    from medssl_bench.store import ResultStore

    records = ResultStore.existing(str(workdir / "mlflow.db")).results()
    assert {r.task for r in records} == {"weights:genesis", "scratch"}
    assert len({r.subset_hash for r in records}) == 1 and records[0].subset_hash, "same subset"
    (imported,) = [r for r in records if r.task == "weights:genesis"]
    assert imported.versions["task"].startswith("imported:")

    # the dry run names the unit that loads them; its key changes with the file's sha256
    assert _run_init("--init", "weights:genesis", "--dry-run") == 0
    key = _load_key(capsys.readouterr().out)
    (workdir / ".medssl_bench/cache/weights/genesis.safetensors").unlink()
    genesis_file(file, genesis_state_from_our_model(0.25), {"epoch": 1})  # other bytes
    assert _import(str(file), "--format", "genesis", "--name", "genesis") == 0
    capsys.readouterr()
    assert _run_init("--init", "weights:genesis", "--dry-run") == 0
    assert _load_key(capsys.readouterr().out) != key

    assert _run_init("--init", "weights:genesis", "--set", "backbone.width=0.125") != 0
    err = capsys.readouterr().err
    assert "do not fit backbone 'genesis-unet3d'" in err and "backbone.width=0.25" in err
    validate = ["validate", "--protocol", "data-efficiency", "--backbone", "genesis-unet3d",
                "--init", "weights:genesis"]
    assert cli.main(validate) == 0
    assert cli.main([*validate, "--set", "backbone.width=0.125"]) != 0
    assert "backbone.width=0.25" in capsys.readouterr().err
    assert cli.main(["run", "--protocol", "data-efficiency", "--device", "cpu",
                     "--init", "weights:genesis", "--set", *PHANTOM]) != 0
    assert "Add --backbone genesis-unet3d" in capsys.readouterr().err.replace("\n", " ")
    assert _run_init("--init", "weights:nosuch") != 0
    assert "no imported weights named 'nosuch'" in capsys.readouterr().err


def _load_key(out: str) -> str:
    line = next(line for line in out.splitlines() if "load weights:genesis" in line)
    return re.search(r"\b[0-9a-f]{16,}\b", line).group(0)


# --------------------------------------------------------------------------- placement


class _SwinInside(Backbone):
    """Test backbone: MONAI's Swin transformer under a prefix of its own (``body.``) in the
    encoder, the UNETR blocks under another (``blocks.``) in the decoder, its output as out."""

    name = "test-swin-inside"
    spatial_dims = 3

    class Config(PluginConfig):
        feature_size: int = Field(default=12, description="Swin UNETR feature size.")

    def _net(self, in_channels: int, out_channels: int) -> nn.Module:
        from monai.networks.nets import SwinUNETR

        return SwinUNETR(in_channels=in_channels, out_channels=out_channels,
                         feature_size=self.config.feature_size)

    def build_encoder(self, in_channels: int) -> Encoder:
        encoder = Encoder()
        encoder.body = self._net(in_channels, 2).swinViT
        encoder.in_channels, encoder.stem_weight_key = in_channels, "body.patch_embed.proj.weight"
        encoder.feature_channels = [self.config.feature_size * 2**i for i in range(5)]
        return encoder

    def build_decoder(self, encoder: Encoder, out_channels: int,
                      skip_connections: bool = True) -> nn.Module:
        net = self._net(encoder.in_channels, out_channels)
        decoder = nn.Module()
        decoder.blocks = nn.ModuleDict({n: getattr(net, n) for n, _ in net.named_children()
                                        if n not in ("swinViT", "out")})
        decoder.out = net.out
        return decoder


class _TestSwinFormat(SwinUNETRFormat):
    """Test format: Swin UNETR checkpoints for the test backbone."""

    name = "test-swinunetr"
    backbone = "test-swin-inside"


class _TestOrphanFormat(SwinUNETRFormat):
    """Test format: for a backbone nobody installed."""

    name = "test-orphan"
    backbone = "no-such-backbone"


class _TestPlugin:
    @hookimpl
    def bench_register_backbones(self, register):
        register(_SwinInside)

    @hookimpl
    def bench_register_weight_formats(self, register):
        register(_TestSwinFormat)
        register(_TestOrphanFormat)


def test_a_format_whose_backbone_is_not_installed_says_so(workdir):
    registry = build_registry([_TestPlugin()], autoload=False)
    torch.save({"state_dict": _swin_library_state()}, workdir / "swin.pt")
    with pytest.raises(ConfigError, match="maps onto backbone 'no-such-backbone', which is not "
                       "installed"):
        import_weights(registry, workdir / "swin.pt", "test-orphan", workdir / "cache")


def test_library_keys_land_on_a_backbone_that_holds_the_library_modules_under_prefixes(workdir):
    """A whole fine-tuned Swin UNETR (MONAI keys, module. prefix) onto a backbone that keeps
    the transformer as encoder.body.* and the rest as decoder.blocks.* and decoder.out.*:
    every tensor placed, the right values in the right places."""
    registry = build_registry([_TestPlugin()], autoload=False)
    library = _swin_library_state()
    torch.save({"state_dict": {f"module.{k}": v for k, v in library.items()}},
               workdir / "swin.pt")
    prov, report = import_weights(registry, workdir / "swin.pt", "test-swinunetr",
                                  workdir / "cache", name="swin")
    assert report.random == [] and report.dropped == {}
    assert len(report.loaded) == len(library)
    stored = load_weights(workdir / "cache/weights/swin.safetensors")
    pairs = [("encoder", "body.layers1.0.blocks.0.attn.qkv.weight",
              "swinViT.layers1.0.blocks.0.attn.qkv.weight"),
             ("decoder", "blocks.encoder1.layer.conv1.conv.weight",
              "encoder1.layer.conv1.conv.weight"),
             ("decoder", "out.conv.conv.weight", "out.conv.conv.weight")]
    for part, ours, theirs in pairs:
        assert torch.equal(stored[part][ours], library[theirs])
    assert prov.in_channels == 1


@pytest.mark.skipif("swinunetr" not in REGISTRY.names("backbone"),
                    reason="the swinunetr backbone (branch backbones) is not registered yet")
@pytest.mark.parametrize("fmt", ["swinunetr", "voco"])
def test_swin_releases_import_into_the_swinunetr_backbone(workdir, fmt):
    """model_swinvit.pt (the transformer alone) and a VoCo checkpoint (the whole network,
    swin_vit keys), built from the MONAI modules of our swinunetr backbone at its quick preset
    in each release's layout: every tensor of the file lands; the transformer-only release
    leaves the encoder's convolution blocks random, so it needs --allow-partial."""
    from monai.networks.nets.swin_unetr import SwinTransformer

    cls = REGISTRY.get("backbone", "swinunetr")
    values = dict(cls.presets.get("quick", {}))
    backbone = cls(cls.Config.model_validate(values))
    encoder = backbone.build_encoder(1)
    if fmt == "swinunetr":
        swin = next(m for m in encoder.modules() if isinstance(m, SwinTransformer))
        published = {f"module.{k}".replace(".mlp.linear1.", ".mlp.fc1.")
                     .replace(".mlp.linear2.", ".mlp.fc2."): v
                     for k, v in swin.state_dict().items()}
        torch.save({"state_dict": published}, workdir / "model_swinvit.pt")
        file = workdir / "model_swinvit.pt"
        with pytest.raises(WeightsError, match="Partial load refused"):
            import_weights(REGISTRY, file, fmt, workdir / "cache")
    else:
        decoder = backbone.build_decoder(encoder, 2)
        library = {**encoder.state_dict(), **decoder.state_dict()}  # MONAI's own keys
        published = {f"module.{k.replace('swinViT.', 'swin_vit.')}": v
                     for k, v in library.items()}
        torch.save({"state_dict": published}, workdir / "VoCo_10k.pt")
        file = workdir / "VoCo_10k.pt"
    prov, report = import_weights(REGISTRY, file, fmt, workdir / "cache", name=fmt,
                                  allow_partial=fmt == "swinunetr")  # settings read off it
    assert report.dropped == {} and len(report.loaded) == len(published)
    assert {k: prov.backbone_config[k] for k in values} == values
    if fmt == "swinunetr":
        assert report.random and all(k.startswith(("encoder.encoder1.", "encoder.encoder2.",
                                                   "encoder.encoder3.", "encoder.encoder4."))
                                     for k in report.random)
    else:
        assert report.random == []


@pytest.mark.skipif("resenc3d" not in REGISTRY.names("backbone"),
                    reason="the resenc3d backbone (branch backbones) is not registered yet")
@pytest.mark.parametrize("fmt", ["nnunet", "openmind"])
def test_nnunet_checkpoint_imports_into_the_resenc3d_backbone(workdir, fmt):
    """checkpoint_final.pth of the library's ResidualEncoderUNet with our resenc3d's quick
    architecture, in nnU-Net's layout: nothing stays random; only the library's duplicates
    (decoder.encoder.*, all_modules) and deep-supervision heads are dropped."""
    from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet

    cls = REGISTRY.get("backbone", "resenc3d")
    values = dict(cls.presets.get("quick", {}))
    backbone = cls(cls.Config.model_validate(values))
    net = ResidualEncoderUNet(input_channels=1, num_classes=3, conv_op=nn.Conv3d,
                              nonlin=nn.LeakyReLU, deep_supervision=False,
                              **backbone.config.library_kwargs())
    file = nnunet_checkpoint(workdir / "checkpoint_final.pth", net, fmt == "openmind")
    prov, report = import_weights(REGISTRY, file, fmt, workdir / "cache")  # settings read off it
    assert prov.backbone_config == backbone.config.model_dump(mode="json")
    assert report.random == []
    assert report.dropped and all(k.startswith(("decoder.encoder.", "decoder.seg_layers."))
                                  or "all_modules." in k for k in report.dropped)
    assert any(k.startswith("decoder.out.") for k in report.loaded)
