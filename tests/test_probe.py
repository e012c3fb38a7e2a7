"""Frozen-encoder protocols (linear-probe, knn): the probes' numbers, the feature cache, and
`bench run` end to end on a tiny MedMNIST 3D file and on phantom3d (decoder-only), with the
encoder pretrained once across data-efficiency, linear-probe and knn."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from medssl_bench import cli
from medssl_bench.errors import ConfigError
from medssl_bench.probe import knn_scores, logistic_probe, pool

TINY = [
    "backbone.filters=[4,8]", "task.hidden=8",
    "pretrain.epochs=1", "pretrain.iterations_per_epoch=1", "pretrain.batch_size=2",
    "finetune.epochs=1", "finetune.warmup_epochs=0", "finetune.iterations_per_epoch=1",
    "protocol.seeds=[0,1]", "protocol.fractions=[50,100]",
]
PHANTOM = ["dataset.size=16", "dataset.n_unlabeled=4", "dataset.n_train=4", "dataset.n_val=2",
           "dataset.n_test=2"]


# --------------------------------------------------------------------------- the numbers


def test_logistic_probe_separates_separable_classes():
    gen = torch.Generator().manual_seed(0)

    def split(n):
        y = torch.arange(n) % 2
        x = torch.randn(n, 6, generator=gen)
        x[:, 0] += 6 * y - 3  # class 1 far along the first axis
        return x, y

    (tx, ty), (vx, vy), (qx, qy) = split(20), split(10), split(12)
    scores, c, history = logistic_probe(tx, ty, vx, vy, qx, 2, [0.01, 1.0, 100.0])
    from medssl_bench.metrics import classification_metrics

    metrics = classification_metrics(scores, qy.numpy())
    assert metrics["auc"] == 1.0 and metrics["acc"] == 1.0
    assert c in (0.01, 1.0, 100.0) and [h["C"] for h in history] == [0.01, 1.0, 100.0]
    assert all("val_auc" in h for h in history)


def test_logistic_probe_one_class_subset_and_missing_classes():
    x = torch.randn(4, 3)
    scores, c, history = logistic_probe(x, torch.zeros(4, dtype=torch.long), x, torch.tensor(
        [0, 1, 0, 1]), x, 3, [1.0])
    assert math.isnan(c) and not history
    assert scores.shape == (4, 3) and (scores[:, 0] == 1).all()
    # two of three classes seen: probabilities over all three, the unseen one zero
    y = torch.tensor([0, 2, 0, 2])
    x = torch.randn(4, 3) + 4 * y[:, None]
    scores, _, _ = logistic_probe(x, y, x, y, x, 3, [1.0])
    assert scores.shape == (4, 3) and (scores[:, 1] == 0).all()
    np.testing.assert_allclose(scores.sum(1), 1.0)


def test_knn_vote_is_the_temperature_weighted_vote():
    train = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0], [0.6, -0.8]])
    labels = torch.tensor([0, 0, 1, 1, 2])
    query = torch.tensor([[2.0, 1.0]])  # not unit length: cosine normalises it
    k, t = 3, 0.5
    q = np.array([2.0, 1.0]) / math.sqrt(5)
    sims = [float(q @ np.asarray(p) / np.linalg.norm(p)) for p in train.tolist()]
    nearest = sorted(range(5), key=lambda i: -sims[i])[:k]  # 1 (0.98), 0 (0.89), 2 (0.45)
    assert nearest == [1, 0, 2]
    votes = np.zeros(3)
    for i in nearest:
        votes[int(labels[i])] += math.exp(sims[i] / t)
    expected = votes / votes.sum()
    got = knn_scores(train, labels, query, 3, k=k, temperature=t)
    np.testing.assert_allclose(got[0], expected, rtol=1e-9)
    assert got[0, 2] == 0  # the class with no neighbour among the k gets no vote
    # k larger than the pool: every training case votes
    assert knn_scores(train, labels, query, 3, k=50, temperature=t)[0, 2] > 0


def test_pooling_deepest_or_all_levels():
    feats = [torch.ones(2, 3, 4, 4, 4), 2 * torch.ones(2, 5, 2, 2, 2)]
    assert pool(feats, "deepest").shape == (2, 5) and (pool(feats, "deepest") == 2).all()
    both = pool(feats, "all")
    assert both.shape == (2, 8) and (both[:, :3] == 1).all() and (both[:, 3:] == 2).all()


@pytest.mark.parametrize("name", ["linear-probe", "knn"])
def test_pretraining_is_data_efficiencys(registry, name):
    """Same pretrain section, 2D pretrain section and preset pretrain settings: the same
    pretrain key, so one cached encoder serves all three protocols."""
    from medssl_bench.spec import load_spec

    mine, de = load_spec(name, registry), load_spec("data-efficiency", registry)
    assert mine.pretrain == de.pretrain
    assert mine.dims2.get("pretrain") == de.dims2.get("pretrain")
    assert mine.protocol["pretrain_seed"] == de.protocol["pretrain_seed"]
    assert set(mine.presets) == set(de.presets)
    for preset in de.presets:
        assert mine.presets[preset].get("pretrain") == de.presets[preset].get("pretrain")
    if name == "linear-probe":  # decoder-only on segmentation: the key's finetune config says so
        assert mine.finetune["freeze"] == "frozen"


# --------------------------------------------------------------------------- end to end


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


@pytest.fixture
def npz(tmp_path):
    """A tiny MedMNIST v2 3D file in the official layout (uint8 images, labels (N, 1)):
    the classes differ in brightness, so a trained or even a random encoder separates them."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 8), ("val", 4), ("test", 4)):
        labels = (np.arange(n) % 2).astype(np.uint8)
        base = np.where(labels[:, None, None, None] == 1, 170, 40)
        arrays[f"{split}_images"] = (base + rng.integers(0, 60, (n, 16, 16, 16))).astype(np.uint8)
        arrays[f"{split}_labels"] = labels[:, None]
    path = tmp_path / "data" / "tinymnist3d.npz"
    path.parent.mkdir()
    np.savez_compressed(path, **arrays)
    return path


