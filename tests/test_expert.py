"""The expert trainer (raw torch.distributed + DDP): it learns, resumes exactly, stops cleanly, detects its
world from torchrun's or SLURM's variables, loads initial weights safely, and fails on bad input with one
clear line.

Resume equivalence is tested in-process with a stop request that fires after an exact number of steps
(a subclass of StopRequest patched into the training loop): the run stops mid-epoch, resumes, stops
again after the last batch of the first epoch (its validation done), resumes and finishes. Its expert and
final state must be bit-identical to an uninterrupted run's (CPU, same process, same thread count).
Real signals and the STOP file are tested in subprocesses, where the stop point depends on timing and
only the clean exit, the checkpoint and the resume are checked.

Every test runs on CPU, also where a GPU is present (CUDA hidden). Note: the session fixture
`tiny_expert` (conftest) trains before this module's fixtures apply, so on a GPU machine it trains on
the GPU; nothing here compares against it bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import fadscale.train_expert as train_expert
import fadscale.training.trainer as training_loop
from fadscale.config import ExpertConfig, dump_config
from fadscale.data.loader import batches_per_epoch, split_count
from fadscale.core.models.expert import Expert, load_expert, load_initial_weights, read_card
from fadscale.runtime.distributed import detect_world, first_host
from fadscale.errors import FadscaleError
from fadscale.runtime.io import sha256_file
from fadscale.runtime.logging import read_metrics
from fadscale.runtime.signals import StopRequest
from tests.conftest import REPO, expert_config, run_module

CHANCE = 1 / 8


@pytest.fixture(autouse=True)
def _cpu_only_and_signal_handlers_restored(monkeypatch):
    """Runs here are CPU runs (gloo, fp32, bit-exact resume) also on a machine with a GPU. An in-process
    run installs the trainer's SIGUSR1/SIGTERM handlers and must hand the host's back when it ends."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    yield
    assert {sig: signal.getsignal(sig) for sig in saved} == saved


def write_config(cfg: ExpertConfig, path: Path) -> Path:
    path.write_text(dump_config(cfg))
    return path


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """A bad input fails with a non-zero exit and exactly one `error:` line, no traceback."""
    assert proc.returncode != 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def stop_after(steps: int):
    """A StopRequest that fires after `steps` training steps of one run (it is checked once per step)."""

    class StopAfter(StopRequest):
        checks = 0

        def requested(self) -> bool:
            self.checks += 1
            if self.checks >= steps:
                self._flag, self.reason = True, f"test: after {steps} steps"
            return super().requested()

    return StopAfter


def steps_per_epoch(cfg: ExpertConfig, world_size: int = 1) -> int:
    samples = cfg.data.samples_per_epoch or split_count(cfg.data.shards, "train", cfg.data.subset)
    return batches_per_epoch(samples, cfg.data.batch_size, world_size)


# --------------------------------------------------------------------------------------------------
# Training, outputs, resume


def test_tiny_expert_learns_and_writes_its_card(tiny_expert: Path, tiny_shards: Path):
    card = read_card(tiny_expert)
    run = tiny_expert.parent
    assert card["val_accuracy"] >= 0.5, card["val_accuracy"]  # chance is 0.125
    assert card["classes"] == [c["name"] for c in json.loads((tiny_shards / "manifest.json").read_text())["classes"]]
    assert set(card["val_accuracy_per_class"]) == set(card["classes"])
    assert card["val_count"] == json.loads((tiny_shards / "manifest.json").read_text())["splits"]["val"]["count"]
    assert card["in_chans"] == 1 and card["input_size"] == 32
    assert card["normalization"] == {"mean": [0.5], "std": [0.5]}
    assert card["sha256"] == sha256_file(run / "expert.safetensors")
    assert card["data"]["subset"] == "all"
    assert card["config"]["model"]["arch"] == card["arch"]
    assert {"fadscale_version", "git_commit", "feature_dim", "best_epoch", "replica_sha256"} <= set(card)
    assert (run / "confusion.png").stat().st_size > 0
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert any("val/accuracy" in m for m in read_metrics(run))
    expert, _ = load_expert(tiny_expert)
    x = torch.zeros(2, 1, 32, 32)
    assert expert.features(x).shape == (2, card["feature_dim"])
    assert expert(x).shape == (2, len(card["classes"]))


