"""``bench weights import`` and ``bench weights list``: published checkpoints in, safetensors
with provenance out (:mod:`medssl_bench.imports`)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from medssl_bench.errors import ConfigError

DEFAULT_CACHE = ".medssl_bench/cache"


def cache_dir(value: str | None) -> Path:
    """``--cache-dir``, else ``BENCH_CACHE_DIR``, else the default ``bench run`` uses."""
    return Path(value or os.environ.get("BENCH_CACHE_DIR") or DEFAULT_CACHE)


def add_parser(sub: Any) -> None:
    """Add ``weights import`` and ``weights list`` to the CLI's subcommands."""
    weights = sub.add_parser("weights", help="Import published pretrained weights; list them.")
    actions = weights.add_subparsers(dest="weights_command", required=True, metavar="ACTION")
    imp = actions.add_parser(
        "import", help="Read a published checkpoint (never running code from it), map it onto "
        "its backbone, report what loaded, and store it as safetensors with its provenance.")
    imp.add_argument("file", help="The checkpoint file you downloaded (nothing is downloaded).")
    imp.add_argument("--format", required=True, help="Its layout: genesis, swinunetr, voco, "
                     "nnunet, openmind or safetensors (`bench plugins` lists weight formats).")
    imp.add_argument("--name", help="Name to use with --init weights:NAME (default: the file's "
                     "name without its suffix).")
    imp.add_argument("--backbone", help="The backbone, for formats that do not say (safetensors).")
    imp.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[],
                     metavar="backbone.KEY=VALUE", help="Backbone settings the weights were "
                     "made with, where the file does not show them.")
    imp.add_argument("--allow-partial", action="store_true", help="Keep an import that leaves "
                     "some of the backbone's weights random.")
    imp.add_argument("--licence", "--license", dest="licence", default="",
                     help="The weights' licence or terms of use, recorded with them.")
    imp.add_argument("--cache-dir", default=None, help="The cache `bench run` uses (default "
                     f"BENCH_CACHE_DIR or {DEFAULT_CACHE}).")
    imp.add_argument("--json", action="store_true", help="Print the report as JSON.")
    lst = actions.add_parser("list", help="Imported weights and their provenance.")
    lst.add_argument("--cache-dir", default=None, help="The cache to list (default "
                     f"BENCH_CACHE_DIR or {DEFAULT_CACHE}).")
    lst.add_argument("--json", action="store_true", help="Print JSON instead of a table.")


def run(args: Any, console: Any) -> int:
    if args.weights_command == "import":
        return _import(args, console)
    return _list(args, console)


def _import(args: Any, console: Any) -> int:
    from medssl_bench.config import parse_overrides
    from medssl_bench.imports import import_weights
    from medssl_bench.plugins import get_registry

    values = parse_overrides(args.overrides)
    other = sorted(set(values) - {"backbone"})
    if other:
        raise ConfigError(f"bench weights import only takes backbone settings (--set "
                          f"backbone.KEY=VALUE); got {', '.join(other)}.")
    prov, report = import_weights(
        get_registry(), args.file, args.format, cache_dir(args.cache_dir), name=args.name,
        backbone=args.backbone, backbone_values=values.get("backbone") or {},
        allow_partial=args.allow_partial, licence=args.licence)
    if args.json:
        print(json.dumps({"provenance": asdict(prov), "loaded": report.loaded,
                          "dropped": report.dropped, "random": report.random}, indent=2))
        return 0
    console.print(f"Imported [bold]{prov.name}[/bold] ({prov.format} -> {prov.backbone} "
                  f"{prov.backbone_config}, {prov.in_channels} input channel(s)) from "
                  f"{prov.source_file} (sha256 {prov.sha256[:16]}...)", highlight=False)
    console.print(f"  loaded: {len(report.loaded)} tensors into {', '.join(prov.parts)}",
                  highlight=False)
    console.print(f"  dropped: {len(report.dropped)}", highlight=False)
    for key, why in report.dropped.items():
        console.print(f"    {key}: {why}", highlight=False, markup=False)
    console.print(f"  random: {len(report.random)}" + (" (--allow-partial)" if report.random
                                                       else ""), highlight=False)
    for key in report.random:
        console.print(f"    {key}", highlight=False, markup=False)
    console.print(f"Fine-tune from them: bench run --protocol data-efficiency --init "
                  f"weights:{prov.name} --backbone {prov.backbone} --dataset ...", highlight=False)
    return 0


def _list(args: Any, console: Any) -> int:
    from rich.table import Table

    from medssl_bench.imports import list_weights

    found = list_weights(cache_dir(args.cache_dir))
    if args.json:
        print(json.dumps([asdict(p) for p in found], indent=2))
        return 0
    if not found:
        console.print("No imported weights yet: `bench weights import FILE --format F`.")
        return 0
    table = Table(title=f"Imported weights ({cache_dir(args.cache_dir)})")
    for column in ("name", "format", "backbone", "config", "loaded", "dropped", "random",
                   "source", "sha256", "licence", "date"):
        table.add_column(column)
    for p in found:
        table.add_row(p.name, p.format, p.backbone, json.dumps(p.backbone_config), str(p.loaded),
                      str(len(p.dropped)), str(len(p.random)), p.source_file, p.sha256[:12],
                      p.licence or "-", p.date)
    console.print(table)
    return 0
