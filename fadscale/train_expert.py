"""Train the expert classifier: `ExpertTask` on the training core's loop, raw DDP backend.

    torchrun --nproc_per_node 2 -m fadscale.train_expert --config configs/tiny/expert.yaml
    fadscale train-expert --config configs/expert.yaml --nproc 8

The expert's pooled features are FAD's alignment target; a second expert trained the same way on the
other half of the tiles (`data.subset: B`) is the independent evaluator of generated images.

BatchNorm statistics are recomputed before every validation ("precise BN": cumulative averages over
up to PRECISE_BN_SAMPLES training samples with the current weights, averaged over ranks). The running
averages that training keeps (momentum 0.1) trail weights that move fast, which is the case in short
runs at a high learning rate: the tiny CPU expert validated at 0.17 with them and at 0.79 with the
recomputed ones, same weights. Recomputing also leaves every rank with identical buffers.

Stopping and resuming are the training core's (fadscale.training): SIGUSR1/SIGTERM or a STOP file in
run.out_dir stops every rank after the current step with a checkpoint and exit 0, without writing the
expert; the next run resumes from the newest intact checkpoint, mid-epoch included, and continues exactly
as an uninterrupted run would. The best weights so far (`best.safetensors`) and the validation history
are part of the task's state.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from fadscale import __version__
from fadscale.config import ExpertConfig
from fadscale.data.loader import batches_per_epoch, eval_loader, loader_from_config, split_count
from fadscale.data.shard import load_manifest
from fadscale.core.models.expert import Expert, load_initial_weights, save_expert
from fadscale.runtime.distributed import all_reduce_sum
from fadscale.runtime.entry import run_entry
from fadscale.errors import FadscaleError
from fadscale.runtime.io import git_commit, save_safetensors, sha256_file
from fadscale.runtime.logging import log_line
from fadscale.core.evaluation.report import save_confusion_png
from fadscale.training.lr_schedule import make_lr_schedule
from fadscale.training.optimizer import make_optimizer
from fadscale.training.backend import Backend, DDPBackend
from fadscale.training.fingerprint import digest
from fadscale.training.task import LoopSettings, LoopView, TrainParts
from fadscale.training.trainer import Trainer

BEST_WEIGHTS = "best.safetensors"
PRECISE_BN_SAMPLES = 2048  # over all ranks; Wu & Johnson (2021): 10^3-10^4 samples estimate BN well


@torch.no_grad()
def validate(model: torch.nn.Module, cfg: ExpertConfig, backend: Backend, num_classes: int) -> torch.Tensor:
    """Confusion matrix [true, predicted] over the whole val split (of the subset), summed over ranks."""
    model.eval()
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.float64)
    loader = eval_loader(cfg.data.shards, split="val", batch_size=cfg.data.batch_size,
                         image_size=cfg.data.image_size, channels=cfg.data.channels, rank=backend.rank,
                         world_size=backend.world, workers=cfg.data.workers, subset=cfg.data.subset,
                         subset_seed=cfg.data.subset_seed)
    for batch in loader:
        with backend.autocast():
            logits = model(batch["image"].to(backend.device))
        pairs = batch["label"] * num_classes + logits.argmax(1).cpu()
        confusion += torch.bincount(pairs, minlength=num_classes * num_classes).double()
    model.train()
    return all_reduce_sum(confusion.to(backend.device)).cpu().view(num_classes, num_classes)


def batchnorm_layers(model: torch.nn.Module) -> list[torch.nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate_batchnorm(model: torch.nn.Module, cfg: ExpertConfig, backend: Backend, epoch: int,
                          steps_per_epoch: int) -> int:
    """Recompute BatchNorm running statistics for the current weights ("precise BN").

    Forward passes in train mode over up to PRECISE_BN_SAMPLES training samples (a stream of its own,
    seeded by run.seed and epoch, so a resumed run repeats it), cumulative averages per layer, then
    averaged over ranks. Returns the number of batches used (0: the model has no BatchNorm)."""
    norms = batchnorm_layers(model)
    if not norms:
        return 0
    per_step = cfg.data.batch_size * backend.world
    batches = min(steps_per_epoch, max(1, math.ceil(PRECISE_BN_SAMPLES / per_step)))
    loader = loader_from_config(cfg, cfg.data.shards, epoch=epoch, rank=backend.rank, world_size=backend.world,
                                samples_per_epoch=batches * per_step, seed=cfg.run.seed + 7919)
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    was_training = model.training
    model.train()
    for batch in loader:
        with backend.autocast():
            model(batch["image"].to(backend.device))
    model.train(was_training)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
        if backend.world > 1:
            for buffer in (m.running_mean, m.running_var):
                buffer.copy_(all_reduce_sum(buffer.clone()) / backend.world)
    return batches


def state_digest(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer: equal on all ranks when DDP kept them in sync."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def gather_digests(digest: str, backend: Backend) -> list[str]:
    """Every rank's digest, on every rank."""
    if backend.world == 1:
        return [digest]
    table = torch.zeros(backend.world, 32, dtype=torch.int64, device=backend.device)
    table[backend.rank] = torch.tensor(list(bytes.fromhex(digest)), dtype=torch.int64, device=backend.device)
    return [bytes(row).hex() for row in all_reduce_sum(table).cpu().tolist()]