def _run(protocol, *extra, dataset=None):
    data = (["--dataset", "medmnist3d", "--set", f"dataset.path={dataset}"] if dataset
            else ["--set", *PHANTOM])
    tiny = [s for s in TINY if not (protocol == "few-shot" and s.startswith("protocol.fr"))]
    return cli.main(["run", "--protocol", protocol, "--task", "rotation3d", "--device", "cpu",
                     *data, "--set", *tiny, *extra])


def _board(capsys, protocol):
    capsys.readouterr()
    assert cli.main(["leaderboard", "--format", "json", "--protocol", protocol]) == 0
    return json.loads(capsys.readouterr().out)


def test_probes_pretrain_once_extract_once_and_rank_beside_scratch(workdir, npz, capsys,
                                                                    monkeypatch):
    import medssl_bench.probe as probe
    import medssl_bench.units as units

    real_encode, real_pretrain = probe.encode, units.pretrain
    calls = {"encode": 0, "pretrain": 0}

    def counting_encode(*args, **kwargs):
        calls["encode"] += 1
        return real_encode(*args, **kwargs)

    def counting_pretrain(*args, **kwargs):
        calls["pretrain"] += 1
        return real_pretrain(*args, **kwargs)

    monkeypatch.setattr(probe, "encode", counting_encode)
    monkeypatch.setattr(units, "pretrain", counting_pretrain)

    assert _run("data-efficiency", dataset=npz) == 0
    assert calls == {"encode": 0, "pretrain": 1}
    capsys.readouterr()

    # linear-probe: the cached encoder, one feature pass per split and encoder (rotation3d
    # and the random scratch encoder) for 2 seeds x 2 fractions
    assert _run("linear-probe", dataset=npz) == 0
    out = capsys.readouterr().out
    assert "Reusing pretrained rotation3d" in out
    assert calls == {"encode": 2 * 3, "pretrain": 1}
    assert "8 ran" in out
    assert len(list((workdir / ".medssl_bench" / "cache" / "features").glob("*.safetensors"))) == 2
    rows = _board(capsys, "linear-probe")
    assert {(r["task"], r["fraction"]): r["n"] for r in rows} == {
        (t, f): 2 for t in ("rotation3d", "scratch") for f in (50.0, 100.0)}
    assert all(r["metric"] == "auc" for r in rows)
    full = {r["task"]: r["mean"] for r in rows if r["fraction"] == 100.0}
    assert full["scratch"] == pytest.approx(1.0)  # brightness separates even random features

    # a rerun probes nothing and extracts nothing
    assert _run("linear-probe", dataset=npz) == 0
    out = capsys.readouterr().out
    summary = out.split("Summary:")[1].split(".")[0]
    assert calls["encode"] == 6 and "9 reused" in summary and "ran" not in summary

    # knn on the same features: read from the cache, never encoded again
    assert _run("knn", dataset=npz) == 0
    out = capsys.readouterr().out
    assert "Reusing pretrained rotation3d" in out and "8 ran" in out
    assert calls == {"encode": 6, "pretrain": 1}
    rows = _board(capsys, "knn")
    assert {(r["task"], r["fraction"]) for r in rows} == {
        (t, f) for t in ("rotation3d", "scratch") for f in (50.0, 100.0)}

    # pooling over every level is another feature file (one more pass per split and encoder)
    assert _run("knn", "protocol.pooling=all", dataset=npz) == 0
    assert calls["encode"] == 12

    # every protocol side by side: entries matched by label across protocols whose setups
    # differ; k-NN's two poolings are two settings, two columns
    capsys.readouterr()
    assert cli.main(["leaderboard", "--format", "json", "--protocol", "all"]) == 0
    (view,) = json.loads(capsys.readouterr().out)
    first, knn_a, knn_b, last = view["columns"]
    assert (first, last) == ("data-efficiency", "linear-probe")
    assert knn_a.startswith("knn [") and knn_b.startswith("knn [") and knn_a != knn_b
    cells = {(r["label"], r["fraction"]): r["cells"] for r in view["rows"]}
    assert {k for k, c in cells.items() if len(c) == 4} == {
        (t, f) for t in ("rotation3d", "scratch") for f in (50.0, 100.0)}
    assert all(c["n"] == 0 or c["reason"].startswith("only 2") for c in view["correlations"])


