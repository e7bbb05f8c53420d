"""Typed configs: every shipped YAML validates, overrides, one-line errors that say what to fix, save/load."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fadscale.config import (
    ExpertConfig,
    FadConfig,
    build_config,
    dump_config,
    load_config,
    parse_override,
    save_config,
)
from fadscale.errors import FadscaleError

from .conftest import REPO, run_module

CONFIGS = sorted((REPO / "configs").glob("*.yaml")) + sorted((REPO / "configs" / "tiny").glob("*.yaml"))


def config_class(path: Path):
    """The class a shipped config file is for, by its name (None: a kind this test does not know yet)."""
    if path.name.startswith("expert"):
        return ExpertConfig
    if path.name.startswith(("fad", "vanilla")):
        return FadConfig
    return None


def error_of(model, path=None, overrides=None) -> str:
    with pytest.raises(FadscaleError) as info:
        load_config(model, path, overrides)
    message = str(info.value)
    assert "\n" not in message, message  # one line
    return message


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --------------------------------------------------------------------------------- shipped files


def test_the_shipped_configs_exist():
    names = {str(p.relative_to(REPO / "configs")) for p in CONFIGS}
    assert {"expert.yaml", "fad.yaml", "vanilla.yaml", "tiny/expert.yaml", "tiny/fad.yaml",
            "tiny/vanilla.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_shipped_config_validates(path):
    model = config_class(path)
    if model is None:
        pytest.skip(f"{path.name}: no config class known for this name")
    cfg = load_config(model, path)
    # Every key the file sets is read as written (nothing silently dropped or renamed).
    written = yaml.safe_load(path.read_text())
    dumped = cfg.model_dump(mode="json")
    for section, values in written.items():
        if isinstance(values, dict):
            for key, value in values.items():
                assert dumped[section][key] == (list(value) if isinstance(value, tuple) else value), (section, key)
        else:
            assert dumped[section] == values


@pytest.mark.parametrize("folder", ["configs", "configs/tiny"])
def test_vanilla_is_fad_without_alignment(folder):
    fad = load_config(FadConfig, REPO / folder / "fad.yaml").model_dump()
    vanilla = load_config(FadConfig, REPO / folder / "vanilla.yaml").model_dump()
    assert fad["align"]["enabled"] and not vanilla["align"]["enabled"]
    assert fad["run"]["out_dir"] != vanilla["run"]["out_dir"]
    for cfg in (fad, vanilla):
        cfg["align"]["enabled"] = None
        cfg["run"]["out_dir"] = None
    assert fad == vanilla


def test_defaults_without_a_file():
    assert load_config(FadConfig, None) == FadConfig()
    assert load_config(ExpertConfig, None) == ExpertConfig()
    assert ExpertConfig().data.image_size == ExpertConfig().model.input_size


# ------------------------------------------------------------------------------------- overrides


def test_overrides_are_typed_and_applied_in_order():
    cfg = load_config(FadConfig, REPO / "configs/tiny/fad.yaml", [
        "optim.lr=1e-3",  # YAML 1.1 would read this as text
        "optim.betas=[0.8, 0.95]",
        "data.batch_size=4",
        "data.batch_size=6",  # the last one wins
        "align.enabled=false",
        "train.ema_decay=null",
        "model.pretrained=null",
        "train.mixed_precision=no",  # a word of a Literal: text, not YAML's false
        "run.out_dir=2024",  # a path: text, not an integer
        "conditioning.prompt=tissue: {name}",  # text with YAML syntax in it
        "expert=runs/e/expert.json",  # a top-level key
        "cache.spatial=true",
    ])
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == (0.8, 0.95)
    assert cfg.data.batch_size == 6
    assert cfg.align.enabled is False
    assert cfg.train.ema_decay is None and cfg.model.pretrained is None
    assert cfg.train.mixed_precision == "no"
    assert cfg.run.out_dir == "2024"
    assert cfg.conditioning.prompt == "tissue: {name}"
    assert cfg.expert == "runs/e/expert.json"
    assert cfg.cache.spatial is True
    assert cfg.data.image_size == 32  # untouched keys keep the file's values


def test_parse_override():
    assert parse_override("train.max_steps=100") == (["train", "max_steps"], 100)
    assert parse_override("a.b=x=y") == (["a", "b"], "x=y")
    assert parse_override("optim.lr=2e-4", FadConfig) == (["optim", "lr"], 2e-4)
    assert parse_override("run.out_dir='quoted dir'", FadConfig) == (["run", "out_dir"], "quoted dir")
    assert parse_override("run.out_dir=", FadConfig) == (["run", "out_dir"], "")
    for bad in ("nokey", "=3", "a..b=1", ".a=1"):
        with pytest.raises(FadscaleError, match="expected section.key=value"):
            parse_override(bad)


def test_an_empty_section_is_read_as_defaults(tmp_path):
    path = write(tmp_path, "data:\n  # image_size: 64\noptim: {lr: 3.0e-4}\n")
    cfg = load_config(FadConfig, path)
    assert cfg.data == FadConfig().data and cfg.optim.lr == 3e-4


# ---------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("override,unknown,suggestion", [
    ("optim.lrr=1e-3", "optim.lrr", "optim.lr"),  # within the section
    ("train.lrr=1e-3", "train.lrr", "optim.lr"),  # the key lives in another section
    ("train.lr=1e-3", "train.lr", "optim.lr"),
    ("lr=1e-3", "lr", "optim.lr"),  # a section forgotten
    ("data.image_sise=32", "data.image_sise", "data.image_size"),
    ("data.batchsize=32", "data.batchsize", "data.batch_size"),
    ("optimm.lr=1e-3", "optimm", "optim"),  # a misspelt section
    ("train.log_evry=5", "train.log_evry", "train.log_every"),
])
def test_unknown_key_suggests_the_closest(override, unknown, suggestion):
    message = error_of(FadConfig, None, [override])
    assert message.startswith(f"--set {override}: unknown key {unknown!r} (given ")
    assert f"did you mean {suggestion!r}? Valid keys " in message


def test_unknown_key_in_a_file_names_the_file_and_lists_valid_keys(tmp_path):
    path = write(tmp_path, "data:\n  batch_size: 4\n  shufle_buffer: 64\n")
    message = error_of(FadConfig, path)
    assert message == (f"{path}: unknown key 'data.shufle_buffer' (given 64); did you mean 'data.shuffle_buffer'? "
                       "Valid keys in 'data': shards, image_size, channels, batch_size, workers, shuffle_buffer, "
                       "samples_per_epoch, views, subset, subset_seed, max_per_class, on_corrupt")


def test_unknown_key_without_a_close_match(tmp_path):
    message = error_of(ExpertConfig, write(tmp_path, "model: {zzzzqqq: 1}\n"))
    assert "unknown key 'model.zzzzqqq' (given 1). Valid keys in 'model': arch, pretrained" in message
    assert "did you mean" not in message


@pytest.mark.parametrize("override,expected", [
    ("data.batch_size=abc", "key 'data.batch_size': got 'abc' (str); expected an integer >= 1"),
    ("data.batch_size=0", "key 'data.batch_size': got 0 (int); expected an integer >= 1"),
    ("data.batch_size=2.5", "key 'data.batch_size': got 2.5 (float); expected an integer >= 1"),
    ("data.channels=2", "key 'data.channels': got 2 (int); expected one of 1, 3"),
    ("data.subset=C", "key 'data.subset': got 'C' (str); expected one of 'all', 'A', 'B'"),
    ("model.preset=big", "key 'model.preset': got 'big' (str); expected one of 'tiny-sd', 'cpu-base', 'cpu-small', 'cpu-tiny'"),
    ("train.mixed_precision=fp16", "expected one of 'auto', 'no', 'bf16'"),
    ("optim.lr=-1", "key 'optim.lr': got -1 (int); expected a number > 0"),
    ("optim.lr=fast", "key 'optim.lr': got 'fast' (str); expected a number > 0"),
    ("optim.grad_clip=0", "key 'optim.grad_clip': got 0 (int); expected a number > 0 (or null)"),
    ("train.label_dropout=1", "key 'train.label_dropout': got 1 (int); expected a number >= 0 and < 1"),
    ("optim.betas=[0.9]", "key 'optim.betas': got [0.9] (list); expected a list of 2 numbers"),
    ("optim.betas=[0.9, x]", "key 'optim.betas': got [0.9, 'x'] (list); expected a list of 2 numbers"),
    ("data.views=maybe", "key 'data.views': got 'maybe' (str); expected true or false"),
    ("data.samples_per_epoch=lots", "expected an integer >= 1 (or null)"),
    ("data=5", "key 'data': got 5 (int); expected a section (a mapping with keys: shards, image_size"),
    ("data.batch_size.x=1", "key 'data.batch_size': got {'x': 1} (dict); expected an integer >= 1"),
])
def test_bad_values_say_what_was_given_and_expected(override, expected):
    message = error_of(FadConfig, None, [override])
    assert message.startswith(f"--set {override}: ")
    assert expected in message


def test_bad_value_in_a_file_names_the_file(tmp_path):
    path = write(tmp_path, "data:\n  channels: 2\n")
    assert error_of(FadConfig, path) == f"{path}: key 'data.channels': got 2 (int); expected one of 1, 3"
    # A --set of another key does not take the blame for a problem in the file.
    assert error_of(FadConfig, path, ["data.batch_size=4"]).startswith(f"{path}: key 'data.channels'")


def test_yaml_booleans_get_a_hint(tmp_path):
    message = error_of(FadConfig, write(tmp_path, "train:\n  mixed_precision: no\n"))
    assert "key 'train.mixed_precision': got False (bool); expected one of 'auto', 'no', 'bf16'" in message
    assert "quote the value" in message
    assert load_config(FadConfig, write(tmp_path, "train:\n  mixed_precision: 'no'\n")).train.mixed_precision == "no"


def test_checks_across_keys():
    message = error_of(ExpertConfig, None, ["data.image_size=64"])
    assert message == ("defaults: data.image_size (64) must equal model.input_size (224): the expert is trained "
                       "at its own input size")


def test_centred_target_needs_the_seed_projector():
    message = error_of(FadConfig, None, ["align.projector=repa", "align.center_target=true"])
    assert "align.center_target applies to the seed projector only" in message and "'repa'" in message
    assert load_config(FadConfig, None, ["align.center_target=true"]).align.center_target


def test_file_problems(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert error_of(FadConfig, missing) == f"{missing}: config file not found"
    assert error_of(FadConfig, tmp_path) == f"{tmp_path}: not a file (expected a YAML config file)"
    broken = write(tmp_path, "data:\n  batch_size: [1, 2\n", "broken.yaml")
    message = error_of(FadConfig, broken)
    assert message.startswith(f"{broken}: not valid YAML (line ")
    twice = write(tmp_path, "data:\n  batch_size: 4\ndata:\n  workers: 2\n", "twice.yaml")
    assert error_of(FadConfig, twice) == f"{twice}: not valid YAML (line 3: duplicate key 'data')"
    listed = write(tmp_path, "- a\n- b\n", "list.yaml")
    assert error_of(FadConfig, listed) == f"{listed}: expected a mapping of sections, got list"
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    assert error_of(FadConfig, binary) == f"{binary}: not a text file (expected a YAML config file)"
    assert load_config(FadConfig, write(tmp_path, "", "empty.yaml")) == FadConfig()


def test_override_syntax_errors(tmp_path):
    assert error_of(FadConfig, None, ["train.max_steps"]) == "--set 'train.max_steps': expected section.key=value"
    path = write(tmp_path, "data:\n  batch_size: 4\n")
    assert error_of(FadConfig, path, ["data.batch_size.x=1"]) == \
        "--set data.batch_size.x: 'batch_size' is a value, not a section"


def test_build_config_errors_name_their_source():
    with pytest.raises(FadscaleError, match=r"^fixture: unknown key 'run.sed' \(given 1\); did you mean 'run.seed'\?"):
        build_config(FadConfig, {"run": {"sed": 1}}, "fixture")


# ----------------------------------------------------------------------------------- save/load


@pytest.mark.parametrize("model,path", [(FadConfig, "configs/tiny/fad.yaml"), (ExpertConfig, "configs/expert.yaml")])
def test_save_and_load_round_trip(tmp_path, model, path):
    cfg = load_config(model, REPO / path, ["optim.betas=[0.85, 0.99]", "optim.grad_clip=null", "run.seed=7"])
    out = tmp_path / "run" / "config.yaml"
    save_config(cfg, out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["config.yaml"]  # no temporary file left
    again = load_config(model, out)
    assert again == cfg
    assert again.optim.betas == (0.85, 0.99) and again.optim.grad_clip is None and again.run.seed == 7
    assert dump_config(again) == out.read_text()
    # Every key is written out, so the saved file says exactly what ran.
    saved = yaml.safe_load(out.read_text())
    assert set(saved) == set(model.model_fields)
    assert set(saved["data"]) == set(cfg.data.model_fields)


@pytest.mark.slow
def test_an_entry_point_prints_one_line_and_exits_2(tmp_path):
    result = run_module("fadscale.train_expert", "--config", str(REPO / "configs/tiny/expert.yaml"),
                        "--set", "train.lrr=1e-3", "--set", f"run.out_dir={tmp_path / 'run'}", timeout=240)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == ["error: --set train.lrr=1e-3: unknown key 'train.lrr' (given 0.001); did you mean 'optim.lr'? "
                     "Valid keys in 'train': epochs, label_smoothing, mixed_precision, early_stopping, log_every"]
    assert not (tmp_path / "run").exists()


def test_a_file_system_error_on_a_path_is_one_line_from_every_stage_entry_point(tmp_path):
    """As on a read-only file system (root here cannot make one): the entry point every
    `python -m fadscale.<stage>` runs prints one line naming the path, exit code 2."""
    code = ("from fadscale.config import FadConfig\n"
            "from fadscale.runtime.entry import run_entry\n"
            "def run(cfg):\n"
            "    raise OSError(30, 'Read-only file system', '/ro/runs/fad/config.yaml')\n"
            "run_entry('train_fad', FadConfig, run, [])\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: /ro/runs/fad/config.yaml: Read-only file system"


@pytest.mark.parametrize("argv", [["train", "--set", "optim.lrr=1"], ["sample", "--set", "sample.nope=1"],
                                  ["evaluate", "--set", "utility.stepz=3"], ["train-expert", "--set", "train.epoch=3"],
                                  ["cache-features", "--set", "cache.dirr=x"]])
def test_the_cli_answers_a_config_typo_before_importing_torch(argv):
    code = ("import sys\n"
            "from fadscale.cli import main\n"
            f"sys.argv = ['fadscale', *{argv!r}]\n"
            "try:\n"
            "    main()\n"
            "except SystemExit as exc:\n"
            "    print('exit', exc.code, 'torch' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip() == "exit 2 False", proc.stdout + proc.stderr
    assert "unknown key" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("stage", ["train-expert", "cache-features", "train", "sample", "evaluate", "fad"])
def test_config_show_prints_every_key_as_yaml_that_loads_back_to_the_defaults(stage, tmp_path):
    from fadscale.config import load_config
    from fadscale.stages import config_class, stage as find_stage

    proc = subprocess.run([sys.executable, "-m", "fadscale.cli", "config", "show", stage], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    path = tmp_path / f"{stage}.yaml"
    path.write_text(proc.stdout)
    model = config_class(find_stage(stage))
    assert load_config(model, path) == model()
    assert "# the alignment expert's card" in proc.stdout or stage not in ("train", "fad", "cache-features")


def test_every_command_has_short_help_and_the_cli_prints_shell_completion():
    from typer.testing import CliRunner

    from fadscale.cli import app

    runner = CliRunner()
    top = runner.invoke(app, ["-h"])
    assert top.exit_code == 0
    for command in ("shard-data", "train-expert", "cache-features", "train", "sample", "evaluate", "export",
                    "submit", "config", "demo"):
        assert command in top.output
        assert runner.invoke(app, [command, "-h"]).exit_code == 0, command
    completion = runner.invoke(app, ["--show-completion", "bash"])
    assert completion.exit_code == 0 and "complete" in completion.output and "fadscale" in completion.output.lower()
