"""Importing published pretrained weights (``bench weights import``) and the store they go to.

A published checkpoint is a pickle; loading a pickle can run any code its author (or
whoever replaced the file) put in it. So a checkpoint is read with
``torch.load(weights_only=True)``, which rebuilds tensors and plain containers only (and, as
nnU-Net's logs need, numpy scalars) and refuses everything else, or from safetensors. The
format plugin (:class:`medssl_bench.interfaces.WeightFormat`) unwraps its nesting and renames
the keys into its network's own state-dict keys; here those keys are placed onto the target
backbone's encoder and decoder (each part may hold the network's modules under a prefix of
its own, found from the keys themselves), every shape is checked against the built backbone,
and the result is stored as safetensors in ``<cache>/weights/NAME.safetensors`` with its
provenance in the header: source file, its sha256, format, backbone and its config, the
user's licence note, the date, and what loaded, was dropped and stayed random.

A run fine-tunes from them with ``--init weights:NAME`` (:class:`ImportedWeights`).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import pickle
import re
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import Field
from safetensors import safe_open
from torch import Tensor

from medssl_bench.config import PluginConfig
from medssl_bench.errors import BenchError, ConfigError, DataError
from medssl_bench.interfaces import Backbone, ProxyTask, WeightFormat
from medssl_bench.weights import StateDicts, load_weights, save_weights

#: ``--init weights:NAME``: fine-tune from imported weights.
INIT_PREFIX = "weights:"
PARTS = ("encoder", "decoder")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class WeightsError(BenchError):
    """An import that cannot be done as asked (a pickle that would run code, a partial load)."""


@dataclass
class ImportReport:
    """What an import did, key by key (target keys are ``part.key``)."""

    loaded: list[str] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)  # source key -> why
    random: list[str] = field(default_factory=list)  # target keys no source weight reached

    @property
    def partial(self) -> bool:
        return bool(self.random)


@dataclass
class Provenance:
    """Where imported weights came from; stored in the safetensors header."""

    name: str
    source_file: str
    sha256: str
    format: str
    backbone: str
    backbone_config: dict[str, Any]
    in_channels: int
    licence: str
    date: str
    parts: list[str]
    loaded: int
    dropped: dict[str, str]
    random: list[str]
    allow_partial: bool

    @classmethod
    def from_header(cls, header: dict[str, Any]) -> Provenance:
        return cls(**{k: header[k] for k in cls.__dataclass_fields__})


# --------------------------------------------------------------------------- reading


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _numpy_safe_globals() -> list[Any]:
    """numpy scalars and dtypes: data, not code (nnU-Net logs numpy floats in its checkpoint)."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy comes with torch
        return []
    core = getattr(np, "_core", None) or np.core
    found = [core.multiarray.scalar, np.dtype]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        found += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return found


def read_checkpoint(path: Path, fmt: WeightFormat) -> Any:
    """What the file holds, read without running code; a file that would run code, or that
    is not a checkpoint at all, is a :class:`WeightsError` naming it."""
    if fmt.reads == "safetensors":
        try:
            from safetensors.torch import load_file

            return load_file(str(path))
        except Exception as exc:
            raise WeightsError(f"{path} is not a safetensors file ({exc}); check --format.") \
                from None
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()), \
                warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f" ({found.group(1)})" if found else ""
        raise WeightsError(
            f"Refused {path.name}: it is not plain weights; loading it would call code it "
            f"names{what}. bench never unpickles arbitrary objects (torch.load "
            "weights_only=True). Get the checkpoint from its authors' official source, or "
            "convert it where you trust it to a state dict of tensors."
        ) from None
    except Exception as exc:
        raise WeightsError(f"{path} cannot be read as a PyTorch checkpoint ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''}); check the file "
                           "and --format.") from None


# --------------------------------------------------------------------------- mapping


