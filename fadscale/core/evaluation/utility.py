"""Utility: small classifiers trained from scratch on synthetic tiles, on real + synthetic, on real tiles
only, and on as many real tiles per class as there are synthetic ones ("real (same count)", the fair
comparison for train-on-synthetic), each tested on the scored real tiles (train on synthetic, test on
real). Every classifier gets the same number of optimizer steps (`utility.steps`), so a smaller training
set is not also trained less.

The loop is a plain one on in-memory tensors: nothing here needs the training core's checkpoints,
resume or distribution."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from fadscale.data.loader import apply_view
from fadscale.core.evaluation.inputs import stack_tiles
from fadscale.core.metrics import accuracy_from_confusion, confusion_matrix

if TYPE_CHECKING:
    from fadscale.config import EvaluateConfig


class TinyCNN(nn.Module):
    def __init__(self, in_chans: int, classes: int, width: int = 16):
        super().__init__()
        layers, channels = [], in_chans
        for out in (width, width * 2, width * 4):
            layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
            channels = out
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _classifier(arch: str, in_chans: int, classes: int, size: int) -> nn.Module:
    if arch == "tiny-cnn":
        return TinyCNN(in_chans, classes)
    from fadscale.core.models.expert import Expert

    return Expert(arch, classes, in_chans, size, head="linear")


def train_classifier(tiles: torch.Tensor, labels: torch.Tensor, classes: int, *, arch: str, epochs: int,
                     batch_size: int, lr: float, seed: int, device: torch.device, steps: int | None = None) -> nn.Module:
    """A classifier from scratch on uint8 tiles (random flips/rotations), seeded: the same data give the
    same weights. `steps` optimizer steps (shuffled passes, the last one cut short), else `epochs` passes."""
    torch.manual_seed(seed)
    model = _classifier(arch, tiles.shape[1], classes, tiles.shape[-1]).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    batch_size = min(batch_size, len(tiles))
    total = steps or max(1, epochs * math.ceil(len(tiles) / batch_size))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    done = 0
    while done < total:
        order = torch.randperm(len(tiles), generator=gen)
        for start in range(0, len(tiles), batch_size):
            index = order[start:start + batch_size]
            if len(index) < 2:  # BatchNorm needs two samples
                continue
            views = torch.randint(0, 8, (len(index),), generator=gen).tolist()
            x = torch.stack([apply_view(tiles[i], v) for i, v in zip(index.tolist(), views)])
            x = x.to(device).float().div(127.5).sub(1.0)
            loss = F.cross_entropy(model(x), labels[index].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            done += 1
            if done == total:
                break
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, tiles: torch.Tensor, device: torch.device, batch_size: int = 128) -> torch.Tensor:
    out = []
    for start in range(0, len(tiles), batch_size):
        x = tiles[start:start + batch_size].to(device).float().div(127.5).sub(1.0)
        out.append(model(x).argmax(1).cpu())
    return torch.cat(out)


def utility_scores(cfg: EvaluateConfig, classes: list[str], generated: dict[str, torch.Tensor],
                   real_scored: dict[str, torch.Tensor], train: dict[str, torch.Tensor], device: torch.device,
                   split: str) -> dict:
    u = cfg.utility
    cap = u.max_real_per_class
    real_train = {name: tiles[:cap] if cap else tiles for name, tiles in train.items()}
    same_count = {name: train[name][:len(generated[name])] for name in classes}
    syn_x, syn_y = stack_tiles(generated, classes)
    real_x, real_y = stack_tiles(real_train, classes)
    same_x, same_y = stack_tiles(same_count, classes)
    test_x, test_y = stack_tiles(real_scored, classes)
    setups = {"real": (real_x, real_y), "real (same count)": (same_x, same_y), "synthetic": (syn_x, syn_y),
              "real+synthetic": (torch.cat([real_x, syn_x]), torch.cat([real_y, syn_y]))}
    results = {}
    for name, (x, y) in setups.items():
        model = train_classifier(x, y, len(classes), arch=u.arch, epochs=u.epochs, batch_size=u.batch_size, lr=u.lr,
                                 seed=cfg.run.seed, device=device, steps=u.steps)
        confusion = confusion_matrix(test_y, predict(model, test_x, device), len(classes))
        results[name] = {"train_tiles": len(x), **accuracy_from_confusion(confusion, classes)}
    return {"computed": True, "classifier": u.arch, "steps": u.steps, "epochs": None if u.steps else u.epochs,
            "batch_size": u.batch_size, "lr": u.lr,
            "seed": cfg.run.seed, "test": {"split": split, "tiles": len(test_x)},
            "real_train_tiles": len(real_x), "setups": results}


