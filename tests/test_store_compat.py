"""Results written by medssl-bench 0.1 (before the result store existed) stay readable:
a small store written then (``fixtures/store_v0_1.db.gz``: data-efficiency with rotation3d,
genesis3d and scratch, convergence with rpl3d and scratch) gives the leaderboard and the
convergence summary it gave then (``fixtures/store_v0_1_expected.json``)."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

from test_regression_sweep import _close

from medssl_bench import cli

FIXTURES = Path(__file__).parent / "fixtures"


def _old_store(tmp_path: Path) -> str:
    db = tmp_path / "mlflow.db"
    with gzip.open(FIXTURES / "store_v0_1.db.gz") as src, db.open("wb") as dst:
        shutil.copyfileobj(src, dst)
    return f"sqlite:///{db}"


def test_leaderboard_and_report_of_a_v0_1_store(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = _old_store(tmp_path)
    expected = json.loads((FIXTURES / "store_v0_1_expected.json").read_text())
    assert cli.main(["leaderboard", "--format", "json", "--summary", "--tracking-uri", uri]) == 0
    _close(expected["leaderboard"], json.loads(capsys.readouterr().out), "leaderboard")
    assert cli.main(["report", "--no-mlflow", "--out", "rep", "--tracking-uri", uri]) == 0
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    _close(expected["convergence"], report["convergence"], "convergence")
    assert {p.name for p in (tmp_path / "rep").glob("*.png")}, "no figure was drawn"