def _rewrites(source: list[str], target: dict[str, Tensor]) -> list[tuple[tuple[str, str], int]]:
    """How a part holds the network's modules: ``(drop, add)`` pairs, most keys first, such
    that ``add + key[len(drop):]`` names a target key (``("", "")``: under their own names;
    ``("", "net.")``: wrapped; ``("swinViT.", "body.")``: kept under another name). Up to two
    leading components are dropped, two or more always kept; a rewrite only one key supports
    is not trusted."""
    index: dict[str, list[str]] = {}
    for name in target:
        parts = name.split(".")
        for i in range(len(parts) - 1):
            index.setdefault(".".join(parts[i:]), []).append(".".join(parts[:i]) + "." * bool(i))
    counts: Counter[tuple[str, str]] = Counter()
    for key in source:
        parts = key.split(".")
        for i in range(min(3, len(parts) - 1)):
            drop = ".".join(parts[:i]) + "." * bool(i)
            for add in index.get(key[len(drop):], ()):
                counts[(drop, add)] += 1
    return [(pair, n) for pair, n in counts.most_common() if n > 1 or pair == ("", "")]


def _best_prefix(source: list[str], target: dict[str, Tensor]) -> tuple[str, str]:
    ranked = _rewrites(source, target)
    return ranked[0][0] if ranked else ("", "")


def place(mapped: dict[str, Tensor], targets: dict[str, dict[str, Tensor]],
          dropped: dict[str, str], heads: frozenset[str] = frozenset()) -> tuple[
              StateDicts, ImportReport]:
    """Put every mapped key onto the part whose state dict names it (``part/key`` keys go
    straight there); check shapes; report what loaded, was dropped and stayed random.
    ``heads`` (``part.key``): the output layer, whose shape follows the class count; fine-tuning
    builds its own, so it never counts as random and a class-count mismatch only drops it."""
    report = ImportReport(dropped=dict(dropped))
    parts: StateDicts = {}
    direct = {k for k in mapped if k.partition("/")[0] in targets and "/" in k}
    loose = [k for k in mapped if k not in direct]
    # a key's own name wins; otherwise the rewrite most keys support, over both parts
    ranked = sorted(((math.inf if pair == ("", "") else n, part, pair)
                     for part, sd in targets.items() for pair, n in _rewrites(loose, sd)),
                    key=lambda t: -t[0])
    for key, value in mapped.items():
        if key in direct:
            part, _, name = key.partition("/")
            candidates = [(part, name)]
        else:
            candidates = [(part, add + key[len(drop):]) for _, part, (drop, add) in ranked
                          if key.startswith(drop)]
        # the best-supported home, never a worse one whose shape happens to fit
        spot = next(((p, n) for p, n in candidates if n in targets[p]), None)
        if spot is None:
            report.dropped[key] = "no such layer in the backbone"
            continue
        part, name = spot
        want = targets[part][name]
        if tuple(value.shape) != tuple(want.shape):
            report.dropped[key] = (
                "the original task's output layer (fine-tuning builds its own)"
                if f"{part}.{name}" in heads else
                f"shape {tuple(value.shape)}, the backbone's {part}.{name} is {tuple(want.shape)}")
            continue
        parts.setdefault(part, {})[name] = value.to(want.dtype)
        report.loaded.append(f"{part}.{name}")
    for part, sd in targets.items():
        if part == "decoder" and "decoder" not in parts:
            continue  # encoder-only weights: the decoder is new, as after any pretraining
        report.random += [f"{part}.{k}" for k in sd
                          if k not in parts.get(part, {}) and f"{part}.{k}" not in heads]
    return parts, report


def head_keys(backbone: Backbone, encoder: Any) -> frozenset[str]:
    """The decoder's keys whose shapes follow its output channels (``decoder.KEY``): the
    output layer(s), found by building the decoder for two class counts."""
    one = backbone.build_decoder(encoder, 1).state_dict()
    two = backbone.build_decoder(encoder, 2).state_dict()
    return frozenset(f"decoder.{k}" for k, v in one.items() if k in two and two[k].shape != v.shape)