def check_data(cfg: ExpertConfig) -> tuple[dict, list[str]]:
    """The shard folder's manifest and class names, after the checks that need no tile read."""
    manifest = load_manifest(cfg.data.shards)
    classes = [c["name"] for c in manifest["classes"]]
    if len(classes) < 2:
        raise FadscaleError(f"{cfg.data.shards}: {len(classes)} class(es); a classifier needs at least 2")
    for split in ("train", "val"):
        if split_count(cfg.data.shards, split) == 0:
            hint = "; re-shard with --val-fraction > 0" if split == "val" else ""
            raise FadscaleError(f"{cfg.data.shards}: the {split} split is empty{hint}")
    if manifest["image"]["channels"] != cfg.data.channels:
        log_line(f"note: shards are {manifest['image']['mode']}, data.channels is {cfg.data.channels}: "
                 "tiles are converted when read", True)
    return manifest, classes


class ExpertTask:
    """The expert on the training core: a timm classifier, cross-entropy, validation at each epoch's end
    (precise BN first) that keeps the best weights and may stop early, and the card at the end."""

    name = "expert"

    def __init__(self, cfg: ExpertConfig, backend: DDPBackend):
        self.cfg, self.backend = cfg, backend
        self.out = Path(cfg.run.out_dir)
        self.manifest, self.classes = check_data(cfg)
        samples = cfg.data.samples_per_epoch or split_count(cfg.data.shards, "train", cfg.data.subset, cfg.data.max_per_class)
        self.steps_per_epoch = batches_per_epoch(samples, cfg.data.batch_size, backend.world)
        self.best = {"best_accuracy": -1.0, "best_epoch": -1, "stale_epochs": 0, "best_confusion": None,
                     "early_stopped": False}

    def settings(self) -> LoopSettings:
        cfg = self.cfg
        return LoopSettings(out_dir=self.out, seed=cfg.run.seed, resume=cfg.run.resume,
                            max_steps=self.steps_per_epoch * cfg.train.epochs, batches_per_epoch=self.steps_per_epoch,
                            log_every=cfg.train.log_every, checkpoint_every=self.steps_per_epoch * cfg.checkpoint.every,
                            keep_last=cfg.checkpoint.keep_last, grad_clip=cfg.optim.grad_clip,
                            batch_size=cfg.data.batch_size)

    def build(self, backend) -> TrainParts:
        cfg = self.cfg
        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        model = Expert(cfg.model.arch, len(self.classes), cfg.data.channels, cfg.model.input_size, cfg.model.head,
                       cfg.model.drop_rate)
        if cfg.model.pretrained:
            log_line(load_initial_weights(model, cfg.model.pretrained), backend.is_main)
        if cfg.model.sync_batchnorm and backend.world > 1:
            if backend.device.type == "cuda":
                from timm.layers import convert_sync_batchnorm  # also converts timm's BatchNormAct layers

                model = convert_sync_batchnorm(model)
            else:
                log_line("note: model.sync_batchnorm needs a GPU (PyTorch's SyncBatchNorm); ignored on CPU",
                         backend.is_main)
        model.to(backend.device)
        optimizer = make_optimizer(model.parameters(), cfg.optim, backend.device)
        schedule = make_lr_schedule(optimizer, cfg.optim, self.steps_per_epoch * cfg.train.epochs)
        self.model = model
        log_line(f"expert {cfg.model.arch}: {backend.world} process(es) on {backend.device.type}, "
                 f"{self.steps_per_epoch} steps/epoch x {cfg.train.epochs} epochs", backend.is_main)
        return TrainParts(model, optimizer, schedule)

    def loader(self, epoch: int, start_batch: int):
        return loader_from_config(self.cfg, self.cfg.data.shards, epoch=epoch, rank=self.backend.rank,
                                  world_size=self.backend.world, start_batch=start_batch,
                                  samples_per_epoch=self.steps_per_epoch * self.cfg.data.batch_size * self.backend.world)

    def train_step(self, model, batch: dict, micro_step: int, step: int):
        device = self.backend.device
        logits = model(batch["image"].to(device))
        loss = F.cross_entropy(logits.float(), batch["label"].to(device), label_smoothing=self.cfg.train.label_smoothing)
        return loss, {"train/loss": loss.item()}

    def after_step(self, view: LoopView) -> bool:
        """At the end of each epoch: precise BN, validation, best weights, early stopping."""
        if view.step % self.steps_per_epoch:
            return False
        cfg, backend, best = self.cfg, self.backend, self.best
        epoch = view.step // self.steps_per_epoch - 1
        recalibrate_batchnorm(self.model, cfg, backend, epoch, self.steps_per_epoch)
        confusion = validate(self.model, cfg, backend, len(self.classes))
        if confusion.sum() == 0:
            raise FadscaleError(f"{cfg.data.shards}: no val tile falls in data.subset {cfg.data.subset}; "
                                "shard with a larger --val-fraction")
        accuracy = float(confusion.diag().sum() / confusion.sum())
        per_class = confusion.diag() / confusion.sum(1).clamp(min=1)
        view.logger.scalars(view.step, {"val/accuracy": accuracy, "epoch": epoch,
                                        **{f"val/accuracy/{c}": float(a) for c, a in zip(self.classes, per_class)}})
        log_line(f"epoch {epoch + 1}/{cfg.train.epochs}: val accuracy {accuracy:.3f} ({int(confusion.sum())} tiles)",
                 backend.is_main)
        if accuracy > best["best_accuracy"]:
            best.update(best_accuracy=accuracy, best_epoch=epoch, stale_epochs=0, best_confusion=confusion.tolist())
            if backend.is_main:
                save_safetensors({k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()},
                                 self.out / BEST_WEIGHTS)
        else:
            best["stale_epochs"] += 1
        early = cfg.train.early_stopping is not None and best["stale_epochs"] >= cfg.train.early_stopping
        best["early_stopped"] = early
        if early:
            log_line(f"early stopping: no improvement for {best['stale_epochs']} epochs", backend.is_main)
        return early

    def state_dict(self) -> dict:
        return dict(self.best)

    def load_state_dict(self, state: dict) -> None:
        self.best.update(state)

    def export(self, view: LoopView) -> None:
        digests = gather_digests(state_digest(self.model), self.backend)
        if len(set(digests)) > 1:
            log_line(f"warning: the ranks' final weights differ: {digests}", self.backend.is_main)
        if self.backend.is_main:
            write_outputs(self.cfg, self.out, self.classes, {**view.state, **self.best,
                                                             "epoch": view.state["step"] // self.steps_per_epoch},
                          self.backend.world, digests)


def train(cfg: ExpertConfig) -> int:
    backend = DDPBackend(cfg.train.mixed_precision)
    task = ExpertTask(cfg, backend)
    return Trainer(task, backend, task.settings(), config=cfg).run()


def write_outputs(cfg: ExpertConfig, out: Path, classes: list[str], state: dict, world_size: int,
                  replica_digests: list[str]) -> None:
    """The deliverable: the best weights as expert.safetensors, its card and confusion matrix."""
    model = Expert(cfg.model.arch, len(classes), cfg.data.channels, cfg.model.input_size, cfg.model.head)
    if not (out / BEST_WEIGHTS).is_file() or "best_confusion" not in state:
        raise FadscaleError(f"{out / BEST_WEIGHTS}: the best weights of this run are missing; "
                            "set run.resume=never to train again")
    best = {k.removeprefix("module."): v for k, v in load_file(str(out / BEST_WEIGHTS)).items()}
    model.load_state_dict(best)
    confusion = torch.tensor(state["best_confusion"])
    per_class = (confusion.diag() / confusion.sum(1).clamp(min=1)).tolist()
    card = {
        "arch": cfg.model.arch,
        "head": cfg.model.head,
        "classes": classes,
        "in_chans": cfg.data.channels,
        "input_size": cfg.model.input_size,
        "normalization": {"mean": [0.5] * cfg.data.channels, "std": [0.5] * cfg.data.channels},
        "feature_dim": model.feature_dim,
        "spatial_feature_dim": model.spatial_dim,
        "val_accuracy": state["best_accuracy"],
        "val_accuracy_per_class": dict(zip(classes, per_class)),
        "val_count": int(confusion.sum()),
        "best_epoch": state["best_epoch"],
        "epochs_trained": state["epoch"],
        "steps_trained": state["step"],
        "batchnorm": "recomputed before each validation" if batchnorm_layers(model) else None,
        "data": {"shards": str(Path(cfg.data.shards).resolve()), "subset": cfg.data.subset,
                 "subset_seed": cfg.data.subset_seed, "max_per_class": cfg.data.max_per_class,
                 "manifest_sha256": sha256_file(Path(cfg.data.shards) / "manifest.json")},
        "config": cfg.model_dump(mode="json"),
        "settings_digest": digest(state["settings"]) if state.get("settings") else None,
        "settings_changes": state.get("settings_changes", []),
        "world_size": world_size,
        # sha256 of each rank's final training state (parameters and buffers): all equal under DDP.
        "replica_sha256": replica_digests,
        "fadscale_version": __version__,
        "git_commit": git_commit(),
    }
    card = save_expert(out, model, card)
    save_confusion_png(confusion, classes, out / "confusion.png",
                       f"{cfg.model.arch} val accuracy {state['best_accuracy']:.3f} (subset {cfg.data.subset})")
    log_line(f"wrote {out / 'expert.json'}: val accuracy {state['best_accuracy']:.3f}", True)


def main(argv=None) -> None:
    run_entry("train_expert", ExpertConfig, train, argv)


if __name__ == "__main__":
    main()
