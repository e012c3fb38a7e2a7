"""Running one unit of a plan: a pretraining (train once, then reuse its cached encoder;
resume an interrupted one from its last epoch checkpoint), a fine-tune (skip it when a
finished run has its key; record its result) or a probe of the frozen encoder (features
extracted once per encoder, split and pooling, cached; a probe per label subset). Every
executor runs units through these functions, so skipping, resuming and recording behave the
same however units are scheduled.
"""

from __future__ import annotations

import math
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from medssl_bench.checkpoint import load_checkpoint, save_checkpoint
from medssl_bench.context import Outcome, RunContext
from medssl_bench.engine import (
    build_downstream,
    check_input_size,
    finetune,
    pad_to_multiple,
    pretrain,
    subset,
)
from medssl_bench.errors import BenchError, ConfigError, TrackingUnavailable
from medssl_bench.identity import ids_hash, key_of, semantic
from medssl_bench.leases import Holder, RunningElsewhere
from medssl_bench.plan import FinetuneUnit, Plan, PretrainUnit, ProbeUnit, task_version
from medssl_bench.runtime import Runtime
from medssl_bench.store import ResultIdentity, ResultRecord
from medssl_bench.weights import StateDicts, load_weights, save_weights

#: Seconds to sleep after every epoch (pretraining and fine-tuning): a test hook that makes
#: the kill-and-resume test deterministic on busy machines. Unset in normal use.
EPOCH_DELAY_ENV = "MEDSSL_BENCH_TEST_EPOCH_DELAY"


#: A file whose existence holds every epoch's end (after its checkpoint) until it is
#: removed: a test hook that stops a sweep's units mid-way for as long as a test needs.
EPOCH_GATE_ENV = "MEDSSL_BENCH_TEST_EPOCH_GATE"


def _test_delay() -> None:
    delay = float(os.environ.get(EPOCH_DELAY_ENV, "0") or 0)
    if delay > 0:
        time.sleep(delay)
    gate = os.environ.get(EPOCH_GATE_ENV)
    while gate and os.path.exists(gate):
        time.sleep(0.1)


@dataclass
class Pretrained:
    """What a finished pretraining unit hands to its fine-tunes."""

    weights: StateDicts | None
    run_id: str


def cache_path(ctx: RunContext, unit: PretrainUnit) -> Path:
    return ctx.cache_dir / "pretrain" / f"{unit.key}.safetensors"


def _start_pretrain(ctx: RunContext, unit: PretrainUnit) -> str:
    task, dataset = ctx.task(unit.task), ctx.plugins[unit.corpus]
    params = {"task": task.config.model_dump(mode="json"),
              "backbone": ctx.plugins["backbone"].config.model_dump(mode="json"),
              "dataset": dataset.config.model_dump(mode="json")}
    if unit.weights:  # imported: where they came from, not how they were pretrained
        params["imported_weights"] = vars(task.provenance) | {"random": len(
            task.provenance.random), "dropped": len(task.provenance.dropped)}
    elif unit.pretrains:
        params["pretrain"] = ctx.run.configs["pretrain"].model_dump(mode="json")
    return ctx.store.start_pretrain(ctx.run.spec.name, ctx.run.spec.version, unit.run_name,
                                    unit.key, task=unit.task,
                                    backbone=ctx.plugins["backbone"].name, dataset=dataset.name,
                                    params=params)


