"""The published checkpoint layouts ``bench weights import`` reads, each mapped onto the
backbone whose network it holds. Facts about each layout (read from the authors' loading
code; nothing here is copied from it):

- ``genesis``: Models Genesis ``Genesis_Chest_CT.pt``, ``{"state_dict": {...}}`` saved from a
  ``DataParallel`` model (``module.`` prefix), the keys of ``pytorch/unet3d.py``
  (``genesis-unet3d`` keeps them; only ``out_tr.final_conv`` is our decoder's ``out``).
- ``swinunetr``: Swin UNETR's ``model_swinvit.pt`` (``{"state_dict": {"module.patch_embed..",
  "module.layers1.0.blocks.0.mlp.fc1.weight", ..}}``: the Swin transformer alone, timm's
  ``fc1``/``fc2`` MLP names, which MONAI calls ``linear1``/``linear2``), or MONAI's
  ``ssl_pretrained_weights.pth`` (``{"model": {"encoder.layers1.0.0.blocks..", ..}}``,
  renamed by MONAI's own ``filter_swinunetr``). Both land in ``monai.networks.nets.SwinUNETR``'s
  keys (``swinViT.*``, ``encoder1.*``, ``decoder5.*``, ``out.*``).
- ``voco``: VoCo's Swin UNETR checkpoints: ``module.`` prefixes and ``swin_vit`` where MONAI
  has ``swinViT``.
- ``nnunet``: nnU-Net v2 ``checkpoint_final.pth``: ``{"network_weights": {...}, "init_args":
  .., "trainer_name": .., "optimizer_state": ..}`` with the keys of
  ``dynamic_network_architectures``' ``ResidualEncoderUNet`` (``encoder.*``, ``decoder.*``;
  ``decoder.encoder.*`` repeats the encoder, which the decoder holds a reference to).
- ``openmind``: OpenMind (nnssl) ResEnc-L checkpoints: the same dict layout, keys possibly
  behind ``torch.compile``'s ``_orig_mod.``. (Its Primus checkpoints are not mapped yet.)
- ``safetensors``: a file of ours (``encoder/KEY``, ``decoder/KEY``, as the pretraining cache
  writes), for the backbone named with ``--backbone``.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

from torch import Tensor

from medssl_bench.config import PluginConfig
from medssl_bench.errors import ConfigError
from medssl_bench.interfaces import WeightFormat


def _rename(state: dict[str, Tensor], pairs: tuple[tuple[str, str], ...]) -> dict[str, Tensor]:
    out = {}
    for key, value in state.items():
        for old, new in pairs:
            key = key.replace(old, new)
        out[key] = value
    return out


class GenesisFormat(WeightFormat):
    """Models Genesis (Genesis_Chest_CT.pt): its 3D U-Net, encoder and decoder."""

    name = "genesis"
    backbone = "genesis-unet3d"

    class Config(PluginConfig):
        pass

    def map_keys(self, state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
        return _rename(state, (("out_tr.final_conv.", "out."),)), {}

    def backbone_config(self, state: dict[str, Tensor]) -> dict[str, Any]:
        config: dict[str, Any] = {}
        stem = state.get("down_tr64.ops.0.conv1.weight")
        if stem is not None:
            config["width"] = stem.shape[0] / 32
        if any(k.endswith("activation.weight") for k in state):
            config["act"] = "prelu"
        return config


class SwinUNETRFormat(WeightFormat):
    """Swin UNETR self-supervised weights (model_swinvit.pt, MONAI's ssl_pretrained_weights.pth)."""

    name = "swinunetr"
    backbone = "swinunetr"
    #: timm's MLP names in the Swin UNETR release; MONAI's MLPBlock calls them linear1/2.
    RENAMES: ClassVar[tuple[tuple[str, str], ...]] = ((".mlp.fc1.", ".mlp.linear1."),
                                                      (".mlp.fc2.", ".mlp.linear2."))

    class Config(PluginConfig):
        pass

    def map_keys(self, state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
        if any(k.startswith("encoder.layers") or k.startswith("encoder.patch_embed")
               for k in state):  # MONAI's ssl_pretrained_weights.pth: its own filter
            from monai.networks.nets.swin_unetr import filter_swinunetr

            out, dropped = {}, {}
            for key, value in state.items():
                kept = filter_swinunetr(key, value)
                if kept is None:
                    dropped[key] = "a pretraining head (MONAI's filter_swinunetr drops it)"
                else:
                    out[kept[0]] = kept[1]
            return out, dropped
        out = {}
        for key, value in _rename(state, self.RENAMES).items():
            if key.startswith(("patch_embed.", "layers1.", "layers2.", "layers3.", "layers4.")):
                key = f"swinViT.{key}"  # model_swinvit.pt: the transformer's keys alone
            out[key] = value
        return out, {}

    def backbone_config(self, state: dict[str, Tensor]) -> dict[str, Any]:
        return swin_config(state)


def swin_config(state: dict[str, Tensor]) -> dict[str, Any]:
    """Swin UNETR settings read off MONAI-named weights: feature size (patch embedding),
    blocks and heads per stage, window side ((2w-1)^3 relative positions), v2 (layersNc)."""
    config: dict[str, Any] = {}
    embed = state.get("swinViT.patch_embed.proj.weight")
    if embed is not None:
        config["feature_size"] = int(embed.shape[0])
    depths, heads = [], []
    for stage in range(1, 5):
        blocks = {int(m.group(1)) for k in state
                  if (m := re.match(rf"swinViT\.layers{stage}\.0\.blocks\.(\d+)\.", k))}
        table = state.get(f"swinViT.layers{stage}.0.blocks.0.attn.relative_position_bias_table")
        if not blocks or table is None:
            return config
        depths.append(max(blocks) + 1)
        heads.append(int(table.shape[1]))
        side = round(table.shape[0] ** (1 / 3))
        config["window_size"] = (side + 1) // 2
    config.update(depths=depths, num_heads=heads,
                  use_v2=any(k.startswith("swinViT.layers1c.") for k in state))
    return config


class VoCoFormat(SwinUNETRFormat):
    """VoCo's Swin UNETR weights (swin_vit keys renamed to MONAI's swinViT)."""

    name = "voco"

    def map_keys(self, state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
        return super().map_keys(_rename(state, (("swin_vit.", "swinViT."),)))


class NNUNetFormat(WeightFormat):
    """nnU-Net v2 ResEnc checkpoints (checkpoint_final.pth, network_weights)."""

    name = "nnunet"
    backbone = "resenc3d"
    nesting = ("network_weights", "state_dict", "model")

    class Config(PluginConfig):
        pass

    def map_keys(self, state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
        out, dropped = {}, {}
        for key, value in state.items():
            if key.startswith("decoder.encoder."):
                dropped[key] = "a copy of encoder.* (the decoder holds the encoder)"
            else:
                out[key] = value
        return out, dropped


    def backbone_config(self, state: dict[str, Tensor]) -> dict[str, Any]:
        """ResEnc settings read off the weights: stages and blocks per stage (the encoder's
        keys), first and largest feature counts, kernel side, decoder convs per stage."""
        blocks: dict[int, int] = {}
        for key in state:
            if m := re.match(r"encoder\.stages\.(\d+)\.blocks\.(\d+)\.", key):
                stage, block = int(m.group(1)), int(m.group(2))
                blocks[stage] = max(blocks.get(stage, 0), block + 1)
        stem = state.get("encoder.stem.convs.0.conv.weight")
        if not blocks or stem is None:
            return {}
        widths = [state[f"encoder.stages.{s}.blocks.0.conv1.conv.weight"].shape[0]
                  for s in sorted(blocks) if f"encoder.stages.{s}.blocks.0.conv1.conv.weight"
                  in state]
        convs = {int(m.group(1)) for k in state
                 if (m := re.match(r"decoder\.stages\.0\.convs\.(\d+)\.", k))}
        config: dict[str, Any] = {
            "n_stages": len(blocks), "blocks_per_stage": [blocks[s] for s in sorted(blocks)],
            "base_features": int(stem.shape[0]), "kernel_size": int(stem.shape[-1])}
        if widths:
            config["max_features"] = int(max(widths))
        if convs:
            config["decoder_convs"] = max(convs) + 1
        return config


class OpenMindFormat(NNUNetFormat):
    """OpenMind (nnssl) ResEnc-L checkpoints (network_weights; Primus not mapped yet)."""

    name = "openmind"

    def map_keys(self, state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
        if any(k.startswith(("eva.", "down_projection.")) for k in state):
            raise ConfigError(
                "This is an OpenMind Primus checkpoint (eva.* blocks): not importable yet. "
                "Primus' EVA blocks (rotary position embeddings) are not vit3d's timm blocks, "
                "so its weights would not compute what they were trained to; import a ResEnc-L "
                "checkpoint.")
        return super().map_keys(state)


class SafetensorsFormat(WeightFormat):
    """Our own safetensors weights (encoder/KEY, decoder/KEY) for the backbone given."""

    name = "safetensors"
    reads = "safetensors"

    class Config(PluginConfig):
        pass
