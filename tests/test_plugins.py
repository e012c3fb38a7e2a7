"""Plugin discovery: built-ins, entry points, broken plugins, duplicates, did-you-mean."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from medssl_bench import cli
from medssl_bench.config import PluginConfig
from medssl_bench.errors import PluginNotFoundError
from medssl_bench.hookspecs import hookimpl
from medssl_bench.plugins import PluginConflictError, build_registry
from medssl_bench_tasks.rotation import Rotation3D

ROOT = Path(__file__).resolve().parents[1]


def test_builtins_registered(registry):
    assert {"rotation3d", "scratch"} <= set(registry.names("task"))
    assert "unet3d" in registry.names("backbone")
    assert {"phantom3d", "medmnist3d"} <= set(registry.names("dataset"))
    assert "data-efficiency" in registry.names("protocol")
    record = registry.record("task", "rotation3d")
    assert record.distribution == "medssl-bench" and record.status == "ok"


def test_the_registry_and_a_worker_start_without_timm_monai_or_sklearn():
    """Every `bench` process and every parallel worker builds the registry: timm, MONAI and
    scikit-learn are imported where they are used (seconds each per process), not by it."""
    code = ("import sys; import medssl_bench.parallel, medssl_bench.cli; "
            "from medssl_bench.plugins import build_registry; build_registry(autoload=False); "
            "print(sorted({'timm', 'monai', 'sklearn'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"imported at start: {out.stdout}"


def test_unknown_name_suggests(registry):
    with pytest.raises(PluginNotFoundError, match=r"Did you mean 'rotation3d'"):
        registry.get("task", "rotaton3d")


def test_plugin_packages_are_namespaced():
    packages = [p.name for p in (ROOT / "plugins").iterdir() if (p / "__init__.py").exists()]
    assert packages, "no plugin packages found"
    assert all(name.startswith("medssl_bench_") for name in packages), packages


class _Duplicate:
    @hookimpl
    def bench_register_tasks(self, register):
        class Dup(Rotation3D):
            """A second task named rotation3d."""

        register(Dup)


def test_duplicate_name_names_both_distributions():
    with pytest.raises(PluginConflictError) as info:
        build_registry(extra_plugins=[_Duplicate()], autoload=False)
    message = str(info.value)
    assert "rotation3d" in message and "'medssl-bench'" in message and "'local'" in message


def _fake_distribution(root: Path, dist: str, module: str, code: str) -> None:
    """An installed distribution on sys.path: dist-info with an entry point, plus its module."""
    info = root / f"{dist}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[medssl_bench]\n{module} = {module}\n")
    (root / f"{module}.py").write_text(textwrap.dedent(code))


@pytest.fixture
def third_party(tmp_path, monkeypatch):
    _fake_distribution(tmp_path, "broken-plugin", "broken_plugin_mod",
                       "raise ImportError('missing dependency frobnicate')\n")
    _fake_distribution(tmp_path, "undocumented-plugin", "undocumented_plugin_mod", """
        from medssl_bench.hookspecs import hookimpl
        from medssl_bench_tasks.rotation import Rotation3D

        class NoDoc(Rotation3D):
            name = "nodoc3d"
        NoDoc.__doc__ = None

        @hookimpl
        def bench_register_tasks(register):
            register(NoDoc)
        """)
    _fake_distribution(tmp_path, "good-plugin", "good_plugin_mod", """
        from medssl_bench.hookspecs import hookimpl
        from medssl_bench_tasks.rotation import Rotation3D

        class Good(Rotation3D):
            '''A working third-party task.'''
            name = "good3d"

        @hookimpl
        def bench_register_tasks(register):
            register(Good)
        """)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for mod in ("broken_plugin_mod", "undocumented_plugin_mod", "good_plugin_mod"):
        sys.modules.pop(mod, None)


def test_broken_third_party_plugin_is_listed_not_fatal(third_party, monkeypatch):
    monkeypatch.delenv("BENCH_RAISE_PLUGIN_ERRORS", raising=False)
    registry = build_registry(autoload=True)
    failed = {r.distribution: r for r in registry.failures}
    assert "frobnicate" in failed["broken-plugin"].error
    assert "docstring" in failed["undocumented-plugin"].error
    assert registry.record("task", "good3d").distribution == "good-plugin"
    assert "rotation3d" in registry.names("task")
    with pytest.raises(PluginNotFoundError, match="failed to load"):
        registry.get("task", "nodoc3d")


def test_raise_plugin_errors_reraises(third_party, monkeypatch):
    monkeypatch.setenv("BENCH_RAISE_PLUGIN_ERRORS", "1")
    with pytest.raises(ImportError, match="frobnicate"):
        build_registry(autoload=True)


def test_bench_plugins_json_lists_failed(third_party, monkeypatch, capsys):
    from medssl_bench.plugins import reset_registry

    monkeypatch.setenv("BENCH_DISABLE_PLUGIN_AUTOLOAD", "0")
    reset_registry()
    try:
        assert cli.main(["plugins", "--json"]) == 0
    finally:
        reset_registry()
    rows = json.loads(capsys.readouterr().out)
    by_name = {(r["name"], r["status"]): r for r in rows}
    assert ("rotation3d", "ok") in by_name and ("good3d", "ok") in by_name
    assert any(r["status"] == "failed" and r["distribution"] == "broken-plugin" for r in rows)
    assert {"name", "kind", "distribution", "version", "status"} <= set(rows[0])


def test_invalid_config_class_rejected():
    from medssl_bench.plugins import validate_plugin_class

    class Bad(Rotation3D):
        """Bad config."""

        name = "bad3d"

        class Config(PluginConfig):
            x: int = 1  # no description

    assert "without a description" in validate_plugin_class("task", Bad)