def own_split(backbone: Backbone, mapped: dict[str, Tensor],
              dropped: dict[str, str]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """A backbone built from another library's modules may say itself how that library's
    state dict maps onto its encoder and decoder: ``split_library_state(state)`` returning
    ``.parts`` (part -> our keys), ``.dropped`` (key -> why) and ``.unmatched`` (keys no rule
    of its maps). Its answer is taken as it is (keys become ``part/key``); a backbone without
    one is matched by names (:func:`place`)."""
    split = getattr(backbone, "split_library_state", None)
    if not callable(split):
        return mapped, dropped
    result = split(mapped)
    placed = {f"{part}/{k}": v for part, sd in result.parts.items() for k, v in sd.items()}
    why = f"no key rule of backbone {backbone.name!r} places it"
    return placed, {**dropped, **result.dropped, **dict.fromkeys(result.unmatched, why)}


def build_targets(backbone: Backbone, mapped: dict[str, Tensor]) -> tuple[
        dict[str, dict[str, Tensor]], int]:
    """The backbone's encoder and decoder state dicts at the checkpoint's input channels and
    decoder outputs (read off the stem's and the ``out`` layer's weights); the channels."""
    probe = backbone.build_encoder(1)
    stem = probe.stem_weight_key
    drop, add = _best_prefix([k for k in mapped if "/" not in k], probe.state_dict())
    source_stem = mapped.get(f"encoder/{stem}", mapped.get(
        drop + stem[len(add):] if stem.startswith(add) else stem, mapped.get(stem)))
    in_channels = int(source_stem.shape[1]) if source_stem is not None and \
        source_stem.dim() > 1 else 1
    encoder = backbone.build_encoder(in_channels)
    decoder = backbone.build_decoder(encoder, 1)
    out_keys = [k for k in decoder.state_dict() if k.startswith("out.") and k.endswith("weight")]
    outs = next((mapped[c] for k in out_keys for c in (f"decoder/{k}", k) if c in mapped), None)
    if outs is not None and outs.shape[0] != 1:
        decoder = backbone.build_decoder(encoder, int(outs.shape[0]))
    encoder_state = encoder.state_dict()
    own = {v.data_ptr() for v in encoder_state.values() if v.numel()}
    # a decoder that holds the encoder (nnU-Net's UNetDecoder) lists its tensors again
    decoder_state = {k: v for k, v in decoder.state_dict().items()
                     if not (v.numel() and v.data_ptr() in own)}
    return {"encoder": encoder_state, "decoder": decoder_state}, in_channels


# --------------------------------------------------------------------------- the store


def weights_dir(cache_dir: Path) -> Path:
    return Path(cache_dir) / "weights"


def weights_path(cache_dir: Path, name: str) -> Path:
    return weights_dir(cache_dir) / f"{name}.safetensors"


def read_provenance(path: Path) -> Provenance:
    try:
        with safe_open(str(path), framework="pt") as fh:
            header = json.loads((fh.metadata() or {}).get("medssl_bench", "{}"))
        return Provenance.from_header(header)
    except Exception as exc:
        raise DataError(f"Imported weights {path} cannot be read ({exc}). Delete the file and "
                        "import the checkpoint again.") from None


def list_weights(cache_dir: Path) -> list[Provenance]:
    return [read_provenance(p) for p in sorted(weights_dir(cache_dir).glob("*.safetensors"))]


def _backbone_instance(registry: Any, name: str, values: dict[str, Any]) -> Backbone:
    cls = registry.get("backbone", name)
    try:
        return cls(cls.Config.model_validate(values))
    except Exception as exc:
        raise ConfigError(f"Backbone {name!r} settings {values} are not valid ({exc}). "
                          f"`bench schema backbone {name}` lists them.") from None


def import_weights(registry: Any, file: str | Path, format_name: str, cache_dir: Path,
                   name: str | None = None, backbone: str | None = None,
                   backbone_values: dict[str, Any] | None = None, allow_partial: bool = False,
                   licence: str = "", echo: Any = print) -> tuple[Provenance, ImportReport]:
    """``bench weights import``: read, map, check, store (see the module docstring)."""
    path = Path(file).expanduser()
    if not path.is_file():
        raise ConfigError(f"{file}: no such file. Give the path of the downloaded checkpoint.")
    fmt_cls = registry.get("weight_format", format_name)
    fmt: WeightFormat = fmt_cls(fmt_cls.Config())
    target = fmt.backbone or backbone
    if not target:
        raise ConfigError(f"--format {format_name} does not say which backbone its weights are "
                          "for: add --backbone NAME (`bench plugins` lists them).")
    if backbone and fmt.backbone and backbone != fmt.backbone:
        raise ConfigError(f"--format {format_name} holds {fmt.backbone!r} weights, not "
                          f"{backbone!r}: drop --backbone or choose another format.")
    name = name or re.sub(r"[^A-Za-z0-9._-]", "-", path.name.split(".")[0]) or "weights"
    if not _NAME.match(name):
        raise ConfigError(f"--name {name!r}: use letters, digits, '.', '_' and '-' only.")
    out = weights_path(cache_dir, name)
    if out.exists():
        raise ConfigError(f"Imported weights named {name!r} exist already ({out}); choose "
                          "another --name or delete that file.")
    digest = sha256_of(path)
    state = fmt.unwrap(read_checkpoint(path, fmt))
    if not state:
        raise WeightsError(f"{path.name} holds no tensors where --format {format_name} keeps "
                           f"them (looked in {', '.join(fmt.nesting)}); check --format.")
    mapped, dropped = fmt.map_keys(state)
    if target not in registry.names("backbone"):
        raise ConfigError(f"--format {format_name} maps onto backbone {target!r}, which is not "
                          f"installed (installed: {', '.join(registry.names('backbone'))}).")
    fields = registry.get("backbone", target).Config.model_fields if \
        target in registry.names("backbone") else {}
    seen = {k: v for k, v in fmt.backbone_config(mapped).items() if k in fields}
    values = {**seen, **(backbone_values or {})}
    net = _backbone_instance(registry, target, values)
    mapped, dropped = own_split(net, mapped, dropped)
    targets, in_channels = build_targets(net, mapped)
    parts, report = place(mapped, targets, dropped, head_keys(net, net.build_encoder(in_channels)))
    if not parts.get("encoder"):
        raise WeightsError(f"Nothing in {path.name} fits backbone {target!r}'s encoder "
                           f"({len(report.dropped)} keys dropped, e.g. "
                           f"{next(iter(report.dropped), '-')}: "
                           f"{next(iter(report.dropped.values()), '-')}); check --format and "
                           "--set backbone.KEY=VALUE.")
    if report.partial and not allow_partial:
        raise WeightsError(
            f"Partial load refused: {len(report.random)} of the backbone's weights would stay "
            f"random (e.g. {', '.join(report.random[:3])}) and {len(report.dropped)} of the "
            f"file's were dropped (e.g. {_examples(report.dropped)}). Check --format and the "
            "backbone settings (--set backbone.KEY=VALUE), or add --allow-partial to keep it.")
    prov = Provenance(
        name=name, source_file=path.name, sha256=digest, format=format_name, backbone=target,
        backbone_config=net.config.model_dump(mode="json"), in_channels=in_channels,
        licence=licence, date=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        parts=sorted(parts), loaded=len(report.loaded), dropped=report.dropped,
        random=report.random, allow_partial=allow_partial)
    save_weights(parts, out, asdict(prov))
    return prov, report


def _examples(dropped: dict[str, str], n: int = 2) -> str:
    return "; ".join(f"{k}: {v}" for k, v in list(dropped.items())[:n]) or "none"


# --------------------------------------------------------------------------- --init


class ImportedWeights(ProxyTask):
    """Weights imported with `bench weights import`: fine-tuned from, never pretrained here."""

    name = "weights"
    family = "imported"
    pretrains = True
    imported: ClassVar[bool] = True

    class Config(PluginConfig):
        weights: str = Field(default="", description="The imported weights' name.")
        sha256: str = Field(default="", description="sha256 of the source checkpoint.")
        format: str = Field(default="", description="The checkpoint's format.")
        backbone: str = Field(default="", description="The backbone the weights are for.")

    def __init__(self, provenance: Provenance, path: Path, spatial_dims: int = 3) -> None:
        super().__init__(self.Config(weights=provenance.name, sha256=provenance.sha256,
                                     format=provenance.format, backbone=provenance.backbone))
        self.name = f"{INIT_PREFIX}{provenance.name}"  # type: ignore[misc]
        self.provenance, self.path = provenance, path
        self.transfers = tuple(provenance.parts)  # type: ignore[misc]
        self.spatial_dims = spatial_dims  # type: ignore[misc]

    def load(self) -> StateDicts:
        """The stored weights, checked against the sha256 their key was made with."""
        weights = load_weights(self.path)
        prov = read_provenance(self.path)
        if prov.sha256 != self.provenance.sha256:
            raise DataError(f"{self.path} changed since this run was planned; rerun.")
        return weights


def resolve_inits(values: list[str], cache_dir: Path, backbone: Backbone) -> list[ImportedWeights]:
    """``--init weights:NAME[,weights:NAME2]``: the imported weights, each checked against
    the run's backbone (name and every stored shape) before anything loads or trains."""
    out: list[ImportedWeights] = []
    for value in (v.strip() for raw in values for v in raw.split(",")):
        if not value:
            continue
        if not value.startswith(INIT_PREFIX) or not value[len(INIT_PREFIX):]:
            raise ConfigError(f"--init {value!r}: give weights:NAME (`bench weights list` shows "
                              "the imported weights).")
        name = value[len(INIT_PREFIX):]
        path = weights_path(cache_dir, name)
        if not path.exists():
            known = [p.stem for p in weights_dir(cache_dir).glob("*.safetensors")]
            raise ConfigError(f"--init {value}: no imported weights named {name!r} in "
                              f"{weights_dir(cache_dir)} (have: {', '.join(known) or 'none'}). "
                              "Import them with `bench weights import FILE --format F --name "
                              f"{name}` (or point --cache-dir / BENCH_CACHE_DIR at their cache).")
        prov = read_provenance(path)
        if prov.backbone != backbone.name:
            raise ConfigError(f"--init {value}: these weights are for backbone "
                              f"{prov.backbone!r}, this run uses {backbone.name!r}. Add "
                              f"--backbone {prov.backbone}.")
        check_fits(value, prov, path, backbone)
        if any(o.provenance.name == name for o in out):
            raise ConfigError(f"--init names {value} twice.")
        out.append(ImportedWeights(prov, path, backbone.spatial_dims))
    return out


def check_fits(value: str, prov: Provenance, path: Path, backbone: Backbone) -> None:
    """Every stored tensor fits the run's backbone as configured, or one message saying
    which settings differ from those the weights were imported with."""
    stored: dict[str, dict[str, tuple[int, ...]]] = {}
    with safe_open(str(path), framework="pt") as fh:  # shapes only: nothing loaded yet
        for flat in fh.keys():
            part, _, key = flat.partition("/")
            stored.setdefault(part, {})[key] = tuple(fh.get_slice(flat).get_shape())
    encoder = backbone.build_encoder(prov.in_channels)
    want = {"encoder": encoder.state_dict()}
    if "decoder" in stored:
        want["decoder"] = backbone.build_decoder(encoder, 1).state_dict()
    heads = head_keys(backbone, encoder) if "decoder" in stored else frozenset()
    wrong = [f"{part}.{k}" for part, sd in stored.items() for k, v in sd.items()
             if k not in want.get(part, {}) or (f"{part}.{k}" not in heads
                                                and tuple(want[part][k].shape) != v)]
    if wrong:
        now = backbone.config.model_dump(mode="json")
        fix = " ".join(f"backbone.{k}={json.dumps(v, separators=(',', ':'))}"
                       for k, v in prov.backbone_config.items() if now.get(k) != v)
        raise ConfigError(f"--init {value}: the weights do not fit backbone {backbone.name!r} "
                          f"as configured (e.g. {wrong[0]}); they were imported with "
                          f"{prov.backbone_config}. Add --set {fix or '(the settings above)'}.")