def run_pretrain(ctx: RunContext, unit: PretrainUnit) -> Pretrained:
    """Train the unit's task once (cached by its key), or reuse the cached encoder."""
    store = ctx.store
    parent = store.find(ctx.run.spec.name, unit.key)
    if unit.weights:
        return _load_imported(ctx, unit, parent)
    if not unit.pretrains:
        return Pretrained(None, parent or _record_only(ctx, unit, None))
    cache = cache_path(ctx, unit)
    runtime = ctx.runtime
    assert runtime is not None
    # rank 0 reads the cache and every process gets its answer (the cache folder may be
    # local to each node)
    cached = runtime.from_main(lambda: load_weights(cache) if cache.exists() and not ctx.force
                               else None)
    if cached is not None:
        weights = cached
        run_id = parent or _record_only(ctx, unit, cache)
        ctx.outcomes.append(Outcome(f"pretrain {unit.task} on {ctx.plugins[unit.corpus].name}",
                                    "reused", str(cache), unit.task, "pretrain"))
        ctx.echo(f"Reusing pretrained {unit.task} encoder from {cache}")
        return Pretrained(weights, run_id)
    holder = store.holder_elsewhere(ctx.run.spec.name, unit.key)
    if holder is not None:  # another worker trains it now: its fine-tunes wait for that one
        raise RunningElsewhere(holder)
    checkpoint = cache.with_name(f"{unit.key}.ckpt.safetensors")
    task, data = ctx.task(unit.task), ctx.data(unit.corpus)
    run_id = _start_pretrain(ctx, unit)  # claims the unit (RunningElsewhere when lost)
    resume = runtime.from_main(lambda: _resume_state(ctx, checkpoint))  # once the unit is ours
    try:
        if resume is not None:
            store.mark_resumed(run_id, resume["epoch"])
            for epoch, logs in enumerate(resume["history"]):
                store.log_epoch(run_id, logs, epoch)
            ctx.echo(f"Resuming {unit.what} from its epoch-{resume['epoch']} checkpoint")
            # checkpoints from before device_type was stored: a CUDA generator's state
            # is 16 bytes, a CPU one's 5056
            written_on = resume.get("device_type") or (
                "cuda" if resume["generator"].numel() == 16 else "cpu")
            if written_on != ctx.device.type:
                ctx.echo(f"[yellow]The checkpoint was written on {written_on}, this run is on "
                         f"{ctx.device.type}[/yellow]: weights, optimizer and epoch carry "
                         "over; the random batch stream restarts (results will differ from "
                         "an uninterrupted run).")

        def on_checkpoint(state: dict[str, Any]) -> None:
            save_checkpoint(state, checkpoint)
            _test_delay()

        result = pretrain(
            task, ctx.plugins["backbone"], data.unlabeled, data.info, ctx.run.configs["pretrain"],
            ctx.device, ctx.run.configs["protocol"].pretrain_seed,
            on_epoch=lambda logs, epoch: store.log_epoch(run_id, logs, epoch),
            progress=ctx.progress, resume=resume, on_checkpoint=on_checkpoint,
            runtime=runtime, probe=pretraining_probe(ctx),
        )
        if runtime.is_main:
            save_weights(result.weights, cache, {"pretrain_key": unit.key, "task": unit.task})
            checkpoint.unlink(missing_ok=True)
        store.log_pretrained(run_id, cache, result.seconds)
    except BaseException as exc:
        store.fail(run_id, exc)
        raise
    store.finish(run_id)
    detail = f"{result.seconds:.0f}s" + (f", resumed at epoch {resume['epoch']}" if resume else "")
    ctx.outcomes.append(Outcome(unit.what, "ran", detail, unit.task, "pretrain"))
    return Pretrained(result.weights, run_id)


def _load_imported(ctx: RunContext, unit: PretrainUnit, parent: str | None) -> Pretrained:
    """Imported weights (``--init weights:NAME``) stand where a pretraining's would: loaded
    from the weights store, their parent run recording where they came from."""
    task = ctx.task(unit.task)
    weights = task.load()
    run_id = parent or _record_only(ctx, unit, task.path)
    ctx.outcomes.append(Outcome(unit.what, "reused", str(task.path), unit.task, "pretrain"))
    ctx.echo(f"Fine-tuning from imported weights {unit.weights} ({task.provenance.format}, "
             f"{task.provenance.source_file}, sha256 {task.provenance.sha256[:12]})")
    return Pretrained(weights, run_id)


def pretraining_probe(ctx: RunContext) -> Any:
    """The k-NN probe a pretraining logs every ``pretrain.probe_every`` epochs: on up to
    ``pretrain.probe_cases`` labelled training cases of the run's dataset (the same cases for
    every task), queried by its validation split. None when off, or (with a message) when the
    dataset is not a classification dataset."""
    from medssl_bench.engine import label_subset
    from medssl_bench.probe import knn_probe
    from medssl_bench.runtime import Runtime

    cfg = ctx.run.configs["pretrain"]
    if not cfg.probe_every:
        return None
    data = ctx.data("dataset")
    if data.info.kind != "classification":
        ctx.echo(f"[yellow]pretrain.probe_every[/yellow]: the probe needs a classification "
                 f"dataset ({ctx.plugins['dataset'].name} is {data.info.kind}); not probed.")
        return None
    n = len(data.train)
    cases = label_subset(n, min(1.0, cfg.probe_cases / n), 0, data.train_groups)
    return knn_probe(subset(data.train, cases), data.val, data.info,
                     ctx.runtime or Runtime.local(ctx.device),
                     ctx.plugins["backbone"].size_multiple(),
                     batch_size=ctx.run.configs["finetune"].eval_batch_size)


