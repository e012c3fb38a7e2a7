"""``--protocol all``: every protocol side by side per dataset, and the rank correlations
between protocols. Typed records for the computation; a real store for the CLI and report."""

from __future__ import annotations

import json
import shutil

import pytest
from scipy import stats

from medssl_bench import cli
from medssl_bench import leaderboard as lb
from medssl_bench.store import ResultIdentity, ResultRecord, ResultStore
from medssl_bench.tracking import Tracker

TASKS = ("rotation3d", "jigsaw3d", "genesis3d", "scratch")


def _record(**fields) -> ResultRecord:
    """A finished result on phantom2d with unet2d; scratch is the baseline. Each protocol
    has its own setup, as in real runs (the protocol's config is part of it)."""
    task = fields["task"]
    base = {"spec_version": 1, "dataset": "phantom2d", "backbone": "unet2d", "metric": "kappa",
            "dataset_ref": "phantom2d", "pretrain_dataset": None if task == "scratch"
            else "phantom2d", "baseline": task == "scratch",
            "setup": f"setup-of-{fields['protocol']}",
            "run_key": f"{fields['protocol']}-{task}-{fields['fraction']}-{fields['seed']}"}
    return ResultRecord(**(base | fields))


def _records(protocol: str, means: dict[str, float], fractions=(10.0, 100.0),
             spread: float = 0.01, **extra) -> list[ResultRecord]:
    """Two seeds per (task, fraction), mean ``means[task] + fraction / 1000``."""
    out = []
    for task, m in means.items():
        for fraction in fractions:
            for seed, d in enumerate((-spread, spread)):
                out.append(_record(protocol=protocol, task=task, fraction=fraction, seed=seed,
                                   value=m + fraction / 1000 + d, **extra))
    return out


FT = {"rotation3d": 0.60, "jigsaw3d": 0.50, "genesis3d": 0.40, "scratch": 0.30}
SAME = {"rotation3d": 0.80, "jigsaw3d": 0.70, "genesis3d": 0.65, "scratch": 0.20}  # same order
REVERSED = {"rotation3d": 0.20, "jigsaw3d": 0.30, "genesis3d": 0.40, "scratch": 0.50}


def _view(records) -> lb.ProtocolView:
    views = lb.protocol_views(lb.aggregate(records))
    assert len(views) == 1
    return views[0]


def _corr(view, a, b, fraction):
    return next(c for c in view.correlations
                if {c.a, c.b} == {a, b} and c.fraction == fraction)


def test_cells_are_the_per_protocol_means_matched_by_label():
    records = (_records("data-efficiency", FT) + _records("linear-probe", SAME)
               + _records("knn", REVERSED))
    view = _view(records)
    assert (view.dataset, view.backbone, view.metric) == ("phantom2d", "unet2d", "kappa")
    assert view.columns == ["data-efficiency", "knn", "linear-probe"]
    assert len(view.rows) == len(TASKS) * 2  # one row per entry and fraction
    rows = lb.aggregate(records)
    for r in rows:
        vrow = next(v for v in view.rows if (v.label, v.fraction) == (r.label, r.fraction))
        cell = vrow.cells[r.protocol]
        assert (cell.mean, cell.std, cell.n) == (pytest.approx(r.mean), pytest.approx(r.std), 2)
    scratch = next(v for v in view.rows if v.label == "scratch" and v.fraction == 10)
    assert scratch.baseline and set(scratch.cells) == {"data-efficiency", "knn", "linear-probe"}
    assert scratch.cells["knn"].mean == pytest.approx(0.51)


def test_perfect_agreement_is_1_and_reversed_is_minus_1():
    view = _view(_records("data-efficiency", FT) + _records("linear-probe", SAME)
                 + _records("knn", REVERSED))
    for fraction in (10.0, 100.0, None):  # None: over each entry's mean rank
        same = _corr(view, "data-efficiency", "linear-probe", fraction)
        assert same.n == 4 and same.reason == ""
        assert same.spearman == pytest.approx(1.0) and same.kendall == pytest.approx(1.0)
        rev = _corr(view, "data-efficiency", "knn", fraction)
        assert rev.spearman == pytest.approx(-1.0) and rev.kendall == pytest.approx(-1.0)


