"""Configs: overrides, YAML files, presets, and one clear message per bad value."""

from __future__ import annotations

import json

import pytest

from medssl_bench import cli
from medssl_bench.config import parse_overrides
from medssl_bench.errors import ConfigError
from medssl_bench.spec import load_spec, resolve_run


def test_parse_overrides_nested_and_typed():
    got = parse_overrides(["a.b=1", "a.c=[5,10]", "d=true", "e=1e-3", "f=text"])
    assert got == {"a": {"b": 1, "c": [5, 10]}, "d": True, "e": 1e-3, "f": "text"}
    with pytest.raises(ConfigError, match="dotted.key=value"):
        parse_overrides(["novalue"])


def test_spec_has_version():
    spec = load_spec("data-efficiency")
    assert spec.version >= 1 and spec.protocol["fractions"] == [5, 10, 25, 50, 100]


def test_presets_and_precedence(registry, tmp_path):
    quick = resolve_run(registry, "data-efficiency", "rotation3d", preset="quick")
    paper = resolve_run(registry, "data-efficiency", "rotation3d", preset="paper")
    assert quick.configs["dataset"].size == 32 and paper.configs["dataset"].size == 128
    assert paper.configs["finetune"].warmup_epochs == 25 and paper.configs["finetune"].lr == 1e-5
    assert paper.configs["pretrain"].lr == 1e-3
    config = tmp_path / "run.yaml"
    config.write_text("run: {dataset: phantom3d}\ndataset: {size: 48}\nfinetune: {epochs: 3}\n")
    run = resolve_run(registry, "data-efficiency", "rotation3d", config_file=str(config),
                      overrides={"finetune": {"epochs": 4}})
    assert run.configs["dataset"].size == 48  # file beats preset
    assert run.configs["finetune"].epochs == 4  # --set beats file


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"finetune": {"lr": -1}}, "finetune.lr"),
        ({"task": {"copies_per_volume": "many"}}, "task.copies_per_volume"),
        ({"dataset": {"sise": 3}}, "dataset.sise: unknown field"),
        ({"protocol": {"fractions": [0, 50]}}, "protocol.fractions"),
        ({"finetun": {"lr": 1}}, "Did you mean 'finetune'"),
    ],
)
def test_bad_values_name_the_field(registry, overrides, expected):
    with pytest.raises(ConfigError, match=expected.replace(".", r"\.").replace("'", ".")):
        resolve_run(registry, "data-efficiency", "rotation3d", overrides=overrides)


def test_bad_config_file(registry, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_run(registry, "data-efficiency", "rotation3d", config_file=str(tmp_path / "no.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        resolve_run(registry, "data-efficiency", "rotation3d", config_file=str(bad))
    bad.write_text("tsak: {}\n")
    with pytest.raises(ConfigError, match="unknown top-level keys"):
        resolve_run(registry, "data-efficiency", "rotation3d", config_file=str(bad))
    bad.write_text("finetune: {epochs: 0}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*\n.*finetune\.epochs"):
        resolve_run(registry, "data-efficiency", "rotation3d", config_file=str(bad))


def test_unknown_protocol(registry):
    with pytest.raises(ConfigError, match="Did you mean 'data-efficiency'"):
        resolve_run(registry, "data-eficiency", "rotation3d")


def test_cli_schema_and_validate(capsys):
    assert cli.main(["schema", "task", "rotation3d"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert "copies_per_volume" in schema["properties"]
    assert schema["properties"]["copies_per_volume"]["description"]
    assert cli.main(["validate", "--protocol", "data-efficiency", "--task", "rotation3d"]) == 0
    assert "valid" in capsys.readouterr().out


def test_cli_bad_value_is_one_message(capsys):
    code = cli.main(["validate", "--protocol", "data-efficiency", "--task", "rotation3d",
                     "--set", "finetune.lr=-1"])
    err = capsys.readouterr().err
    assert code == 2
    assert "finetune.lr" in err and "Traceback" not in err


def test_recipe_run_section_sets_preset_and_rejects_unknown_keys(registry, tmp_path):
    config = tmp_path / "recipe.yaml"
    config.write_text("run: {protocol: data-efficiency, task: rotation3d, preset: paper}\n")
    run = resolve_run(registry, None, None, config_file=str(config))
    assert run.preset == "paper" and run.configs["dataset"].size == 128
    assert resolve_run(registry, "data-efficiency", "rotation3d").preset == "quick"
    assert resolve_run(registry, "data-efficiency", "rotation3d", preset=None).preset is None
    assert resolve_run(registry, None, None, preset="quick", config_file=str(config)).preset == "quick"
    config.write_text("run: {protocol: data-efficiency, task: rotation3d, presett: paper}\n")
    with pytest.raises(ConfigError, match="presett"):
        resolve_run(registry, None, None, config_file=str(config))


def test_debug_flag_after_the_subcommand(capsys):
    with pytest.raises(ConfigError):
        cli.main(["validate", "--protocol", "data-efficiency", "--task", "rotation3d",
                  "--set", "finetune.lr=-1", "--debug"])