def test_stopped_and_resumed_run_equals_the_uninterrupted_one(tiny_shards: Path, tmp_path: Path, monkeypatch):
    """Stop mid-epoch, resume, stop after the last batch of epoch 1 (before its validation), resume, finish:
    the same expert and final training state, bit for bit, as an uninterrupted run of the same config."""
    short = {"data__samples_per_epoch": 64}  # 4 steps per epoch: enough to stop mid-epoch, and quick
    reference = expert_config(tiny_shards, tmp_path / "uninterrupted", **short)
    assert train_expert.train(reference) == 0
    out = tmp_path / "run"
    cfg = expert_config(tiny_shards, out, **short)
    n = steps_per_epoch(cfg)
    assert cfg.train.epochs >= 2 and n >= 2
    first, second = n // 2, n - n // 2

    monkeypatch.setattr(training_loop, "StopRequest", stop_after(first))
    assert train_expert.train(cfg) == 0
    state = json.loads((out / f"checkpoints/step-{first:08d}/trainer_state.json").read_text())
    assert (state["epoch"], state["batch"]) == (0, first)
    assert not (out / "expert.json").exists()

    monkeypatch.setattr(training_loop, "StopRequest", stop_after(second))
    assert train_expert.train(cfg) == 0
    state = json.loads((out / f"checkpoints/step-{n:08d}/trainer_state.json").read_text())
    assert (state["epoch"], state["batch"]) == (1, 0)
    assert state["task"]["best_epoch"] == 0  # the first epoch's validation ran before the stop

    monkeypatch.setattr(training_loop, "StopRequest", StopRequest)
    assert train_expert.train(cfg) == 0
    resumed, uninterrupted = read_card(out / "expert.json"), read_card(tmp_path / "uninterrupted/expert.json")
    assert resumed["sha256"] == uninterrupted["sha256"]
    assert resumed["val_accuracy"] == uninterrupted["val_accuracy"]
    assert resumed["replica_sha256"] == uninterrupted["replica_sha256"]  # the final training state too
    # A finished run started again only rewrites its outputs.
    assert train_expert.train(cfg) == 0
    assert read_card(out / "expert.json")["sha256"] == uninterrupted["sha256"]


def test_subset_b_early_stopping_and_a_finished_run_stays_finished(tiny_shards: Path, tmp_path: Path, capfd):
    """The evaluator's half (subset B) is validated on B's val tiles only and recorded on the card; with a
    learning rate too small to improve anything, early stopping ends the run, and a rerun trains no more."""
    from fadscale.data.loader import eval_loader

    out = tmp_path / "run"
    cfg = expert_config(tiny_shards, out, data__subset="B", data__samples_per_epoch=16, optim__lr=1e-9,
                        train__epochs=6, train__early_stopping=1)
    assert train_expert.train(cfg) == 0
    card = read_card(out / "expert.json")
    assert card["data"]["subset"] == "B" and card["config"]["data"]["subset"] == "B"
    b_val = sum(len(b["label"]) for b in eval_loader(tiny_shards, batch_size=64, image_size=32, channels=1,
                                                    subset="B"))
    assert 0 < card["val_count"] == b_val < split_count(tiny_shards, "val")
    assert card["epochs_trained"] < 6
    assert "early stopping" in capfd.readouterr().err
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert train_expert.train(cfg) == 0
    assert "training already finished" in capfd.readouterr().err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == checkpoints
    assert read_card(out / "expert.json")["sha256"] == card["sha256"]


def test_vit_expert_with_three_channels_trains(tiny_shards: Path, tmp_path: Path):
    cfg = expert_config(tiny_shards, tmp_path / "vit", model__arch="test_vit", model__head="mlp",
                        data__channels=3, data__samples_per_epoch=32, train__epochs=1)
    assert train_expert.train(cfg) == 0
    card = read_card(tmp_path / "vit/expert.json")
    assert card["in_chans"] == 3 and card["batchnorm"] is None
    expert, _ = load_expert(card["_path"])
    x = torch.zeros(2, 3, 32, 32)
    assert expert.features(x).shape == (2, card["feature_dim"])
    assert expert.spatial_features(x).shape == (2, card["spatial_feature_dim"], 2, 2)


