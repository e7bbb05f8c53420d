"""Learning-rate schedules shared by the trainers: linear warmup, then cosine, constant or step decay."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def lr_factor(step: int, *, schedule: str, warmup_steps: int, total_steps: int, step_size: int = 1000) -> float:
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "step":
        return 0.1 ** ((step - warmup_steps) // step_size)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_lr_schedule(optimizer: Optimizer, optim_cfg, total_steps: int) -> LambdaLR:
    return LambdaLR(
        optimizer,
        lambda step: lr_factor(step, schedule=optim_cfg.schedule, warmup_steps=optim_cfg.warmup_steps,
                               total_steps=total_steps, step_size=optim_cfg.step_size),
    )
