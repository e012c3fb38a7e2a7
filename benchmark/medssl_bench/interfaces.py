"""The plugin contract: base classes for proxy tasks, backbones, datasets and protocols.

A plugin class sets ``name`` (unique within its kind), a docstring (its one-line summary is
shown by ``bench plugins``), a nested pydantic ``Config`` derived from
:class:`medssl_bench.config.PluginConfig` and, optionally, ``presets``: named partial
configs (``quick`` for a 2-core CPU in minutes, ``paper`` for the papers' settings).
Instances are built from a validated config: ``TaskClass(TaskClass.Config(...))``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset as TorchDataset

from medssl_bench.config import PluginConfig

PluginKind = Literal["task", "backbone", "dataset", "protocol", "executor", "weight_format"]
DownstreamKind = Literal["segmentation", "classification"]


class Plugin:
    """Common to every plugin kind: a name, a validated config and presets."""

    kind: ClassVar[PluginKind]
    name: ClassVar[str]
    Config: ClassVar[type[PluginConfig]] = PluginConfig
    #: Named partial configs, e.g. ``{"quick": {...}, "paper": {...}}``.
    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    #: The plugin a run uses when the user names none of its kind (for backbones: of the
    #: dataset's spatial dims). Built-in plugins win over third-party ones that claim it too.
    default: ClassVar[bool] = False

    def __init__(self, config: PluginConfig | None = None) -> None:
        self.config = config if config is not None else self.Config()

    @classmethod
    def summary(cls) -> str:
        """The first line of the class docstring."""
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""


# --------------------------------------------------------------------------- backbones


class Encoder(nn.Module):
    """The transferable part of a network: image in, multi-scale features out.

    Subclasses set ``in_channels`` and ``feature_channels`` (one entry per scale, highest
    resolution first). When pretraining and fine-tuning channel counts differ, every
    input-facing weight is adapted (see :func:`medssl_bench.weights.adapt_state_in_channels`);
    ``stem_weight_key`` names the first layer's weight for documentation and tests.
    """

    in_channels: int
    feature_channels: list[int]
    stem_weight_key: str
    spatial_dims: int

    def forward(self, x: Tensor) -> list[Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def embed_dim(self) -> int:
        """Channels of :func:`global_pool` of the features: ``feature_channels[-1]``."""
        return self.feature_channels[-1]


def global_pool(features: list[Tensor]) -> Tensor:
    """The deepest of an encoder's features, averaged over space: ``(B, embed_dim)``.

    Tasks call the encoder itself, ``global_pool(encoder(x))``, never a method beside
    ``forward``: a wrapper of the encoder (``torch.compile``, DDP) only sees ``forward``."""
    return features[-1].flatten(2).mean(-1)


class Backbone(Plugin):
    """A family of networks: builds encoders, segmentation decoders and classifier heads."""

    kind: ClassVar[PluginKind] = "backbone"
    spatial_dims: ClassVar[int]
    #: Capabilities its encoders offer beyond the :class:`Encoder` contract, matched against
    #: :attr:`ProxyTask.requires`. ``"tokens"``: a patch-token encoder with ``patch_size``,
    #: ``tokens(x, masked=None, mask_token=None) -> (B, N, D)`` (masked patches' embeddings
    #: replaced by ``mask_token`` before the position is added: SimMIM), ``on_grid(tokens,
    #: spatial) -> (B, D, *grid)``, ``encode_tokens(tokens, keep_index) -> (B, K, D)`` and
    #: ``forward(x, keep_index=K)`` returning ``[encode_tokens(tokens(x), K)]`` (MAE).
    #: ``"attention"``: layers that mix positions or act per token beyond convolution and
    #: normalisation (a transformer: vit3d, swinunetr), which SparK's hook-emulated sparse
    #: convolution cannot keep sparse.
    provides: ClassVar[tuple[str, ...]] = ()

    def build_encoder(self, in_channels: int) -> Encoder:
        raise NotImplementedError

    def build_decoder(
        self, encoder: Encoder, out_channels: int, skip_connections: bool = True
    ) -> nn.Module:
        """A decoder mapping ``encoder(x)`` back to ``out_channels`` maps at ``x``'s size.

        ``skip_connections=False`` gives the plain encoder-decoder Parts2Whole pretrains.
        The final layer must be the attribute ``out``: fine-tuning replaces it (and only it)
        when a pretrained decoder is reused.
        """
        raise NotImplementedError

    def build_classifier(self, encoder: Encoder, num_classes: int) -> nn.Module:
        """A head mapping ``encoder(x)`` to ``(B, num_classes)`` logits."""
        raise NotImplementedError

    def size_multiple(self) -> int:
        """Every spatial input size must be a multiple of this (e.g. 2**(levels-1))."""
        return 1

    def min_input_size(self) -> int:
        """The smallest spatial size per axis the network accepts."""
        return self.size_multiple()


# --------------------------------------------------------------------------- tasks


#: Method families of proxy tasks (OpenMind's grouping of 3D self-supervised methods).
TASK_FAMILIES = ("restoration", "masked-modelling", "contrastive", "pretext-classification")


class ProxyTask(Plugin):
    """A self-supervised pretraining task.

    The engine calls, per step::

        batch = task.make_batch(images, generator)      # on images.device, torch ops only
        loss, logs = task.compute_loss(encoder, heads, batch)

    ``images`` is a ``(B, C, *spatial)`` float tensor scaled to [0, 1]. ``generator`` is a
    ``torch.Generator`` on the same device; all randomness must come from it so the same
    seed gives the same batches.
    """

    kind: ClassVar[PluginKind] = "task"
    spatial_dims: ClassVar[int]
    #: What pretraining produces for fine-tuning: the encoder alone, or encoder and decoder
    #: (Models Genesis, whose segmentation fine-tuning starts from the pretrained decoder).
    transfers: ClassVar[tuple[str, ...]] = ("encoder",)
    #: False for tasks that start fine-tuning from no pretraining (the scratch baseline).
    pretrains: ClassVar[bool] = True
    #: The baseline role: every protocol runs this task beside the others and compares with
    #: it (differences, tests, annotation saving). The built-in ``scratch`` declares it.
    baseline: ClassVar[bool] = False
    #: The method family (results record it; the leaderboard can group by it): one of
    #: :data:`TASK_FAMILIES`, "" for the baseline.
    family: ClassVar[str] = ""
    #: The input size the task's paper used; benchmarks time batch construction at it.
    paper_input_size: ClassVar[tuple[int, ...]] = (128, 128, 128)
    #: The smallest spatial input the task can work with (contract tests use it).
    min_input_size: ClassVar[tuple[int, ...]] = (16, 16, 16)
    #: Backbone capabilities the task needs (:attr:`Backbone.provides`); ``--task all`` leaves
    #: the task out for a backbone without them, naming it explicitly is refused, and the
    #: contract tests run it on a backbone that has them.
    requires: ClassVar[tuple[str, ...]] = ()
    #: Backbone capabilities the task cannot work with (SparK's sparse convolutions refuse a
    #: patch-token encoder: ``("tokens",)``); ``--task all`` leaves the task out for such a
    #: backbone, naming it explicitly is refused before anything loads.
    refuses: ClassVar[tuple[str, ...]] = ()
    #: The backbone the task's paper defines it on (swinssl3d and voco3d: ``swinunetr``). A
    #: run without ``--backbone`` uses it when every task named prefers the same registered
    #: backbone of the dataset's dims; otherwise the dims' default, with a note.
    preferred_backbone: ClassVar[str | None] = None

    def build_heads(self, backbone: Backbone, encoder: Encoder) -> nn.ModuleDict:
        """The task-specific modules trained beside the encoder (dropped after pretraining,
        except a ``decoder`` entry when ``"decoder"`` is in :attr:`transfers`)."""
        raise NotImplementedError

    def make_batch(self, images: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        """Turn unlabeled images into proxy inputs and targets, on ``images.device``."""
        raise NotImplementedError

    def compute_loss(
        self, encoder: Encoder, heads: nn.ModuleDict, batch: dict[str, Tensor]
    ) -> tuple[Tensor, dict[str, float]]:
        """The loss to minimise and scalar logs (e.g. ``{"acc": 0.7}``)."""
        raise NotImplementedError

    def check_input(self, image_shape: tuple[int, ...], channels: int) -> None:
        """Raise :class:`medssl_bench.errors.ConfigError` if the images cannot be used."""
        if len(image_shape) != self.spatial_dims:
            from medssl_bench.errors import ConfigError

            raise ConfigError(
                f"Task {self.name!r} needs {self.spatial_dims}D images, but the dataset gives "
                f"shape {tuple(image_shape)}. Pick a {len(image_shape)}D task or dataset."
            )


# --------------------------------------------------------------------------- datasets


@dataclass(frozen=True)
class DatasetInfo:
    """What the engine needs to know about a dataset's downstream task."""

    kind: DownstreamKind
    num_classes: int
    channels: int
    image_size: tuple[int, ...]
    class_names: tuple[str, ...]
    #: Metric names the evaluator reports; ``main_metric`` is the one protocols rank by.
    metrics: tuple[str, ...]
    main_metric: str
    #: For segmentation: which classes are foreground (Dice is averaged over these).
    extra: Mapping[str, Any] = field(default_factory=dict)
    #: Metric names where lower is better (a distance, an error); every other metric is
    #: higher-is-better. Ranking, the best entry and the annotation saving honour it.
    lower_is_better: tuple[str, ...] = ()

    @property
    def spatial_dims(self) -> int:
        return len(self.image_size)