def test_probe_keys_differ_from_finetune_keys_and_between_probes(workdir, npz, capsys):
    assert _run("linear-probe", "--dry-run", dataset=npz) == 0
    lp = capsys.readouterr().out
    assert _run("knn", "--dry-run", dataset=npz) == 0
    kn = capsys.readouterr().out
    assert _run("data-efficiency", "--dry-run", dataset=npz) == 0
    de = capsys.readouterr().out

    def keys(text, stage):
        return {line.split("│")[4].strip() for line in text.splitlines()
                if line.count("│") > 5 and line.split("│")[2].strip() == stage}

    assert len(keys(lp, "probe")) == len(keys(kn, "probe")) == len(keys(de, "finetune")) == 8
    assert not keys(lp, "probe") & keys(kn, "probe")
    assert not (keys(lp, "probe") | keys(kn, "probe")) & keys(de, "finetune")
    assert keys(lp, "pretrain") == keys(kn, "pretrain") == keys(de, "pretrain")


def test_linear_probe_on_segmentation_is_decoder_only(workdir, capsys):
    assert _run("linear-probe") == 0
    capsys.readouterr()
    from medssl_bench.store import ResultStore
    from medssl_bench.tracking import Tracker

    store = ResultStore(Tracker(f"sqlite:///{workdir / 'mlflow.db'}"))
    results = store.results("linear-probe")
    assert len(results) == 8 and {r.task for r in results} == {"rotation3d", "scratch"}
    record = store.record(results[0].run_id)
    assert record.configs["finetune"]["freeze"] == "frozen" and record.metric == "dice_mean"
    # fine-tuning everything is data-efficiency's; a thawed encoder is refused
    assert _run("linear-probe", "finetune.freeze=warmup") != 0
    assert "finetune.freeze must be frozen" in capsys.readouterr().err.replace("\n", " ")


def test_knn_refuses_a_segmentation_dataset_before_training(workdir, capsys, monkeypatch):
    import medssl_bench.units as units

    def never(*args, **kwargs):
        raise AssertionError("nothing may train")

    monkeypatch.setattr(units, "pretrain", never)
    assert _run("knn") != 0
    err = capsys.readouterr().err.replace("\n", " ")
    assert "segmentation" in err and "medmnist3d" in err and "linear-probe" in err
    assert "Traceback" not in err


def test_knn_refusal_is_a_config_error(registry):
    from pathlib import Path

    from medssl_bench.context import RunContext
    from medssl_bench.spec import instantiate, resolve_run

    run = resolve_run(registry, "knn", "rotation3d", preset="quick",
                      overrides={"dataset": {"size": 16, "n_unlabeled": 2, "n_train": 2,
                                             "n_val": 1, "n_test": 1}})
    ctx = RunContext(registry=registry, run=run, plugins=instantiate(registry, run),
                     device=torch.device("cpu"), store=None, cache_dir=Path("unused"),
                     echo=lambda *a, **k: None)
    with pytest.raises(ConfigError, match="classification dataset"):
        registry.get("protocol", "knn")(run.configs["protocol"]).plan(ctx)


# --------------------------------------------------------------------------- few-shot


