"""Run the real engine (``engine.pretrain`` and ``engine.finetune``: the training loop, its
runtime, bf16 autocast on CUDA, the optimizers and schedules) for every registered 3D
pretraining task on the built-in phantom at a small size, on the device you name. What the
unit tests cannot do on a CPU-only CI: exercise the CUDA paths end to end. No tracking
store is needed (MLflow is not imported).

    python benchmarks/engine_check.py --device cuda --json

Per task: pretraining seconds and final loss, fine-tuning test Dice and seconds; a task that
fails shows its error and the others go on (exit 1 if any failed). Options:
``--compile`` (``pretrain.compile``/``finetune.compile``), ``--optimizer``, ``--schedule``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
import traceback

import torch


def host() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return f"{platform.processor() or platform.machine()} CPU, torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--size", type=int, default=64, help="phantom edge length (default 64)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--iterations", type=int, default=4, help="steps per epoch")
    p.add_argument("--tasks", default=None, help="comma-separated (default: every 3D task)")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--optimizer", default="adam")
    p.add_argument("--schedule", default="constant")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    from medssl_bench.device import configure_backend
    from medssl_bench.engine import FinetuneConfig, PretrainConfig, finetune, pretrain, subset
    from medssl_bench.plugins import build_registry

    device = torch.device(args.device)
    configure_backend(device)
    registry = build_registry(autoload=False)
    names = (args.tasks.split(",") if args.tasks else
             [n for n in registry.names("task") if registry.get("task", n).spatial_dims == 3
              and registry.get("task", n).pretrains])
    dataset_cls = registry.get("dataset", "phantom3d")
    dataset = dataset_cls(dataset_cls.Config(size=args.size, n_unlabeled=8, n_train=4, n_val=2,
                                             n_test=2))
    data = dataset.load()
    backbone_cls = registry.get("backbone", "unet3d")
    backbone = backbone_cls(backbone_cls.Config(**backbone_cls.presets.get("quick", {})))
    common = {"optimizer": args.optimizer, "schedule": args.schedule, "compile": args.compile}
    pre_cfg = PretrainConfig(epochs=args.epochs, iterations_per_epoch=args.iterations,
                             batch_size=2, **common)
    ft_cfg = FinetuneConfig(epochs=args.epochs, warmup_epochs=1, iterations_per_epoch=args.iterations,
                            lr=1e-3, **common)
    rows, failed = [], 0
    for name in names:
        cls = registry.get("task", name)
        task = cls(cls.Config(**cls.presets.get("quick", {})))
        row: dict = {"task": name}
        try:
            t0 = time.perf_counter()
            result = pretrain(task, backbone, data.unlabeled, data.info, pre_cfg, device, 0)
            row["pretrain_s"] = round(time.perf_counter() - t0, 2)
            row["pretrain_loss"] = result.history[-1]["pretrain_loss"]
            t0 = time.perf_counter()
            tuned = finetune(backbone, data.info, subset(data.train, range(len(data.train))),
                             data.val, data.test, result.weights, ft_cfg, device, 0)
            row["finetune_s"] = round(time.perf_counter() - t0, 2)
            row["test_dice_mean"] = tuned.test_metrics.get("dice_mean")
            if not math.isfinite(row["pretrain_loss"]):
                raise RuntimeError(f"non-finite pretraining loss {row['pretrain_loss']}")
        except Exception as exc:  # report and go on
            failed += 1
            row["error"] = f"{type(exc).__name__}: {exc}"
            row["trace"] = traceback.format_exc(limit=4)
        rows.append(row)
        print(json.dumps(row) if not args.json else "", end="\n" if not args.json else "",
              file=sys.stderr)
    out = {"host": host(), "size": args.size, "compile": args.compile, "rows": rows}
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        print(f"host: {out['host']}")
        for r in rows:
            print(r)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