@dataclass
class DataSplits:
    """A loaded dataset.

    ``unlabeled`` yields image tensors ``(C, *spatial)``; ``train``/``val``/``test`` yield
    ``(image, target)`` where target is a ``(*spatial)`` long label map (segmentation) or a
    long class index (classification). ``split_hash`` identifies the exact split.
    """

    info: DatasetInfo
    unlabeled: TorchDataset
    train: TorchDataset
    val: TorchDataset
    test: TorchDataset
    split_hash: str
    #: Case identifiers of the labeled train split, in order (for recorded label subsets).
    train_ids: list[str] = field(default_factory=list)
    #: The unit a label fraction counts, per train item (e.g. the source volume of each 2D
    #: slice): a fraction labels that share of the groups, with all their items. Empty: every
    #: item is its own group.
    train_groups: list[str] = field(default_factory=list)


class Dataset(Plugin):
    """A source of unlabeled and labeled images with a fixed, hashed split."""

    kind: ClassVar[PluginKind] = "dataset"
    spatial_dims: ClassVar[int]

    def load(self) -> DataSplits:
        raise NotImplementedError


# --------------------------------------------------------------------------- protocols

#: The figures ``bench report`` can draw; a protocol lists those its results offer
#: (:attr:`Protocol.figures`), and every result records them.
FIGURE_DATA_EFFICIENCY = "data_efficiency"  # test metric against label fraction
FIGURE_CONVERGENCE = "convergence"  # validation metric against fine-tuning epoch