def _record_only(ctx: RunContext, unit: PretrainUnit, cache: Path | None) -> str:
    """A FINISHED parent run for a pretraining that trains nothing now (none needed, or its
    cached encoder reused); closed as KILLED if interrupted while being written."""
    run_id = _start_pretrain(ctx, unit)
    try:
        if cache is not None:
            ctx.store.mark_reused(run_id, cache)
        ctx.store.finish(run_id)
    except BaseException as exc:
        ctx.store.fail(run_id, exc)
        raise
    return run_id


def _resume_state(ctx: RunContext, checkpoint: Path) -> dict[str, Any] | None:
    """The last epoch checkpoint of an interrupted pretraining, unless --force."""
    if not checkpoint.exists():
        return None
    if ctx.force:
        checkpoint.unlink()
        return None
    try:
        return load_checkpoint(checkpoint)
    except BenchError as exc:
        ctx.echo(f"[yellow]Ignoring a damaged checkpoint[/yellow]: {exc}")
        checkpoint.unlink(missing_ok=True)
        return None


def identity(ctx: RunContext, unit: FinetuneUnit) -> ResultIdentity:
    """What the result of ``unit`` is, before it runs (the store tags the run with it)."""
    reg, backbone = ctx.registry, ctx.plugins["backbone"]
    dataset, data = ctx.plugins["dataset"], ctx.data("dataset")
    versions = {"task": task_version(reg, ctx.task(unit.task)),
                "backbone": reg.distribution_version("backbone", backbone.name),
                "dataset": reg.distribution_version("dataset", dataset.name)}
    return ResultIdentity(
        protocol=ctx.run.spec.name, spec_version=ctx.run.spec.version,
        dataset=dataset.name, task=unit.task, backbone=backbone.name,
        pretrain_dataset=unit.pretrain_dataset, dataset_ref=unit.dataset_ref,
        fraction=unit.fraction, seed=unit.seed, n_labeled=len(unit.indices),
        subset_hash=ids_hash(list(unit.subset_ids)), subset_ids=list(unit.subset_ids),
        split_hash=data.split_hash, metric=unit.metric, run_key=unit.key,
        pretrain_key=unit.pretraining, setup=unit.setup, task_setup=unit.task_setup,
        baseline=unit.baseline, higher_is_better=unit.metric not in data.info.lower_is_better,
        label=unit.label, family=ctx.task(unit.task).family,
        figures=list(ctx.plugins["protocol"].figures), target=unit.target,
        configs=ctx.run.as_dict() | {"task": ctx.task(unit.task).config.model_dump(mode="json")},
        versions=versions | ctx.store.versions, git_sha=ctx.store.git_sha,
        device=str(ctx.device),
    )


#: The outcome detail of a unit another live process holds (executors look for it).
ELSEWHERE = "running elsewhere"


def _elsewhere(ctx: RunContext, unit: FinetuneUnit, holder: Holder) -> None:
    """A fine-tune or probe held by another live process: skipped here, saying where."""
    ctx.outcomes.append(Outcome(unit.what, "skipped", f"{ELSEWHERE}: {holder.where()}",
                                unit.task, unit.stage))
    return None