def test_the_correlation_is_scipys_on_hand_built_ranks():
    ft = {"rotation3d": 0.9, "jigsaw3d": 0.8, "genesis3d": 0.7, "models3d": 0.6, "scratch": 0.5}
    probe = {"rotation3d": 0.7, "jigsaw3d": 0.9, "genesis3d": 0.5, "models3d": 0.8,
             "scratch": 0.6}
    view = _view(_records("data-efficiency", ft, fractions=(50.0,))
                 + _records("linear-probe", probe, fractions=(50.0,)))
    c = _corr(view, "data-efficiency", "linear-probe", 50.0)
    labels = sorted(ft)
    rank_ft = [sorted(ft.values(), reverse=True).index(ft[t]) + 1 for t in labels]
    rank_probe = [sorted(probe.values(), reverse=True).index(probe[t]) + 1 for t in labels]
    assert c.entries == labels and c.n == 5
    assert c.spearman == pytest.approx(stats.spearmanr(rank_ft, rank_probe).statistic)
    assert c.kendall == pytest.approx(stats.kendalltau(rank_ft, rank_probe).statistic)
    assert c.spearman_p == pytest.approx(stats.spearmanr(rank_ft, rank_probe).pvalue)
    assert c.spearman == pytest.approx(0.3)  # 1 - 6 * 14 / (5 * 24)


def test_a_lower_is_better_metric_ranks_the_same_way_in_both():
    view = _view(_records("data-efficiency", FT, higher_is_better=False)
                 + _records("knn", SAME, higher_is_better=False))
    assert _corr(view, "data-efficiency", "knn", 10.0).spearman == pytest.approx(1.0)
    assert _corr(view, "data-efficiency", "knn", None).spearman == pytest.approx(1.0)


def test_fewer_than_3_common_entries_give_no_correlation_and_say_why():
    few = {"rotation3d": 0.7, "scratch": 0.3}
    view = _view(_records("data-efficiency", FT) + _records("knn", few))
    c = _corr(view, "data-efficiency", "knn", 10.0)
    assert c.n == 2 and c.spearman is None and c.kendall is None
    assert "only 2 common entries" in c.reason and "at least 3" in c.reason
    text = lb.render.fmt_correlation(c)
    assert "Spearman -" in text and "only 2 common entries" in text
    # entries a protocol lacks show "-" in its column
    genesis = next(v for v in view.rows if v.label == "genesis3d" and v.fraction == 10)
    assert lb.render.fmt_cell(genesis, "knn") == "-"
    assert lb.correlate([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])[-1].startswith("all tied")


def test_protocols_at_different_fractions_meet_over_mean_ranks():
    view = _view(_records("data-efficiency", FT, fractions=(10.0, 100.0))
                 + _records("few-shot", SAME, fractions=(0.5, 2.5)))
    pairs = [c for c in view.correlations if {c.a, c.b} == {"data-efficiency", "few-shot"}]
    assert [c.fraction for c in pairs] == [None]  # no common fraction
    assert pairs[0].spearman == pytest.approx(1.0)
    assert {v.fraction for v in view.rows} == {0.5, 2.5, 10.0, 100.0}


def test_views_split_by_dataset_backbone_and_metric():
    records = (_records("data-efficiency", FT) + _records("knn", SAME)
               + _records("knn", SAME, dataset="medmnist3d", metric="auc", backbone="unet3d"))
    views = lb.protocol_views(lb.aggregate(records))
    assert [(v.dataset, v.columns) for v in views] == [
        ("medmnist3d", ["knn"]), ("phantom2d", ["data-efficiency", "knn"])]
    assert views[0].correlations == []
    # two spec versions of a protocol are two columns, never pooled
    versions = _view(_records("knn", SAME) + _records("knn", REVERSED, spec_version=2))
    assert versions.columns == ["knn v1", "knn v2"]


def test_renderers_show_cells_and_the_correlation_line():
    rows = lb.aggregate(_records("data-efficiency", FT) + _records("knn", REVERSED))
    views = lb.protocol_views(rows)
    md = lb.views_markdown(views)
    assert "| entry | fraction | data-efficiency | knn |" in md
    assert "0.6100 ± 0.0141 (n=2)" in md
    assert "data-efficiency vs knn at 10%: Spearman -1.00" in md and "Kendall -1.00" in md
    assert "not by setup" in md
    csv_text = lb.views_csv(views)
    assert "phantom2d,unet2d,kappa,rotation3d,10.0,knn," in csv_text
    data = json.loads(lb.as_json(rows, with_summary=True, side_by_side=True))
    assert data["protocols"][0]["columns"] == ["data-efficiency", "knn"]
    assert data["protocols"][0]["correlations"][0]["scope"] == "10%"
    assert "mean_ranks" in data and "rows" in data
    assert json.loads(lb.as_json(rows, side_by_side=True))[0]["dataset"] == "phantom2d"
    assert "protocols" not in json.loads(lb.as_json(rows, with_summary=True))


