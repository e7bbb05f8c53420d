"""Trust what it resumes and reads: settings fingerprints on resume, checked checksums, one-line errors
when the disk fills or a stage is killed, undecodable names, and config values that try to blow up."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fadscale.errors import FadscaleError
from fadscale.runtime.logging import read_metrics
from tests.conftest import expert_config, fad_config, train_fad, trained_fad_run

SHORT = dict(train__max_steps=3, checkpoint__every=3, align__enabled=False)


@pytest.fixture(scope="module")
def three_step_run(tiny_shards, tiny_expert, tmp_path_factory) -> Path:
    """A vanilla run checkpointed at step 3 (each test resumes a copy of it)."""
    return trained_fad_run(tmp_path_factory.mktemp("three"), tiny_shards, tiny_expert, **SHORT)


def _copy(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run / "checkpoints", out / "checkpoints")
    shutil.copy(run / "metrics.jsonl", out / "metrics.jsonl")
    return out


@pytest.mark.parametrize("change", [dict(noise__prediction_type="epsilon"), dict(data__batch_size=8),
                                    dict(optim__lr=5e-3), dict(run__seed=1)])
def test_resume_refuses_changed_settings_and_names_them(change, three_step_run, tiny_shards, tiny_expert, tmp_path):
    run = _copy(three_step_run, tmp_path)
    cfg = fad_config(tiny_shards, tiny_expert, run, three_step_run.parent / "cache", **{**SHORT, **change,
                                                                                        "train__max_steps": 6})
    from fadscale.train_fad import fad_trainer

    with pytest.raises(FadscaleError) as err:
        fad_trainer(cfg).run()
    message = str(err.value)
    key = next(iter(change)).replace("__", ".")
    assert key in message and "run.resume=force" in message and "\n" not in message, message
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000003"]  # nothing written
    assert not (run / "final").exists() and not (run / "config.yaml").exists()


def test_resume_accepts_more_steps_and_other_logging(three_step_run, tiny_shards, tiny_expert, tmp_path):
    run = _copy(three_step_run, tmp_path)
    train_fad(fad_config(tiny_shards, tiny_expert, run, three_step_run.parent / "cache",
                         **{**SHORT, "train__max_steps": 4, "train__log_every": 2, "checkpoint__every": 2}))
    card = json.loads((run / "final/run_card.json").read_text())
    assert card["step"] == 4 and card["settings_changes"] == [] and card["settings_digest"]


def test_a_setting_added_later_reads_as_what_older_runs_trained_with():
    """A checkpoint saved before optim.name existed trained with AdamW: resuming it with adamw is no change,
    with stableadamw it is; a later key without a recorded old value still reads as None."""
    from fadscale.training.fingerprint import changed_settings

    before = {"optim.lr": 0.004}
    assert changed_settings(before, {"optim.lr": 0.004, "optim.name": "adamw"}) == {}
    assert changed_settings(before, {"optim.lr": 0.004, "optim.name": "stableadamw"}) == {
        "optim.name": ["adamw", "stableadamw"]}
    assert changed_settings(before, {"optim.lr": 0.004, "train.crop_until": 100}) == {"train.crop_until": [None, 100]}


def test_another_data_set_at_the_same_path_is_a_change(three_step_run, tiny_shards, tiny_expert, tmp_path):
    from fadscale.data.shard import shard_dataset

    run = _copy(three_step_run, tmp_path)
    moved = tmp_path / "shards"
    shutil.copytree(tiny_shards, moved)  # the same data at another path: accepted
    cache = three_step_run.parent / "cache"
    train_fad(fad_config(moved, tiny_expert, run, cache, **{**SHORT, "train__max_steps": 4}))
    shutil.rmtree(moved)  # other tiles at that path: refused
    shard_dataset("procedural:per_class=24,size=32,seed=1", moved, val_fraction=0.25, grayscale=True,
                  max_samples_per_shard=80, progress=False)
    from fadscale.train_fad import fad_trainer

    with pytest.raises(FadscaleError, match="data.shards"):
        fad_trainer(fad_config(moved, tiny_expert, run, cache, **{**SHORT, "train__max_steps": 6})).run()


def test_forced_resume_records_the_change_in_card_and_metrics(three_step_run, tiny_shards, tiny_expert, tmp_path, capsys):
    run = _copy(three_step_run, tmp_path)
    train_fad(fad_config(tiny_shards, tiny_expert, run, three_step_run.parent / "cache",
                         **{**SHORT, "train__max_steps": 5, "optim__lr": 5e-3, "run__resume": "force"}))
    assert "run.resume=force" in capsys.readouterr().err
    card = json.loads((run / "final/run_card.json").read_text())
    assert card["settings_changes"] == [{"step": 3, "changes": {"optim.lr": [1e-3, 5e-3]}}]
    events = [r for r in read_metrics(run, events=True) if "event" in r]
    assert events and events[0]["step"] == 3 and events[0]["changes"] == {"optim.lr": [1e-3, 5e-3]}
    assert all("event" not in r for r in read_metrics(run))
    # The forced change is now the run's: a plain resume with it is accepted, and the record stays.
    train_fad(fad_config(tiny_shards, tiny_expert, run, three_step_run.parent / "cache",
                         **{**SHORT, "train__max_steps": 6, "optim__lr": 5e-3}))
    card = json.loads((run / "final/run_card.json").read_text())
    assert card["step"] == 6 and len(card["settings_changes"]) == 1


def test_an_expert_resumed_on_the_other_half_is_refused(tiny_shards, tmp_path):
    from fadscale.train_expert import train

    out = tmp_path / "expert"
    train(expert_config(tiny_shards, out, data__subset="A", train__epochs=1))
    with pytest.raises(FadscaleError, match="data.subset"):
        train(expert_config(tiny_shards, out, data__subset="B", train__epochs=2))
    assert json.loads((out / "expert.json").read_text())["data"]["subset"] == "A"


# ------------------------------------------------------------------------- checksums that are checked


def _damage_member(shard: Path, suffix: str, fill: bytes | None = None) -> str:
    """Overwrite bytes inside the first member of `shard` ending with `suffix` (in place, size unchanged):
    the last 32 bytes of its data with `fill`, or 16 bytes in its middle flipped. Returns the member's key."""
    import tarfile

    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(suffix))
    data = bytearray(shard.read_bytes())
    if fill is not None:
        start = member.offset_data + member.size - len(fill)
        data[start:start + len(fill)] = fill
    else:
        middle = member.offset_data + member.size // 2
        for i in range(middle, middle + 16):
            data[i] ^= 0xFF
    shard.write_bytes(bytes(data))
    return member.name.split(".", 1)[0]