def run_finetune(ctx: RunContext, unit: FinetuneUnit, start: Pretrained) -> ResultRecord | None:
    """Fine-tune, test and record one unit; None when it was reused, skipped or failed (its
    outcome says which). A failure is recorded as FAILED and does not raise."""
    store, protocol = ctx.store, ctx.run.spec.name
    if not ctx.force and store.find(protocol, unit.key) is not None:
        ctx.outcomes.append(Outcome(unit.what, "reused", task=unit.task))
        return None
    holder = store.holder_elsewhere(protocol, unit.key)
    if holder is not None:
        return _elsewhere(ctx, unit, holder)
    data, cfg = ctx.data("dataset"), ctx.run.configs["finetune"]
    who = identity(ctx, unit)
    params = {"fraction": unit.fraction, "seed": unit.seed, "n_labeled": len(unit.indices),
              "finetune": cfg.model_dump(mode="json"),
              "protocol": ctx.run.configs["protocol"].model_dump(mode="json")}
    try:
        run_id = store.start_finetune(who, unit.what, params, start.run_id)
    except RunningElsewhere as exc:  # lost the claim to a process that started it meanwhile
        return _elsewhere(ctx, unit, exc.holder)
    t0 = time.perf_counter()
    epoch_seconds: list[float] = []

    def on_epoch(logs: dict[str, float], epoch: int) -> None:
        # wall time per epoch feeds the convergence protocol's time-to-target
        epoch_seconds.append(time.perf_counter() - t0)
        store.log_epoch(run_id, {**logs, "elapsed_seconds": epoch_seconds[-1]}, epoch)
        _test_delay()

    try:
        result = finetune(
            ctx.plugins["backbone"], data.info, subset(data.train, unit.indices), data.val,
            data.test, start.weights, cfg, ctx.device, unit.seed,
            on_epoch=on_epoch, progress=ctx.progress, label=unit.what, select_metric=unit.metric,
            runtime=ctx.runtime,
        )
        value = result.test_metrics.get(unit.metric, math.nan)
        record = ResultRecord(
            **who.model_dump(), value=value, test_metrics=result.test_metrics,
            val_history=result.val_history, best_epoch=result.best_epoch,
            epoch_seconds=list(epoch_seconds), seconds=result.seconds,
        )
        store.finish_finetune(run_id, record, ctx.run.as_dict())
    except TrackingUnavailable:
        raise  # the store is gone: every later unit would fail the same way
    except Exception as exc:
        store.fail(run_id, exc)
        if ctx.distributed:
            raise
        detail = str(exc) if isinstance(exc, BenchError) else traceback.format_exc(limit=3)
        ctx.outcomes.append(Outcome(unit.what, "failed", detail, unit.task))
        ctx.echo(f"[red]FAILED[/red] {unit.what}: {exc}")
        return None
    except BaseException as exc:
        store.fail(run_id, exc)
        raise
    ctx.outcomes.append(Outcome(unit.what, "ran", f"{unit.metric}={value:.4f}", unit.task))
    ctx.echo(f"{unit.what}: test {unit.metric} = {value:.4f} ({result.seconds:.0f}s)")
    return record


# --------------------------------------------------------------------------- probes

SPLITS = ("train", "val", "test")


def features_path(ctx: RunContext, unit: ProbeUnit) -> Path:
    """Where the frozen encoder's features of the labelled splits are cached: one file per
    (pretrained encoder, dataset split, pooling), shared by every probe, seed and fraction.
    The short last part hashes what else changes the features (the dataset's settings, the
    channel adaptation, the precision, the seed of an encoder that was not pretrained)."""
    dataset, data = ctx.plugins["dataset"], ctx.data("dataset")
    cfg = ctx.run.configs["finetune"]
    rest = key_of({"dataset": [dataset.name, semantic(dataset.config)],
                   "backbone": [ctx.plugins["backbone"].name,
                                semantic(ctx.plugins["backbone"].config)],
                   "channel_adaptation": cfg.channel_adaptation, "amp": cfg.amp,
                   "init_seed": ctx.run.configs["protocol"].pretrain_seed}, 8)
    return (ctx.cache_dir / "features"
            / f"{unit.pretraining}-{data.split_hash}-{unit.pooling}-{rest}.safetensors")


