"""What a trainer is made of: the loop's settings, and the task interface each trainer implements.

The `Trainer` (trainer.py) owns everything that is the same for every model: the step loop, stop and
resume, the NaN policy, gradient accumulation, clipping, EMA, the logging cadence and checkpoints. A
`Task` owns what differs: how to build the model and optimizer, the data, the loss of one batch, the
periodic work (validation, learning curves), its own resumable state, and the final artifacts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Protocol

import torch
from torch import nn


@dataclass
class LoopSettings:
    out_dir: Path
    seed: int
    resume: str  # "auto": continue from the newest intact checkpoint; "force": even with changed settings; "never"
    max_steps: int
    batches_per_epoch: int  # micro-batches per rank per epoch (the data position is kept in micro-batches)
    log_every: int
    checkpoint_every: int  # optimizer steps
    keep_last: int
    grad_clip: float | None = None
    nan_tolerance: int = 5
    ema_decay: float | None = None
    batch_size: int = 1  # per process, for images/s


@dataclass
class TrainParts:
    """What `Task.build` returns. `ema_module`: the module whose parameters the EMA follows (None: no EMA)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: Any  # a torch LR scheduler (state_dict / load_state_dict / step / get_last_lr)
    ema_module: nn.Module | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class LoopView:
    """What the loop shows its task at the hooks."""

    step: int
    logger: Any  # runtime.logging.RunLogger (writes on the main rank only)
    ema: Any  # diffusers EMAModel, or None
    train_seconds: float  # training time so far (the task's periodic work and checkpoints not counted)
    state: dict  # the loop's state (step, micro-step, counters, ...)


class Task(Protocol):
    name: str  # for log lines: "expert", "FAD", "vanilla"

    def build(self, backend) -> TrainParts:
        """Model (unwrapped; the trainer prepares it with the backend), optimizer, schedule, EMA module."""

    def loader(self, epoch: int, start_batch: int) -> Iterable[dict]:
        """This rank's batches of `epoch` from batch `start_batch` on (the same batches on a resume)."""

    def train_step(self, model: nn.Module, batch: dict, micro_step: int, step: int) -> tuple[torch.Tensor, dict]:
        """Forward and loss of one micro-batch (under the backend's autocast); the trainer does the rest."""

    def after_step(self, view: LoopView) -> bool:
        """Periodic work after an optimizer step (validation, learning curves); True: stop training now."""

    def state_dict(self) -> dict:
        """The task's own resumable state (JSON-able)."""

    def load_state_dict(self, state: dict) -> None: ...

    def export(self, view: LoopView) -> None:
        """The final artifacts, after the last step (called on every rank)."""