class Protocol(Plugin):
    """An evaluation protocol: turns a run's settings into a plan of units of work.

    Its settings are validated by ``Config`` (the ``protocol`` section). Its spec (defaults of
    every section, presets, version) is the YAML file :meth:`spec_path` names: by default
    ``NAME.yaml`` beside the module that defines the class, so a package ships its protocols
    with their specs.
    """

    kind: ClassVar[PluginKind] = "protocol"
    #: Whether the protocol pretrains on a second corpus (``--pretrain-dataset``): True
    #: requires one, False refuses one (it would be ignored), None accepts either.
    uses_pretrain_dataset: ClassVar[bool | None] = None
    #: The report figures its results offer (:data:`FIGURE_DATA_EFFICIENCY`,
    #: :data:`FIGURE_CONVERGENCE`); recorded with every result.
    figures: ClassVar[tuple[str, ...]] = (FIGURE_DATA_EFFICIENCY,)
    #: The kinds of downstream dataset (``DatasetInfo.kind``) the protocol evaluates on; it
    #: refuses the others in ``plan`` with a ConfigError before anything trains. The
    #: contract tests plan a protocol without "segmentation" here on a classification dataset.
    dataset_kinds: ClassVar[tuple[str, ...]] = ("segmentation", "classification")

    @classmethod
    def spec_path(cls) -> Path:
        """The protocol's spec file."""
        return Path(inspect.getfile(cls)).with_name(f"{cls.name}.yaml")

    def plan(self, ctx: Any) -> Any:
        """The :class:`medssl_bench.plan.Plan` of this run (``ctx``: a
        :class:`medssl_bench.context.RunContext`); loads data through ``ctx.data``."""
        raise NotImplementedError

    def summarize(self, ctx: Any, records: list[Any]) -> None:
        """After the plan ran: print what the protocol adds to the per-run lines (optional)."""