@pytest.fixture
def damaged_shards(tiny_shards, tmp_path) -> tuple[Path, str]:
    """A copy of the tiny shards with one tile's image bytes damaged in the first val shard."""
    out = tmp_path / "shards"
    shutil.copytree(tiny_shards, out)
    key = _damage_member(out / "val-000000.tar", ".png")
    return out, key


def test_a_damaged_shard_is_an_error_naming_it_or_its_records_are_skipped(damaged_shards, capsys):
    from fadscale.data import loader

    shards, key = damaged_shards
    common = dict(split="val", batch_size=8, image_size=32, channels=1)
    loader._CHECKED.clear()
    with pytest.raises(FadscaleError, match=r"val-000000.tar: damaged: its sha256 differs") as err:
        list(loader.eval_loader(shards, **common))
    assert "data.on_corrupt=skip" in str(err.value)
    loader._CHECKED.clear()
    batches = list(loader.eval_loader(shards, **common, on_corrupt="skip"))
    keys = [k for b in batches for k in b["key"]]
    total = loader.load_manifest(shards)["splits"]["val"]["count"]
    assert key not in keys and len(keys) == total - 1 and sum(b["skipped"] for b in batches) == 1
    assert f"sample {key}: damaged record skipped" in capsys.readouterr().err


def test_a_damaged_record_names_shard_and_key_without_a_traceback(damaged_shards, tmp_path):
    """Through the CLI (a stage in its own process): one line, exit code 2."""
    from tests.conftest import run_module

    shards, key = damaged_shards
    manifest = json.loads((shards / "manifest.json").read_text())
    for shard in manifest["splits"]["val"]["shards"]:
        shard.pop("sha256")  # a manifest without digests: the record check alone must catch it
    (shards / "manifest.json").write_text(json.dumps(manifest))
    cfg = expert_config(shards, tmp_path / "expert", train__epochs=1)
    config = tmp_path / "expert.yaml"
    from fadscale.config import dump_config

    config.write_text(dump_config(cfg))
    proc = run_module("fadscale.cli", "train-expert", "--config", str(config), env={"FADSCALE_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line[line.index("error: "):] for line in proc.stderr.splitlines() if "error: " in line]
    assert len(errors) == 1 and f"val-000000.tar: sample {key}: damaged record" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_nan_features_in_a_cache_are_refused_or_skipped(tiny_shards, tiny_expert, tmp_path, capsys):
    from fadscale.data import loader

    from fadscale.cache_features import build_cache

    cache = tmp_path / "cache"
    build_cache(fad_config(tiny_shards, tiny_expert, tmp_path / "run", cache, **{**SHORT, "align__enabled": True}))
    shard = sorted(cache.glob("train-*.tar"))[0]
    key = _damage_member(shard, ".pooled.npy", fill=b"\xff" * 32)  # float16 0xffff is NaN
    loader._CHECKED.clear()
    with pytest.raises(FadscaleError, match="damaged: its sha256 differs"):
        train_fad(fad_config(tiny_shards, tiny_expert, tmp_path / "run", cache,
                             **{**SHORT, "align__enabled": True}))
    assert not (tmp_path / "run/checkpoints").exists()
    loader._CHECKED.clear()
    batches = list(loader.eval_loader(cache, split="train", batch_size=16, image_size=32, channels=1,
                                      features=("pooled.npy",), on_corrupt="skip"))
    assert all(torch_finite(b["pooled"]) for b in batches)
    assert key not in [k for b in batches for k in b["key"]] and sum(b["skipped"] for b in batches) == 1
    assert f"sample {key}: damaged record skipped (pooled.npy holds non-finite values)" in capsys.readouterr().err


def torch_finite(tensor) -> bool:
    import torch

    return bool(torch.isfinite(tensor).all())


def test_damaged_final_weights_are_refused_by_sample_and_export(tiny_fad_run, tmp_path):
    from fadscale.artifacts.run import load_run

    run = tmp_path / "run"
    shutil.copytree(tiny_fad_run / "final", run / "final")
    weights = run / "final/unet_ema/diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100:-84] = bytes(b ^ 0xFF for b in data[-100:-84])  # inside the tensor data: still loads
    weights.write_bytes(bytes(data))
    with pytest.raises(FadscaleError, match=r"final: damaged \(unet_ema/diffusion_pytorch_model.safetensors damaged"):
        load_run(run)
    assert load_run(run, weights="raw").weights == "unet"  # the intact raw weights still load


def test_a_damaged_export_is_refused_by_its_loader(tiny_fad_run, tmp_path):
    from fadscale.export import export_run
    from fadscale.artifacts.hub_pipeline import FadscalePipeline

    out = export_run(tiny_fad_run, tmp_path / "export")
    assert json.loads((out / "checksums.json").read_text())["files"]["unet/diffusion_pytorch_model.safetensors"]
    FadscalePipeline.from_pretrained(out)
    weights = out / "unet/diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-64] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="unet/diffusion_pytorch_model.safetensors damaged"):
        FadscalePipeline.from_pretrained(out)


# ------------------------------------------------------------------------------- a full disk


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs to write into (mounting needs root: skipped, saying so, where it cannot be mounted)."""
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.strip() or 'mount failed'}): the disk-full cases need one")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _one_error_line(proc) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line[line.index("error: "):] for line in proc.stderr.splitlines() if "error: " in line]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


def _write_yaml(cfg, path: Path) -> Path:
    from fadscale.config import dump_config

    path.write_text(dump_config(cfg))
    return path


def test_disk_full_is_one_line_in_every_stage_and_leaves_nothing_in_the_way(small_disk, tiny_shards, tiny_expert,
                                                                             tiny_fad_run, tmp_path):
    from tests.conftest import run_module

    env = {"FADSCALE_THREADS": "1"}
    cases = {
        "shard-data": ["shard-data", "procedural:per_class=40,size=64,seed=0", "--out", str(small_disk / "shards")],
        "export": ["export", str(tiny_fad_run), "--out", str(small_disk / "export")],
    }
    expert = _write_yaml(expert_config(tiny_shards, small_disk / "expert", train__epochs=1), tmp_path / "e.yaml")
    cases["train-expert"] = ["train-expert", "--config", str(expert)]
    fad = _write_yaml(fad_config(tiny_shards, tiny_expert, small_disk / "run", tmp_path / "cache",
                                 **{**SHORT, "align__enabled": True, "model__preset": "cpu-small"}), tmp_path / "f.yaml")
    cases["train"] = ["train", "--config", str(fad)]
    cache = _write_yaml(fad_config(tiny_shards, tiny_expert, small_disk / "run", small_disk / "cache", **SHORT),
                        tmp_path / "c.yaml")
    cases["cache-features"] = ["cache-features", "--config", str(cache)]
    for name, args in cases.items():
        for attempt in (1, 2):  # the retry meets the same clean line, not a leftover in the way
            line = _one_error_line(run_module("fadscale.cli", *args, env=env))
            assert "no space left on the device" in line and "free" in line and str(small_disk) in line, (name, line)
        leftovers = [p for p in small_disk.rglob("*") if p.name.endswith((".partial", ".tmp"))]
        assert not leftovers, (name, leftovers)
        for child in small_disk.iterdir():  # each case starts on an empty disk
            shutil.rmtree(child) if child.is_dir() else child.unlink()


# ------------------------------------------------------------------------------- a killed stage


def test_a_stage_killed_by_a_signal_says_which_and_where_the_run_stands(tiny_shards, tiny_expert, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    config = _write_yaml(fad_config(tiny_shards, tiny_expert, run, tmp_path / "cache", align__enabled=False,
                                    train__max_steps=100000, checkpoint__every=2), tmp_path / "fad.yaml")
    cli = subprocess.Popen([sys.executable, "-m", "fadscale.cli", "train", "--config", str(config)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1", "FADSCALE_THREADS": "1"})
    deadline = time.monotonic() + 180
    while not any((run / "checkpoints").glob("step-*")):
        assert cli.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    stage = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and p.name != str(cli.pid)
             and b"fadscale.train_fad" in _cmdline(p) and str(config).encode() in _cmdline(p)]
    assert len(stage) == 1
    os.kill(stage[0], signal.SIGKILL)  # as the out-of-memory killer does
    _, err = cli.communicate(timeout=60)
    assert cli.returncode == 128 + signal.SIGKILL
    line = [ln for ln in err.replace("\r", "\n").splitlines() if ln.startswith("error: ")]
    assert len(line) == 1 and "ended by SIGKILL" in line[0] and "out-of-memory" in line[0], err[-2000:]
    assert "keeps its checkpoint of step" in line[0] and "resumes" in line[0]


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return b""


# ------------------------------------------------------------------------------- undecodable names


def test_names_that_are_not_utf8_are_skipped_and_listed(tmp_path):
    import os

    from PIL import Image

    from fadscale.data.shard import shard_dataset

    root = os.fsencode(tmp_path / "tiles")
    for folder in (b"A", b"B", b"C\xfe"):
        os.makedirs(os.path.join(root, folder))
        for i in range(3):
            Image.new("RGB", (16, 16), (40 * i, 80, 120)).save(os.fsdecode(os.path.join(root, folder, b"%d.png" % i)))
    Image.new("RGB", (16, 16)).save(os.fsdecode(os.path.join(root, b"A", b"bad\xffname.png")))
    manifest = shard_dataset(os.fsdecode(root), tmp_path / "shards", val_fraction=0.0, progress=False)
    assert [c["name"] for c in manifest["classes"]] == ["A", "B"]
    assert manifest["splits"]["train"]["count"] == 6
    skipped = {entry["path"]: entry["reason"] for entry in manifest["skipped"]}
    assert "not valid UTF-8" in skipped["A/bad\\xffname.png"] and "not valid UTF-8" in skipped["C\\xfe"]
    json.loads((tmp_path / "shards/manifest.json").read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------- config values, outputs


@pytest.mark.parametrize("text, expected", [
    ("a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
        f"{n}: &{n} [{', '.join(['*' + p] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi")) + "run: {out_dir: *i}\n",
     "more than 100,000 values"),
    ("run:\n  seed: " + "[" * 100_000 + "]" * 100_000 + "\n", "nested"),
    ("run:\n  seed: [" + ", ".join(["1"] * 400_000) + "]\n", "a config file is a few KB"),
    ("run:\n  out_dir: [" + ", ".join(["1"] * 60_000) + "]\n", "(180,000 characters) (list); expected a string"),
    ("optim:\n  lr: .inf\n", "expected a number > 0"),
    ("optim:\n  lr: .nan\n", "expected a number > 0"),
])
def test_config_values_that_would_blow_up_give_one_short_line(text, expected, tmp_path):
    import time

    from fadscale.config import FadConfig, load_config

    path = tmp_path / "bad.yaml"
    path.write_text(text)
    started = time.perf_counter()
    with pytest.raises(FadscaleError) as err:
        load_config(FadConfig, path)
    message = str(err.value)
    assert expected in message and "\n" not in message and len(message) < 400, message[:500]
    assert time.perf_counter() - started < 20  # was minutes, or a MemoryError


def test_inf_is_refused_on_the_command_line_too():
    from fadscale.config import FadConfig, load_config

    with pytest.raises(FadscaleError, match="optim.lr"):
        load_config(FadConfig, None, ["optim.lr=.inf"])


def test_final_is_never_replaced_over_a_users_folder_and_exports_stay_out_of_it(tiny_fad_run, tiny_shards,
                                                                             tiny_expert, tmp_path):
    from fadscale.export import export_run
    from fadscale.train_fad import fad_trainer

    with pytest.raises(FadscaleError, match="inside the run's final/ folder"):
        export_run(tiny_fad_run, tiny_fad_run / "final" / "my-export")
    run = tmp_path / "run"
    shutil.copytree(tiny_fad_run, run)
    (run / "final/my-export").mkdir()
    (run / "final/my-export/keep.txt").write_text("mine")
    cfg = fad_config(tiny_shards, tiny_expert, run, tiny_fad_run.parent / "cache", train__max_steps=10)
    with pytest.raises(FadscaleError, match="my-export, which training did not write"):
        fad_trainer(cfg)
    assert (run / "final/my-export/keep.txt").read_text() == "mine"


def test_a_second_builder_of_one_cache_waits_for_the_first(tiny_shards, tiny_expert, tmp_path):
    import os
    import subprocess
    import sys
    import time

    from fadscale.runtime.lock import RunLock

    config = _write_yaml(fad_config(tiny_shards, tiny_expert, tmp_path / "run", tmp_path / "cache",
                                    **{**SHORT, "align__enabled": True}), tmp_path / "fad.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FADSCALE_THREADS": "1"}
    first = RunLock(tmp_path, ".cache.lock", guards=tmp_path / "cache", remove=True).acquire()  # a builder at work
    log = tmp_path / "second.log"
    with open(log, "w") as sink:
        second = subprocess.Popen([sys.executable, "-m", "fadscale.cli", "cache-features", "--config", str(config)],
                                  stdout=subprocess.DEVNULL, stderr=sink, env=env)
    deadline = time.monotonic() + 120
    while "waiting for it to finish" not in log.read_text():
        assert second.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.2)
    assert not (tmp_path / "cache/manifest.json").exists()
    first.release()
    assert second.wait(timeout=300) == 0, log.read_text()[-2000:]
    manifest = json.loads((tmp_path / "cache/manifest.json").read_text())
    assert manifest["splits"]["train"]["count"] == json.loads((tiny_shards / "manifest.json").read_text())["splits"]["train"]["count"]
    assert not list(tmp_path.glob(".cache.lock"))