def test_sigusr1_checkpoints_mid_epoch_and_exits_0(tiny_shards: Path, tmp_path: Path):
    out = tmp_path / "run"
    cfg = expert_config(tiny_shards, out, data__samples_per_epoch=16 * 1000)  # far longer than the test
    config = write_config(cfg, tmp_path / "expert.yaml")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2"}
    proc = subprocess.Popen([sys.executable, "-m", "fadscale.train_expert", "--config", str(config)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not read_metrics(out) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1]
        proc.send_signal(signal.SIGUSR1)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    assert "stop requested (SIGUSR1)" in stderr
    (step, folder), = [(int(p.name.split("-")[1]), p) for p in (out / "checkpoints").iterdir()]
    state = json.loads((folder / "trainer_state.json").read_text())
    assert step >= 1 and state["epoch"] == 0 and state["batch"] == step
    assert {"model.safetensors", "optimizer.pt", "schedule.pt", "rng-0.pt", "trainer_state.json",
            "checksums.json"} <= {p.name for p in folder.iterdir()}
    assert not (out / "expert.json").exists()


@pytest.mark.slow
def test_two_process_torchrun_stops_on_the_stop_file_resumes_and_learns(tiny_shards: Path, tmp_path: Path):
    """torchrun with 2 gloo processes: the STOP file stops both ranks (exit 0, checkpoint); the
    `fadscale train-expert --nproc 2` rerun resumes, learns, and both ranks end with identical weights."""
    out = tmp_path / "run"
    cfg = expert_config(tiny_shards, out, data__batch_size=8, train__epochs=3)
    config = write_config(cfg, tmp_path / "expert.yaml")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "fadscale.train_expert", "--config", str(config)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not read_metrics(out) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1]
        (out / "STOP").touch()
        _, stderr = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    assert "stop requested" in stderr and "2 process(es)" in stderr
    (stopped_at,) = [int(p.name.split("-")[1]) for p in (out / "checkpoints").iterdir()]
    assert {"rng-0.pt", "rng-1.pt"} <= {p.name for p in (out / f"checkpoints/step-{stopped_at:08d}").iterdir()}
    assert not (out / "expert.json").exists()

    proc = run_module("fadscale.cli", "train-expert", "--config", str(config), "--nproc", "2", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"resumed from {out / 'checkpoints'}" in proc.stderr
    card = read_card(out / "expert.json")
    assert card["world_size"] == 2
    assert card["val_accuracy"] >= 0.5, (card["val_accuracy"], proc.stderr)  # chance is 0.125
    assert card["val_count"] == split_count(tiny_shards, "val")  # every val tile once, counts summed over ranks
    digests = card["replica_sha256"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert card["steps_trained"] == 3 * steps_per_epoch(cfg, world_size=2) >= stopped_at


# --------------------------------------------------------------------------------------------------
# World detection (fadscale.runtime.distributed)


def test_world_from_torchrun_variables_wins_over_slurm():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "1234",
           "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}
    world = detect_world(env)
    assert (world.rank, world.world_size, world.local_rank, world.source) == (3, 8, 1, "torchrun")
    assert (world.master_addr, world.master_port) == ("n1", 1234)


def test_world_from_slurm_variables():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1",
           "SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "gpu[07-09,12]"}
    world = detect_world(env)
    assert (world.rank, world.world_size, world.local_rank, world.source) == (5, 8, 1, "slurm")
    assert world.master_addr == "gpu07"
    assert world.master_port == 20000 + 123456 % 20000
    assert world.is_main is False and world.distributed
    # The step's node list (srun inside an allocation) wins over the job's; MASTER_* variables win over both.
    env["SLURM_STEP_NODELIST"] = "cpu3"
    assert detect_world(env).master_addr == "cpu3"
    env.update(MASTER_ADDR="head", MASTER_PORT="29999")
    assert (detect_world(env).master_addr, detect_world(env).master_port) == ("head", 29999)


def test_single_process_world():
    assert detect_world({}).source == "single"
    one_task = detect_world({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_NUM_TASKS": "1",
                             "SLURM_JOB_NODELIST": "n1"})
    assert (one_task.world_size, one_task.rank, one_task.source) == (1, 0, "single")
    # The batch script of a 2-task job, outside any srun step (the variables slurmd sets there).
    batch_script = detect_world({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0",
                                 "SLURM_JOB_NODELIST": "n1"})
    assert (batch_script.world_size, batch_script.source) == (1, "single")


@pytest.mark.parametrize("nodelist, host", [
    ("node01", "node01"),
    ("gpu[07-09,12],cpu1", "gpu07"),
    ("gpu[12,07-09]", "gpu12"),
    ("a,b,c", "a"),
    ("cn-[001-004]", "cn-001"),
    ("10.0.0.5", "10.0.0.5"),
    ("  node7 ", "node7"),
])
def test_first_host(nodelist, host):
    assert first_host(nodelist) == host


@pytest.mark.parametrize("nodelist, host", [
    ("rack[1-2]-node[01-04]", "rack1-node01"),
    ("n[1-2]-ib", "n1-ib"),
])
def test_first_host_multiple_bracket_groups(nodelist, host):
    assert first_host(nodelist) == host


# --------------------------------------------------------------------------------------------------
# Models and initial weights


def test_feature_dim_is_the_pooled_output_size():
    # MobileNetV3 pools to a pre-logits layer (1024) wider than its last map (288).
    expert = Expert("mobilenetv3_small_050", 8, 1, 32, "mlp")
    x = torch.zeros(2, 1, 32, 32)
    assert expert.features(x).shape == (2, expert.feature_dim)
    assert expert.spatial_features(x).shape[1] == expert.spatial_dim
    assert expert(x).shape == (2, 8)


@pytest.mark.parametrize("arch", ["resnet10t", "mobilenetv3_small_050", "vit_tiny_patch16_224"])
def test_one_pass_gives_the_pooled_feature_and_the_map(arch):
    # The cache asks for both at once (repa) and must not pay two backbone passes for them.
    torch.manual_seed(0)
    expert = Expert(arch, 8, 3, 32, "mlp").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pooled, feature_map = expert.features_and_map(x)
        assert torch.equal(pooled, expert.features(x))
        assert torch.equal(feature_map, expert.spatial_features(x))
    assert feature_map.shape[:2] == (2, expert.spatial_dim) and pooled.shape == (2, expert.feature_dim)


def test_initial_weights_safetensors_and_timm_checkpoint(tmp_path: Path):
    import argparse

    import timm

    torch.manual_seed(1)
    source = timm.create_model("test_resnet", num_classes=1000, in_chans=3)  # an "ImageNet" timm model
    rgb = {k: v.clone() for k, v in source.state_dict().items()}
    save_file(rgb, str(tmp_path / "w.safetensors"))
    torch.save({"epoch": 3, "state_dict": rgb, "args": argparse.Namespace(model="test_resnet")},
               tmp_path / "checkpoint.pth.tar")
    for name in ("w.safetensors", "checkpoint.pth.tar"):
        model = Expert("test_resnet", 8, 1, 32, "linear")
        summary = load_initial_weights(model, tmp_path / name)
        assert "head freshly initialised" in summary
        loaded = model.backbone.state_dict()
        assert torch.equal(loaded["layer1.0.conv1.weight"], rgb["layer1.0.conv1.weight"])
        stem = "conv1.0.weight"  # RGB -> grayscale: timm's adapt_input_conv sums the colour filters
        assert torch.allclose(loaded[stem], rgb[stem].sum(1, keepdim=True))


def test_initial_weights_of_a_fadscale_expert_include_the_head(tiny_expert: Path):
    model = Expert("test_resnet", 8, 1, 32, "linear")
    assert "head too" in load_initial_weights(model, tiny_expert.parent / "expert.safetensors")
    nine = Expert("test_resnet", 9, 1, 32, "linear")
    assert "head freshly initialised" in load_initial_weights(nine, tiny_expert.parent / "expert.safetensors")


def test_initial_weights_never_run_pickled_code(tmp_path: Path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state_dict": {"x": torch.zeros(1)}, "evil": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(FadscaleError, match="not a readable checkpoint"):
        load_initial_weights(Expert("test_resnet", 8, 1, 32), tmp_path / "evil.pth")
    assert not marker.exists()


@pytest.mark.parametrize("case, message", [
    ("missing", "file not found"),
    ("corrupt", "not a readable checkpoint"),
    ("foreign", "backbone tensors match"),
])
def test_bad_initial_weights(case, message, tmp_path: Path):
    path = tmp_path / "w.safetensors"
    if case == "corrupt":
        path.write_bytes(b"\x00" * 64)
    elif case == "foreign":
        save_file(Expert("test_vit", 8, 1, 32).state_dict(), str(path))
    with pytest.raises(FadscaleError, match=message):
        load_initial_weights(Expert("test_resnet", 8, 1, 32), path)


# --------------------------------------------------------------------------------------------------
# Bad input: one clear line each


def _checkpoint(out: Path, state: dict) -> Path:
    """A checkpoint folder that passes its checksums, holding these model weights."""
    folder = out / "checkpoints" / "step-00000003"
    folder.mkdir(parents=True)
    save_file(state, str(folder / "model.safetensors"))
    (folder / "trainer_state.json").write_text(json.dumps({"step": 3, "micro": 3}))
    sums = {name: sha256_file(folder / name) for name in ("model.safetensors", "trainer_state.json")}
    (folder / "checksums.json").write_text(json.dumps({"step": 3, "files": sums}))
    return folder


@pytest.mark.parametrize("case, message", [
    ("missing-shards", "shard manifest.*not found"),
    ("missing-shard-file", "is missing"),
    ("empty-val", "val split is empty"),
    ("unknown-arch", "not a timm model name.*did you mean"),
    ("class-count", "does not fit the model being trained.*head"),
    ("foreign-checkpoint", "does not fit the model being trained"),
    ("corrupt-checkpoint", "no intact checkpoint to resume from"),
    ("pretrained-missing", "model.pretrained .*file not found"),
])
def test_bad_input_is_one_clear_error(case, message, tiny_shards: Path, tmp_path: Path):
    from fadscale.data.shard import shard_dataset

    out = tmp_path / "run"
    shards, overrides = tiny_shards, {}
    if case == "missing-shards":
        shards = tmp_path / "nowhere"
    elif case == "missing-shard-file":
        shards = tmp_path / "shards"
        shutil.copytree(tiny_shards, shards)
        next(shards.glob("train-*.tar")).unlink()
    elif case == "empty-val":
        shards = tmp_path / "shards"
        shard_dataset("procedural:per_class=2,size=16", shards, val_fraction=0, grayscale=True, progress=False)
    elif case == "unknown-arch":
        overrides["model__arch"] = "resnet5O"
    elif case == "class-count":
        _checkpoint(out, Expert("test_resnet", 5, 1, 32, "linear").state_dict())
    elif case == "foreign-checkpoint":
        _checkpoint(out, Expert("test_vit", 8, 1, 32, "linear").state_dict())
    elif case == "corrupt-checkpoint":
        folder = _checkpoint(out, {"x": torch.zeros(1)})
        (folder / "model.safetensors").write_bytes(b"PK\x03\x04 not a safetensors file")
    elif case == "pretrained-missing":
        overrides["model__pretrained"] = str(tmp_path / "resnet.safetensors")
    cfg = expert_config(shards, out, **overrides)
    with pytest.raises(FadscaleError, match=message):
        train_expert.train(cfg)


def test_bad_input_exits_non_zero_with_one_line(tiny_shards: Path, tmp_path: Path):
    """`fadscale train-expert` (the entry point under it) turns a bad input into one `error:` line and a
    non-zero exit; the cases above all raise the FadscaleError this path prints."""
    config = write_config(expert_config(tiny_shards, tmp_path / "run", model__arch="resnet5O"),
                          tmp_path / "expert.yaml")
    proc = run_module("fadscale.cli", "train-expert", "--config", str(config))
    assert proc.returncode == 2
    assert "'resnet5O': not a timm model name" in one_error_line(proc)


def test_card_class_count_must_match_the_weights(tiny_expert: Path, tmp_path: Path):
    copy = tmp_path / "expert"
    shutil.copytree(tiny_expert.parent, copy, ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
    card = json.loads((copy / "expert.json").read_text())
    card["classes"] = card["classes"] + ["EXTRA"]
    (copy / "expert.json").write_text(json.dumps(card))
    with pytest.raises(FadscaleError, match="does not fit test_resnet with 9 classes"):
        load_expert(copy / "expert.json")


def test_timm_loads_the_trained_backbone_from_expert_safetensors(tiny_expert: Path):
    """What a timm user writes: no fadscale import, no key renaming."""
    import timm

    card = json.loads(tiny_expert.read_text())
    assert card["weights_layout"] == "timm backbone keys + fadscale_head.*"
    backbone = timm.create_model(card["arch"], pretrained=True, num_classes=0, in_chans=card["in_chans"],
                                 pretrained_cfg_overlay=dict(file=str(tiny_expert.parent / card["weights"]))).eval()
    expert, _ = load_expert(tiny_expert)
    x = torch.randn(3, card["in_chans"], card["input_size"], card["input_size"])
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), expert.features(x))
    fresh = timm.create_model(card["arch"], num_classes=0, in_chans=card["in_chans"]).eval()
    with torch.no_grad():
        assert not torch.allclose(fresh(x), expert.features(x))  # the weights were loaded, not left random