def probe_features(ctx: RunContext, unit: ProbeUnit, start: Pretrained) -> dict[str, Tensor]:
    """``{split}_x`` (pooled features) and ``{split}_y`` (labels) of the train, val and test
    splits, from the cache or from one pass of the frozen encoder (then cached)."""
    from safetensors.torch import load_file, save_file

    from medssl_bench.probe import encode

    path = features_path(ctx, unit)
    memo = ctx.memo.setdefault("features", {})
    if str(path) in memo:
        return memo[str(path)]
    main = ctx.runtime or Runtime.local(ctx.device)

    def cached() -> dict[str, Tensor] | None:
        if not path.exists() or ctx.force:
            return None
        try:
            return load_file(str(path))
        except Exception as exc:  # a damaged cache file is recomputed, never trusted
            ctx.echo(f"[yellow]Ignoring a damaged feature cache[/yellow] {path}: {exc}")
            return None

    # under DDP rank 0's cache decides for every process (they encode together, or none)
    found = main.from_main(cached)
    if found is not None:
        memo[str(path)] = found
        return found
    data, cfg, backbone = ctx.data("dataset"), ctx.run.configs["finetune"], ctx.plugins["backbone"]
    with torch.random.fork_rng(devices=[]):  # an encoder not pretrained: a seeded random one
        torch.manual_seed(ctx.run.configs["protocol"].pretrain_seed)
        model = build_downstream(backbone, data.info, start.weights, cfg)
    runtime = main.configured(cfg)  # under DDP each process encodes its share of the cases
    encoder = runtime.place(model.encoder)
    for p in encoder.parameters():
        p.requires_grad_(False)
    out: dict[str, Tensor] = {}
    for split in SPLITS:
        x, y = encode(encoder, getattr(data, split), runtime, backbone.size_multiple(),
                      unit.pooling, cfg.eval_batch_size)
        out[f"{split}_x"], out[f"{split}_y"] = x.contiguous(), y.contiguous()
    if ctx.runtime is None or ctx.runtime.is_main:  # under DDP rank 0 writes the cache
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # processes never share one
        save_file(out, str(tmp), metadata={"pretrain_key": unit.pretraining,
                                           "pooling": unit.pooling})
        os.replace(tmp, path)
    ctx.echo(f"Features of the frozen {unit.task} encoder ({unit.pooling} pooling) cached at "
             f"{path}")
    memo[str(path)] = out
    return out


def probe_scores(unit: ProbeUnit, feats: dict[str, Tensor], info: Any,
                 metric: str) -> tuple[Any, list[dict[str, float]]]:
    """Test scores of ``unit``'s probe trained on its label subset, and its validation
    search (logistic: per C; knn: its validation metrics)."""
    from medssl_bench.metrics import classification_metrics
    from medssl_bench.probe import PROBE_KNN, PROBE_LOGISTIC, knn_scores, logistic_probe

    idx = torch.as_tensor(unit.indices, dtype=torch.long)
    train_x, train_y = feats["train_x"][idx], feats["train_y"][idx]
    if unit.probe == PROBE_KNN:
        val = classification_metrics(
            knn_scores(train_x, train_y, feats["val_x"], info.num_classes, unit.k,
                       unit.temperature), feats["val_y"].numpy())
        test = knn_scores(train_x, train_y, feats["test_x"], info.num_classes, unit.k,
                          unit.temperature)
        return test, [{f"val_{k}": v for k, v in val.items()}]
    if unit.probe == PROBE_LOGISTIC:
        test, _, history = logistic_probe(
            train_x, train_y, feats["val_x"], feats["val_y"], feats["test_x"],
            info.num_classes, unit.c_grid, metric, metric in info.lower_is_better, unit.seed)
        return test, history
    raise ConfigError(f"Unknown probe {unit.probe!r}: choose logistic or knn.")


