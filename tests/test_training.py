"""The training core on its own (fadscale/training/), with a toy task: a linear model on random data. No
diffusion, no expert: what the trainer and the checkpointer promise every trainer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from pydantic import BaseModel

from fadscale.errors import FadscaleError
from fadscale.runtime.logging import read_metrics
from fadscale.training.backend import DDPBackend
from fadscale.training.checkpoint import list_checkpoints
from fadscale.training.task import LoopSettings, LoopView, TrainParts
from fadscale.training.trainer import Trainer


class ToyTrain(BaseModel):
    max_steps: int = 6  # train.max_steps: may change on resume, as in every fadscale config


class ToyConfig(BaseModel):
    lr: float = 0.05
    seed: int = 0
    train: ToyTrain = ToyTrain()


class ToyTask:
    """y = x @ w: a 4 -> 1 linear model, 8 batches of 4 per epoch drawn from the epoch's seed."""

    name = "toy"

    def __init__(self, cfg: ToyConfig):
        self.cfg = cfg
        self.seen: list[int] = []  # the task's own resumable state: epochs whose first batch it saw

    def build(self, backend) -> TrainParts:
        torch.manual_seed(self.cfg.seed)
        model = torch.nn.Linear(4, 1)
        optimizer = torch.optim.AdamW(model.parameters(), lr=self.cfg.lr)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
        return TrainParts(model, optimizer, schedule, ema_module=model)

    def loader(self, epoch: int, start_batch: int):
        generator = torch.Generator().manual_seed(1000 + epoch)
        batches = [{"x": torch.randn(4, 4, generator=generator), "label": torch.zeros(4)} for _ in range(8)]
        return batches[start_batch:]

    def train_step(self, model, batch, micro_step, step):
        noise = torch.randn(4, 1)  # the global RNG: a resumed run must draw what the uninterrupted one drew
        loss = ((model(batch["x"]) - batch["x"].sum(1, keepdim=True) - 0.01 * noise) ** 2).mean()
        return loss, {"train/loss": loss.detach()}

    def after_step(self, view: LoopView) -> bool:
        epoch = view.state["epoch"]
        if epoch not in self.seen:
            self.seen.append(epoch)
        return False

    def state_dict(self) -> dict:
        return {"seen": list(self.seen)}

    def load_state_dict(self, state: dict) -> None:
        self.seen = list(state.get("seen", []))

    def export(self, view: LoopView) -> None:
        pass


def trainer(out: Path, cfg: ToyConfig | None = None, resume: str = "auto", every: int = 3) -> Trainer:
    cfg = cfg or ToyConfig()
    settings = LoopSettings(out_dir=out, seed=cfg.seed, resume=resume, max_steps=cfg.train.max_steps, batches_per_epoch=8,
                            log_every=1, checkpoint_every=every, keep_last=5, grad_clip=1.0, ema_decay=0.9)
    return Trainer(ToyTask(cfg), DDPBackend("no"), settings, config=cfg)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("toy") / "full"
    assert trainer(out, ToyConfig()).run() == 0
    return out