# --------------------------------------------------------------------------- CLI and report


@pytest.fixture(scope="module")
def filled_db(tmp_path_factory):
    """A store with data-efficiency, linear-probe and knn results, written once (creating
    the MLflow schema and runs takes seconds)."""
    db = tmp_path_factory.mktemp("protocols") / "mlflow.db"
    store = ResultStore(Tracker(f"sqlite:///{db}"), device="cpu")
    for record in (_records("data-efficiency", FT, fractions=(100.0,), spread=0.0)
                   + _records("linear-probe", SAME, fractions=(100.0,), spread=0.0)
                   + _records("knn", REVERSED, fractions=(100.0,), spread=0.0)):
        identity = ResultIdentity(**{k: v for k, v in record.model_dump().items()
                                     if k in ResultIdentity.model_fields})
        parent = store.start_pretrain(record.protocol, 1, "pretrain", f"pre-{record.run_key}",
                                      task=record.task, backbone=record.backbone,
                                      dataset=record.dataset, params={})
        store.finish(parent)
        run_id = store.start_finetune(identity, record.run_key, {"seed": record.seed}, parent)
        store.finish_finetune(run_id, record, {"run": {"preset": "quick"}})
    return db


@pytest.fixture
def store_dir(tmp_path, monkeypatch, filled_db):
    shutil.copy(filled_db, tmp_path / "mlflow.db")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def test_the_cli_prints_the_side_by_side_view(store_dir, capsys):
    assert cli.main(["leaderboard", "--protocol", "all", "--dataset", "phantom2d",
                     "--format", "markdown"]) == 0
    out = capsys.readouterr().out
    assert "| entry | fraction | data-efficiency | knn | linear-probe |" in out
    assert "| rotation3d | 100% | 0.7000 ± 0.0000 (n=2) | 0.3000 ± 0.0000 (n=2) | " in out
    assert "data-efficiency vs linear-probe at 100%: Spearman +1.00" in out
    assert "data-efficiency vs knn at 100%: Spearman -1.00" in out
    assert cli.main(["leaderboard", "--protocol", "all"]) == 0  # the rich table
    out = capsys.readouterr().out
    assert "protocols side by side" in out and "Kendall" in out
    assert cli.main(["leaderboard", "--protocol", "all", "--format", "json", "--summary"]) == 0
    assert json.loads(capsys.readouterr().out)["protocols"][0]["dataset"] == "phantom2d"
    # one protocol still shows its own leaderboard
    assert cli.main(["leaderboard", "--protocol", "knn", "--format", "markdown"]) == 0
    assert "side by side" not in capsys.readouterr().out


def test_a_typo_still_gets_its_did_you_mean(store_dir, capsys):
    assert cli.main(["leaderboard", "--protocol", "linear-prob"]) == 2
    assert "Did you mean 'linear-probe'" in capsys.readouterr().err
    assert cli.main(["leaderboard", "--protocol", "alll"]) == 2
    assert "Did you mean 'all'" in capsys.readouterr().err
    assert cli.main(["leaderboard", "--protocol", "all", "--dataset", "phantom3d"]) == 1
    assert "phantom2d" in capsys.readouterr().err


def test_the_report_writes_the_view(store_dir, capsys):
    assert cli.main(["report", "--out", "rep", "--no-mlflow", "--protocol", "all"]) == 0
    md = (store_dir / "rep" / "report.md").read_text()
    assert "## Protocols side by side" in md and "Spearman" in md
    data = json.loads((store_dir / "rep" / "report.json").read_text())
    assert data["protocols"][0]["columns"] == ["data-efficiency", "knn", "linear-probe"]
    assert cli.main(["report", "--out", "rep2", "--no-mlflow", "--protocol", "knn"]) == 0
    assert "protocols" not in json.loads((store_dir / "rep2" / "report.json").read_text())
