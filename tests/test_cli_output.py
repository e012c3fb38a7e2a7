"""Output when stdout is not a terminal (a pipe, a file, a nohup/SLURM log): nothing cut to
80 columns, plain progress lines instead of bars, and the run-start warnings."""

from __future__ import annotations

import io

import pytest
from rich.console import Console
from rich.table import Table

from medssl_bench import cli


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_console_is_wide_when_not_a_terminal(monkeypatch):
    monkeypatch.setattr("sys.stdout", io.StringIO())
    piped = cli.make_console()
    assert piped.width == cli.WIDE
    table = Table()
    for column in ("entry", "mean ± std", "95% CI", "vs scratch"):
        table.add_column(column)
    cell = "rotation3d (pretrained on a-very-long-corpus-name) " * 3
    table.add_row(cell, "0.8123 ± 0.0123", "[0.7001, 0.9002]", "+0.0512 [-0.0100, 0.1100]")
    piped.print(table)
    text = "".join(cli.sys.stdout.getvalue().split())  # rows hold the whole cell, unwrapped
    assert "".join(cell.split()) in text and "…" not in cli.sys.stdout.getvalue()
    monkeypatch.setattr("sys.stdout", _Tty())
    assert cli.make_console()._width is None  # a terminal keeps its own width
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert cli.make_console(stderr=True).width == cli.WIDE


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _epochs(progress, clock, what: str, epochs: int, seconds: float, steps: int = 2,
            stage: str = "pretrain") -> None:
    """Feed ``progress`` the events of a training of ``epochs`` epochs of ``seconds`` each."""
    from medssl_bench.events import EpochEnded, EpochStarted, StepEnded, TrainingEnded

    began = clock.now
    for epoch in range(1, epochs + 1):
        progress(EpochStarted(what, stage, epoch, epochs, steps))
        for step in range(1, steps + 1):
            clock.now += seconds / steps
            progress(StepEnded(what, stage, step, steps, clock.now - began,
                               lambda epoch=epoch: {"loss": float(epoch), "acc": 0.5}))
        progress(EpochEnded(what, stage, epoch, epochs, {"loss": float(epoch), "acc": 0.5},
                            clock.now - began))
    progress(TrainingEnded(what, stage, clock.now - began))


def test_plain_progress_prints_an_epoch_line_at_most_every_interval_and_the_last():
    lines: list[str] = []
    clock = _Clock()
    progress = cli.PlainProgress(lines.append, interval=30, clock=clock)
    _epochs(progress, clock, "rotation3d", epochs=10, seconds=10)
    assert lines == [
        "pretrain rotation3d epoch 3/10: loss 3.0000 acc 0.5000 (30 s)",
        "pretrain rotation3d epoch 6/10: loss 6.0000 acc 0.5000 (60 s)",
        "pretrain rotation3d epoch 9/10: loss 9.0000 acc 0.5000 (90 s)",
        "pretrain rotation3d epoch 10/10: loss 10.0000 acc 0.5000 (100 s)",
        "pretrained rotation3d in 100 s",
    ]
    lines.clear()  # fine-tuning: its last epoch always, no "pretrained" line
    _epochs(progress, clock, "scratch 50% seed 0", epochs=2, seconds=1, stage="finetune")
    assert lines == ["scratch 50% seed 0 epoch 2/2: loss 2.0000 acc 0.5000 (2 s)"]


def test_plain_progress_reports_inside_a_long_epoch():
    lines: list[str] = []
    clock = _Clock()
    progress = cli.PlainProgress(lines.append, interval=30, clock=clock)
    _epochs(progress, clock, "rpl3d", epochs=2, seconds=80, steps=4)
    assert lines[0] == "pretrain rpl3d epoch 1/2 step 2/4: loss 1.0000 acc 0.5000 (40 s)"
    assert lines[-2].startswith("pretrain rpl3d epoch 2/2: loss 2.0000")
    assert lines[-1] == "pretrained rpl3d in 160 s"


def test_rich_progress_shows_one_bar_per_epoch_and_reads_logs_at_most_every_refresh():
    class Bars:
        def __init__(self) -> None:
            self.calls: list[tuple] = []

        def add_task(self, description, total, info):
            self.calls.append(("add", description, total))
            return len(self.calls)

        def update(self, handle, advance, **fields):
            self.calls.append(("update", handle, advance, fields.get("info")))

        def remove_task(self, handle):
            self.calls.append(("remove", handle))

    bars, clock = Bars(), _Clock()
    _epochs(cli.RichProgress(bars, refresh=0.5, clock=clock), clock, "rotation3d", epochs=1,
            seconds=1.0, steps=4)
    assert bars.calls == [
        ("add", "pretrain rotation3d epoch 1/1", 4),
        ("update", 1, 1, "loss 1.0000 acc 0.5000"),  # the first step shows its logs
        ("update", 1, 1, None),  # 0.25 s later: read again only after 0.5 s
        ("update", 1, 1, "loss 1.0000 acc 0.5000"), ("update", 1, 1, None),
        ("remove", 1),
    ]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def test_run_warns_on_paper_cpu_and_picks_progress_by_terminal(workdir, capsys, monkeypatch):
    """`bench run --preset paper` on the CPU: one yellow warning at the start. Progress bars
    on a terminal, plain lines otherwise (the protocol itself is stubbed: nothing trains)."""
    from medssl_bench import executor
    from medssl_bench.plan import Plan

    seen = []
    monkeypatch.setattr(executor.InProcess, "execute",
                        lambda self, plan, ctx: seen.append(type(ctx.progress)) or [])
    monkeypatch.setattr("medssl_bench_protocols.data_efficiency.DataEfficiency.plan",
                        lambda self, ctx: Plan(self.name))
    argv = ["run", "--protocol", "data-efficiency", "--task", "rotation3d", "--device", "cpu"]
    monkeypatch.setenv("FORCE_COLOR", "1")  # colour forced is still not a terminal
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    assert cli.main([*argv, "--preset", "paper"]) == 0
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "paper preset on the CPU" in err
    assert "--device cuda" in err and "--preset quick" in err
    assert seen == [cli.PlainProgress]

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(cli, "console", Console(file=Terminal(), force_terminal=True))
    assert cli.main(argv) == 0
    assert "warning" not in capsys.readouterr().err  # quick preset: no warning
    assert seen[-1] is cli.RichProgress