def test_a_checkpoint_round_trips_every_piece_of_state(full_run, tmp_path):
    """Resuming from step 3 and training to 6 writes a step-6 checkpoint equal to the uninterrupted run's:
    model, optimizer, schedule, EMA, RNG and the loop's and task's state."""
    run = tmp_path / "run"
    shutil.copytree(full_run / "checkpoints/step-00000003", run / "checkpoints/step-00000003")
    assert trainer(run, ToyConfig()).run() == 0
    full, resumed = (json.loads((d / "checkpoints/step-00000006/trainer_state.json").read_text())
                     for d in (full_run, run))
    for key in ("step", "micro", "epoch", "batch", "task", "settings"):
        assert resumed[key] == full[key], key
    assert resumed["task"] == {"seen": [0]}
    a, b = _files(full_run / "checkpoints/step-00000006"), _files(run / "checkpoints/step-00000006")
    assert a.keys() == b.keys() >= {"model.safetensors", "optimizer.pt", "schedule.pt", "ema.safetensors", "rng-0.pt"}
    from safetensors.torch import load_file

    for name in ("model.safetensors", "ema.safetensors"):
        left, right = load_file(str(full_run / "checkpoints/step-00000006" / name)), load_file(str(run / "checkpoints/step-00000006" / name))
        for key in left:
            torch.testing.assert_close(right[key], left[key], rtol=0, atol=0, msg=f"{name}: {key}")
    for name in ("optimizer.pt", "schedule.pt", "rng-0.pt"):
        left = torch.load(full_run / "checkpoints/step-00000006" / name, weights_only=True)
        right = torch.load(run / "checkpoints/step-00000006" / name, weights_only=True)
        assert repr(left) == repr(right), name
    assert [r["step"] for r in read_metrics(run)] == [4, 5, 6]


def test_resume_takes_the_newest_intact_checkpoint(full_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(full_run / "checkpoints", run / "checkpoints")
    newest = run / "checkpoints/step-00000006/optimizer.pt"
    newest.write_bytes(newest.read_bytes()[:-10])
    capsys.readouterr()
    trainer(run, ToyConfig()).run()
    err = capsys.readouterr().err
    assert "step-00000006 is not usable (optimizer.pt damaged (checksum mismatch))" in err
    assert "resumed from" in err and "step-00000003 at step 3" in err
    assert [step for step, _ in list_checkpoints(run / "checkpoints")] == [3, 6]


def test_resume_refuses_a_changed_setting_and_force_records_it(full_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(full_run / "checkpoints/step-00000003", run / "checkpoints/step-00000003")
    with pytest.raises(FadscaleError, match=r"\(lr 0.05 -> 0.1\)"):
        trainer(run, ToyConfig(lr=0.1)).run()
    trainer(run, ToyConfig(lr=0.1), resume="force").run()
    state = json.loads((run / "checkpoints/step-00000006/trainer_state.json").read_text())
    assert state["settings_changes"] == [{"step": 3, "changes": {"lr": [0.05, 0.1]}}]
    # max_steps may change: it is the same run, longer.
    trainer(run, ToyConfig(lr=0.1, train=ToyTrain(max_steps=9)), every=3).run()
    assert json.loads((run / "checkpoints/step-00000009/trainer_state.json").read_text())["step"] == 9


def test_no_intact_checkpoint_stops_rather_than_start_over(full_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(full_run / "checkpoints/step-00000003", run / "checkpoints/step-00000003")
    (run / "checkpoints/step-00000003/checksums.json").unlink()
    with pytest.raises(FadscaleError, match="no intact checkpoint to resume from"):
        trainer(run).run()


def test_stableadamw_bounds_the_step_that_follows_a_quiet_stretch():
    """After many small gradients Adam's second moment is small, so one outlier gradient moves a tensor by
    (1 - beta1) / sqrt(1 - beta2) = 3.2 learning rates; StableAdamW's update clipping keeps it under one."""
    from fadscale.config.schema import OptimSection
    from fadscale.training.optimizer import make_optimizer

    moves = {}
    for name in ("adamw", "stableadamw"):
        param = torch.nn.Parameter(torch.zeros(64))
        optimizer = make_optimizer([param], OptimSection(name=name, lr=1.0, weight_decay=0.0), torch.device("cpu"))
        for _ in range(5000):
            param.grad = torch.full_like(param, 1e-3)
            optimizer.step()
        before = param.detach().clone()
        param.grad = torch.ones_like(param)
        optimizer.step()
        moves[name] = (param.detach() - before).abs().max().item()
    assert type(optimizer).__name__ == "StableAdamW"
    assert moves["adamw"] > 3.0, moves
    assert moves["stableadamw"] < 0.2, moves