def run_probe(ctx: RunContext, unit: ProbeUnit, start: Pretrained) -> ResultRecord | None:
    """Probe the frozen encoder on the unit's label subset, test and record it, as
    :func:`run_finetune` records a fine-tune: skipped when finished, a failure recorded."""
    from medssl_bench.metrics import classification_metrics

    store, protocol = ctx.store, ctx.run.spec.name
    if not ctx.force and store.find(protocol, unit.key) is not None:
        ctx.outcomes.append(Outcome(unit.what, "reused", task=unit.task, stage=unit.stage))
        return None
    holder = store.holder_elsewhere(protocol, unit.key)
    if holder is not None:
        return _elsewhere(ctx, unit, holder)
    data = ctx.data("dataset")
    who = identity(ctx, unit)
    params = {"fraction": unit.fraction, "seed": unit.seed, "n_labeled": len(unit.indices),
              "probe": {"kind": unit.probe, "pooling": unit.pooling, "k": unit.k,
                        "temperature": unit.temperature, "c_grid": list(unit.c_grid)},
              "protocol": ctx.run.configs["protocol"].model_dump(mode="json")}
    try:
        run_id = store.start_finetune(who, unit.what, params, start.run_id)
    except RunningElsewhere as exc:
        return _elsewhere(ctx, unit, exc.holder)
    t0 = time.perf_counter()
    try:
        if data.info.kind != "classification":
            raise ConfigError(f"A {unit.probe} probe needs a classification dataset; "
                              f"{ctx.plugins['dataset'].name!r} is {data.info.kind}.")
        feats = probe_features(ctx, unit, start)
        scores, history = probe_scores(unit, feats, data.info, unit.metric)
        test_metrics = classification_metrics(scores, feats["test_y"].numpy())
        value = test_metrics.get(unit.metric, math.nan)
        seconds = time.perf_counter() - t0
        record = ResultRecord(**who.model_dump(), value=value, test_metrics=test_metrics,
                              val_history=history, seconds=seconds)
        store.finish_finetune(run_id, record, ctx.run.as_dict())
    except TrackingUnavailable:
        raise  # the store is gone: every later unit would fail the same way
    except Exception as exc:
        store.fail(run_id, exc)
        if ctx.distributed:
            raise
        detail = str(exc) if isinstance(exc, BenchError) else traceback.format_exc(limit=3)
        ctx.outcomes.append(Outcome(unit.what, "failed", detail, unit.task, unit.stage))
        ctx.echo(f"[red]FAILED[/red] {unit.what}: {exc}")
        return None
    except BaseException as exc:
        store.fail(run_id, exc)
        raise
    ctx.outcomes.append(Outcome(unit.what, "ran", f"{unit.metric}={value:.4f}", unit.task,
                                unit.stage))
    ctx.echo(f"{unit.what}: test {unit.metric} = {value:.4f} ({seconds:.1f}s)")
    return record


# --------------------------------------------------------------------------- preflight


def preflight(ctx: RunContext, plan: Plan) -> None:
    """Check every pretraining task against its corpus (and the backbone against both
    datasets) before anything trains: build its heads and one proxy batch from a blank image.
    A setting that cannot work ends the run here with one message, not after hours of other
    work."""
    backbone = ctx.plugins["backbone"]
    check_input_size(backbone, tuple(ctx.data("dataset").info.image_size))
    for unit in plan.of_stage("pretrain"):
        assert isinstance(unit, PretrainUnit)
        if not unit.pretrains or unit.weights:
            continue
        task, source, info = ctx.task(unit.task), ctx.plugins[unit.corpus], ctx.data(unit.corpus).info
        try:
            task.check_input(tuple(info.image_size), info.channels)
            check_input_size(backbone, tuple(info.image_size))
            encoder = backbone.build_encoder(info.channels)
            task.build_heads(backbone, encoder)
            blank = torch.zeros((1, info.channels, *info.image_size))
            blank, _ = pad_to_multiple(blank, backbone.size_multiple())
            task.make_batch(blank, torch.Generator().manual_seed(0))
        except BenchError:
            raise
        except Exception as exc:
            raise ConfigError(
                f"Task {task.name!r} cannot run on {source.name!r} images of size "
                f"{tuple(info.image_size)} with backbone {backbone.name!r} as configured "
                f"({type(exc).__name__}: {exc}). Change the task's or backbone's settings "
                f"(`bench schema task {task.name}`) or the image size."
            ) from None


# --------------------------------------------------------------------------- dry run


def unit_status(ctx: RunContext, unit: PretrainUnit | FinetuneUnit) -> str:
    """What running ``unit`` now would do (``bench run --dry-run``), without doing it."""
    if isinstance(unit, PretrainUnit):
        if not unit.pretrains:
            return "none (no pretraining)"
        if unit.weights:
            return f"load imported weights {ctx.task(unit.task).path}"
        cache = cache_path(ctx, unit)
        if cache.exists() and not ctx.force:
            return f"reuse cached encoder {cache}"
        checkpoint = cache.with_name(f"{unit.key}.ckpt.safetensors")
        if checkpoint.exists() and not ctx.force:
            return "resume from its last epoch checkpoint"
        return "run"
    if ctx.store is not None and not ctx.force and ctx.store.find(ctx.run.spec.name, unit.key):
        return "reuse finished result"
    if isinstance(unit, ProbeUnit) and not ctx.force and features_path(ctx, unit).exists():
        return "run (on cached features)"
    return "run"