# --------------------------------------------------------------------------- executors


class Executor(Plugin):
    """Runs a plan: every unit once, after the units it depends on (see
    :mod:`medssl_bench.executor`)."""

    kind: ClassVar[PluginKind] = "executor"

    def execute(self, plan: Any, ctx: Any) -> list[Any]:
        """Run ``plan``'s units; the result records of the fine-tunes that ran."""
        raise NotImplementedError

    def writers(self) -> int:
        """How many processes write to the tracking store at once (more than one needs a
        tracking server: SQLite is refused before anything starts)."""
        return 1


# --------------------------------------------------------------------------- weight formats


class WeightFormat(Plugin):
    """A published checkpoint layout that ``bench weights import --format NAME`` reads.

    The format knows its file (how it nests the weights, which prefixes and renamed keys its
    authors used) and the backbone whose network it holds (:attr:`backbone`); the core reads
    the file without running code, asks :meth:`map_keys` for the weights in that network's
    own key space, places them onto the backbone's encoder and decoder by their keys, checks
    every shape against the built backbone and reports what loaded, what was dropped and what
    stayed random (:mod:`medssl_bench.imports`).
    """

    kind: ClassVar[PluginKind] = "weight_format"
    #: The backbone the format's network is (a registered backbone's name); "" when the user
    #: names it (``--backbone``), as for our own safetensors files.
    backbone: ClassVar[str] = ""
    #: How the file is read: ``pickle`` (``torch.load(weights_only=True)``: tensors and plain
    #: containers only) or ``safetensors``.
    reads: ClassVar[Literal["pickle", "safetensors"]] = "pickle"
    #: The containers the weights may sit in, tried in order (``{"state_dict": {...}}``).
    nesting: ClassVar[tuple[str, ...]] = ("state_dict", "model", "network_weights", "net")
    #: Key prefixes stripped wherever they start a key (DataParallel's ``module.``,
    #: ``torch.compile``'s ``_orig_mod.``).
    strip_prefixes: ClassVar[tuple[str, ...]] = ("module.", "_orig_mod.")

    def unwrap(self, obj: Any) -> dict[str, Tensor]:
        """The flat state dict inside what the file holds (first of :attr:`nesting` found)."""
        while isinstance(obj, Mapping) and not any(isinstance(v, Tensor) for v in obj.values()):
            inner = next((obj[k] for k in self.nesting if isinstance(obj.get(k), Mapping)), None)
            if inner is None:
                break
            obj = inner
        if not isinstance(obj, Mapping):
            return {}
        out = {}
        for key, value in obj.items():
            if isinstance(value, Tensor):
                changed = True
                while changed:
                    changed = False
                    for prefix in self.strip_prefixes:
                        if key.startswith(prefix):
                            key, changed = key[len(prefix):], True
                out[key] = value
        return out

    def map_keys(self, state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
        """The weights renamed to the network's own state-dict keys, and the keys dropped on
        purpose with the reason (a pretraining head, a duplicate). The core places every
        returned key onto the backbone's encoder or decoder."""
        return dict(state), {}

    def backbone_config(self, state: dict[str, Tensor]) -> dict[str, Any]:
        """Backbone settings the checkpoint itself shows (a width read off a weight's shape);
        the user's ``--set backbone.KEY=VALUE`` wins, and names the backbone's Config lacks are
        left out (an inference, not an order)."""
        return {}