def test_per_class_subset_takes_n_of_each_class_nested_per_seed():
    from medssl_bench.engine import per_class_subset

    labels = [0, 1, 2, 0, 1, 0, 1, 0, 2, 0]  # class 2 has only two cases
    one, three = per_class_subset(labels, 1, seed=4), per_class_subset(labels, 3, seed=4)
    assert sorted(labels[i] for i in one) == [0, 1, 2]
    assert sorted(labels[i] for i in three) == [0, 0, 0, 1, 1, 1, 2, 2]
    assert set(one) <= set(three)
    assert per_class_subset(labels, 3, seed=4) == three  # the same cases for every task
    assert {tuple(per_class_subset(labels, 1, seed=s)) for s in range(6)} != {tuple(one)}


def test_few_shot_probes_n_per_class_on_the_cached_features(workdir, npz, capsys,
                                                           monkeypatch):
    import medssl_bench.probe as probe

    real_encode = probe.encode
    calls = []
    monkeypatch.setattr(probe, "encode", lambda *a, **k: calls.append(1) or real_encode(*a, **k))
    assert _run("few-shot", "protocol.shots=[1,2,50]", dataset=npz) == 0
    assert len(calls) == 2 * 3  # two encoders x three splits, for 2 seeds x 2 shot counts
    capsys.readouterr()
    # 50 per class labels the whole split (8 cases); 1 and 2 per class: 2 and 4 cases
    from medssl_bench.store import ResultStore
    from medssl_bench.tracking import Tracker

    results = ResultStore(Tracker(f"sqlite:///{workdir / 'mlflow.db'}")).results("few-shot")
    assert {(r.fraction, r.n_labeled) for r in results} == {(25.0, 2), (50.0, 4), (100.0, 8)}
    assert len(results) == 2 * 3 * 2  # tasks x shot counts x seeds
    rows = _board(capsys, "few-shot")
    assert {r["task"] for r in rows} == {"rotation3d", "scratch"}
    # k-NN evaluation: new results on the same features (no feature pass)
    assert _run("few-shot", "protocol.shots=[1,2,50]", "protocol.evaluation=knn",
                dataset=npz) == 0
    assert len(calls) == 6


def test_few_shot_probe_on_segmentation_is_refused(workdir, capsys):
    assert _run("few-shot", "protocol.evaluation=logistic", "--dry-run") != 0
    assert "protocol.evaluation=finetune" in capsys.readouterr().err.replace("\n", " ")


def test_executor_runs_each_unit_kind_with_its_own_runner():
    from medssl_bench.executor import RUNNERS

    kinds = list(RUNNERS)
    # most specific first: a subclass listed after its base would never run
    for i, kind in enumerate(kinds):
        assert not any(issubclass(later, kind) for later in kinds[i + 1:]), kind



def test_a_probe_curve_is_logged_during_pretraining_without_changing_it(workdir, npz, capsys):
    """pretrain.probe_every=1: a k-NN probe metric per pretraining epoch in MLflow; the
    pretrained encoder is bit for bit the one a run without the probe makes (same key, same
    cache file, same weights)."""
    from mlflow.tracking import MlflowClient

    from medssl_bench.weights import load_weights

    args = ["pretrain.epochs=2", "pretrain.iterations_per_epoch=1"]
    assert _run("data-efficiency", *args, "pretrain.probe_every=1", dataset=npz) == 0
    cache = workdir / ".medssl_bench" / "cache" / "pretrain"
    (probed,) = cache.glob("*.safetensors")
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    ids = [e.experiment_id for e in client.search_experiments()]
    (run,) = [r for r in client.search_runs(ids) if r.data.tags.get("task") == "rotation3d"
              and r.data.tags.get("medssl_bench.kind") == "pretrain"]
    curve = client.get_metric_history(run.info.run_id, "probe_auc")
    assert sorted(p.step for p in curve) == [0, 1]
    assert all(0 <= p.value <= 1 for p in curve)
    weights = load_weights(probed)
    probed.rename(workdir / "probed.safetensors")
    assert _run("data-efficiency", *args, "--force", dataset=npz) == 0  # no probe
    (plain,) = cache.glob("*.safetensors")
    assert plain.name == probed.name, "the probe setting must not change the pretraining key"
    for part, tensors in load_weights(plain).items():
        for key, value in tensors.items():
            assert torch.equal(value, weights[part][key]), f"{part}.{key} changed by the probe"


def test_probe_during_pretraining_on_segmentation_says_it_is_skipped(workdir, capsys):
    assert _run("data-efficiency", "pretrain.probe_every=1") == 0
    assert "probe needs a classification dataset" in capsys.readouterr().out
