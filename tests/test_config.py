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


# --------------------------------------------------------------------------- walkthrough fixes


def test_config_file_that_is_a_folder_or_not_utf8(registry, tmp_path):
    folder = tmp_path / "adir"
    folder.mkdir()
    with pytest.raises(ConfigError, match="'.*adir' is a folder, not a file"):
        resolve_run(registry, "data-efficiency", "rotation3d", config_file=str(folder))
    latin1 = tmp_path / "run.yaml"
    latin1.write_bytes("dataset: {size: 32}  # Größe\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"run\.yaml' is not UTF-8 text \(byte 0xf6"):
        resolve_run(registry, "data-efficiency", "rotation3d", config_file=str(latin1))


@pytest.mark.parametrize("path_kind", ["folder", "latin1"])
def test_cli_config_file_errors_are_one_message(tmp_path, capsys, path_kind):
    path = tmp_path / "adir"
    if path_kind == "folder":
        path.mkdir()
    else:
        path.write_bytes(b"task: {hidden: 8}\n# \xff\xfe\n")
    code = cli.main(["validate", "--protocol", "data-efficiency", "--task", "rotation3d",
                     "--config", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "does not exist" not in err
    assert ("is a folder" if path_kind == "folder" else "not UTF-8") in err


def test_unknown_field_gets_did_you_mean_and_the_section_typo_its_full_key(registry):
    with pytest.raises(ConfigError, match=r"finetune\.epoch: unknown field\. Did you mean "
                       r"'epochs'.*`bench schema finetune`"):
        resolve_run(registry, "data-efficiency", "rotation3d", overrides={"finetune": {"epoch": 3}})
    with pytest.raises(ConfigError, match=r"--set finetun\.lr: unknown section 'finetun'\. "
                       r"Did you mean 'finetune'"):
        resolve_run(registry, "data-efficiency", "rotation3d", overrides={"finetun": {"lr": 1}})


def test_forgotten_dataset_names_the_default_and_the_datasets_with_the_field(registry):
    with pytest.raises(ConfigError) as info:
        resolve_run(registry, "data-efficiency", "rotation3d",
                    overrides={"dataset": {"root": "/data/x"}})
    message = str(info.value)
    assert "dataset.root: unknown field" in message
    assert "No --dataset was given, so the dataset is the default 'phantom3d'" in message
    assert "Give --dataset NAME" in message and "msd" in message and "fundus" in message
    # named explicitly: no "default" talk, still where the field exists
    with pytest.raises(ConfigError, match=r"Dataset 'phantom3d' has no 'root'; datasets with"):
        resolve_run(registry, "data-efficiency", "rotation3d", dataset="phantom3d",
                    overrides={"dataset": {"root": "/data/x"}})


def test_warmup_must_be_below_epochs(registry):
    with pytest.raises(ConfigError, match=r"finetune\.warmup_epochs=50 is not below "
                       r"finetune\.epochs=3.*frozen for the whole fine-tuning"):
        resolve_run(registry, "data-efficiency", "rotation3d",
                    overrides={"finetune": {"warmup_epochs": 50, "epochs": 3}})
    # a linear probe freezes the encoder anyway: nothing to refuse
    run = resolve_run(registry, "data-efficiency", "rotation3d",
                      overrides={"finetune": {"warmup_epochs": 50, "epochs": 3,
                                              "freeze": "frozen"}})
    assert not run.warnings
    # only epochs lowered below the preset's warm-up (a quick trial): a warning, not an error
    run = resolve_run(registry, "data-efficiency", "rotation3d", overrides={"finetune": {"epochs": 1}})
    assert run.warnings and "quick preset" in run.warnings[0]


@pytest.mark.parametrize("protocol", ["data-efficiency", "transfer", "convergence"])
@pytest.mark.parametrize("preset", ["quick", "paper", None])
@pytest.mark.parametrize("dataset", ["phantom3d", "phantom2d"])
def test_every_spec_and_preset_default_passes_the_cross_checks(registry, protocol, preset,
                                                               dataset):
    task = "rotation2d" if dataset == "phantom2d" else "rotation3d"
    run = resolve_run(registry, protocol, task, dataset=dataset, preset=preset,
                      pretrain_dataset=dataset if protocol == "transfer" else None)
    assert not run.warnings
    assert run.configs["finetune"].warmup_epochs < run.configs["finetune"].epochs


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--protocol", "transfer"], "needs the pretraining corpus: add --pretrain-dataset"),
        (["--protocol", "data-efficiency", "--pretrain-dataset", "phantom3d"],
         "--pretrain-dataset belongs to the transfer protocol"),
        (["--protocol", "convergence", "--set", "pretrain_dataset.size=16"],
         "pretrain_dataset section belongs to the transfer protocol"),
        (["--protocol", "data-efficiency", "--device", "cuda"], "--device cuda was requested"),
        (["--protocol", "data-efficiency", "--backbone", "timm2d"], "--backbone unet3d"),
        (["--protocol", "data-efficiency", "--dataset", "msd"],
         "dataset.root is not set"),
        (["--protocol", "data-efficiency", "--dataset", "msd", "--set", "dataset.root=/no/such"],
         "dataset.root='/no/such' (dataset 'msd') does not exist"),
        (["--protocol", "data-efficiency", "--dataset", "medmnist3d", "--set",
          "dataset.path=/no/such.npz"], "dataset.path='/no/such.npz' (dataset 'medmnist3d')"),
    ],
)
def test_validate_refuses_what_run_refuses(capsys, monkeypatch, argv, message):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = cli.main(["validate", "--task", "rotation3d", *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err.replace("\n", " ") and "Traceback" not in err


def test_validate_accepts_an_existing_dataset_root(capsys, tmp_path):
    code = cli.main(["validate", "--protocol", "data-efficiency", "--task", "rotation3d",
                     "--dataset", "msd", "--set", f"dataset.root={tmp_path}"])
    assert code == 0, capsys.readouterr().err


def test_paper_preset_on_the_cpu_warns(capsys):
    assert cli.main(["validate", "--protocol", "data-efficiency", "--task", "rotation3d",
                     "--preset", "paper", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "--device cuda" in err and "--preset quick" in err
    assert cli.main(["validate", "--protocol", "data-efficiency", "--task", "rotation3d",
                     "--device", "cpu"]) == 0
    assert "warning" not in capsys.readouterr().err
