"""Train the expert classifier with raw torch.distributed + DistributedDataParallel.

    torchrun --nproc_per_node 2 -m fadscale.train_expert --config configs/tiny/expert.yaml
    fadscale train-expert --config configs/expert.yaml --nproc 8

The expert's pooled features are FAD's alignment target; a second expert trained the same way on the
other half of the tiles (`data.subset: B`) is the independent evaluator of generated images.

BatchNorm statistics are recomputed before every validation ("precise BN": cumulative averages over
up to PRECISE_BN_SAMPLES training samples with the current weights, averaged over ranks). The running
averages that training keeps (momentum 0.1) trail weights that move fast, which is the case in short
runs at a high learning rate: the tiny CPU expert validated at 0.17 with them and at 0.79 with the
recomputed ones, same weights. Recomputing also leaves every rank with identical buffers.

Stopping and resuming: SIGUSR1/SIGTERM or a STOP file in run.out_dir stops every rank after the
current step; the run checkpoints (model, optimizer, scheduler, state, each rank's RNG state) and
exits 0 without writing the expert. The next run resumes from the newest complete checkpoint,
mid-epoch included (the loader skips the batches already done), and continues exactly as an
uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel

from fadscale import __version__
from fadscale.config import ExpertConfig, save_config
from fadscale.data.loader import batches_per_epoch, eval_loader, split_count, train_loader
from fadscale.data.shard import load_manifest
from fadscale.models.expert import Expert, load_initial_weights, save_expert
from fadscale.runtime.checkpoint import latest_checkpoint, save_checkpoint
from fadscale.runtime.distributed import World, all_reduce_sum, any_rank, barrier, detect_world, init_distributed
from fadscale.runtime.entry import run_entry
from fadscale.runtime.io import FadscaleError, atomic_write_json, git_commit, read_json, sha256_file
from fadscale.runtime.logging import RunLogger, log_line
from fadscale.runtime.schedule import make_scheduler
from fadscale.runtime.signals import StopRequest

BEST_WEIGHTS = "best.safetensors"
PRECISE_BN_SAMPLES = 2048  # over all ranks; Wu & Johnson (2021): 10^3-10^4 samples estimate BN well


def autocast(device: torch.device, mode: str):
    """bf16 autocast on GPU by default ('auto'), on CPU only when asked ('bf16')."""
    enabled = mode == "bf16" or (mode == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: torch.nn.Module, cfg: ExpertConfig, world: World, device: torch.device,
             num_classes: int) -> torch.Tensor:
    """Confusion matrix [true, predicted] over the whole val split, summed over ranks."""
    model.eval()
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.float64)
    loader = eval_loader(cfg.data.shards, split="val", batch_size=cfg.data.batch_size,
                         image_size=cfg.data.image_size, channels=cfg.data.channels, rank=world.rank,
                         world_size=world.world_size, workers=cfg.data.workers, subset=cfg.data.subset,
                         subset_seed=cfg.data.subset_seed)
    for batch in loader:
        with autocast(device, cfg.train.mixed_precision):
            logits = model(batch["image"].to(device))
        pairs = batch["label"] * num_classes + logits.argmax(1).cpu()
        confusion += torch.bincount(pairs, minlength=num_classes * num_classes).double()
    model.train()
    return all_reduce_sum(confusion.to(device)).cpu().view(num_classes, num_classes)


def batchnorm_layers(model: torch.nn.Module) -> list[torch.nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate_batchnorm(model: torch.nn.Module, cfg: ExpertConfig, world: World, device: torch.device,
                          epoch: int, steps_per_epoch: int) -> int:
    """Recompute BatchNorm running statistics for the current weights ("precise BN").

    Forward passes in train mode over up to PRECISE_BN_SAMPLES training samples (a stream of its own,
    seeded by run.seed and epoch, so a resumed run repeats it), cumulative averages per layer, then
    averaged over ranks. Returns the number of batches used (0: the model has no BatchNorm)."""
    norms = batchnorm_layers(model)
    if not norms:
        return 0
    per_step = cfg.data.batch_size * world.world_size
    batches = min(steps_per_epoch, max(1, math.ceil(PRECISE_BN_SAMPLES / per_step)))
    loader = train_loader(cfg.data.shards, batch_size=cfg.data.batch_size, image_size=cfg.data.image_size,
                          channels=cfg.data.channels, seed=cfg.run.seed + 7919, epoch=epoch, rank=world.rank,
                          world_size=world.world_size, workers=cfg.data.workers,
                          shuffle_buffer=cfg.data.shuffle_buffer, samples_per_epoch=batches * per_step,
                          views=cfg.data.views, subset=cfg.data.subset, subset_seed=cfg.data.subset_seed)
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    was_training = model.training
    model.train()
    for batch in loader:
        with autocast(device, cfg.train.mixed_precision):
            model(batch["image"].to(device))
    model.train(was_training)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
        if world.distributed:
            for buffer in (m.running_mean, m.running_var):
                buffer.copy_(all_reduce_sum(buffer.clone()) / world.world_size)
    return batches


def state_digest(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer: equal on all ranks when DDP kept them in sync."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def gather_digests(digest: str, world: World, device: torch.device) -> list[str]:
    """Every rank's digest, on every rank."""
    if not world.distributed:
        return [digest]
    table = torch.zeros(world.world_size, 32, dtype=torch.int64, device=device)
    table[world.rank] = torch.tensor(list(bytes.fromhex(digest)), dtype=torch.int64, device=device)
    return [bytes(row).hex() for row in all_reduce_sum(table).cpu().tolist()]


def save_confusion_png(confusion: torch.Tensor, classes: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = confusion / confusion.sum(1, keepdim=True).clamp(min=1)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * len(classes), 0.8 + 0.6 * len(classes)))
    ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, int(confusion[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


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


def _head_classes(state: dict[str, torch.Tensor], model: Expert) -> tuple[int, int] | None:
    """(classes in `state`, classes of `model`) when the final head layer's shapes disagree."""
    name = [k for k in model.head.state_dict() if k.endswith("weight")][-1]
    key = f"head.{name}"
    if key in state and state[key].ndim == 2 and state[key].shape[0] != model.num_classes:
        return int(state[key].shape[0]), model.num_classes
    return None


def load_resume_weights(model: Expert, folder: Path, shards: str) -> None:
    """Model weights of a checkpoint folder, with one clear line for a corrupt or foreign one."""
    path = folder / "model.safetensors"
    advice = f"delete {folder} to fall back to an older checkpoint, or set run.resume=never"
    try:
        state = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - missing, truncated, not safetensors: the same user error
        raise FadscaleError(f"{path}: corrupt checkpoint ({type(exc).__name__}: {exc}); {advice}") from None
    mismatch = _head_classes(state, model)
    if mismatch is not None:
        raise FadscaleError(f"{path}: checkpoint was trained for {mismatch[0]} classes but {shards} has "
                            f"{mismatch[1]}; use another run.out_dir or the shards it was trained on")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0]
        raise FadscaleError(f"{path}: checkpoint does not fit {model.arch} (in_chans {model.in_chans}): "
                            f"{detail[:200]}; {advice}") from None


def _load_torch(path: Path, device, advice: str):
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise FadscaleError(f"{path}: corrupt checkpoint ({type(exc).__name__}); {advice}") from None


def train(cfg: ExpertConfig) -> int:
    with StopRequest(cfg.run.out_dir) as stop:  # SIGUSR1/SIGTERM mean "checkpoint and exit" only meanwhile
        return _train(cfg, stop)


def _train(cfg: ExpertConfig, stop: StopRequest) -> int:
    world = detect_world()
    device = init_distributed(world)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    out = Path(cfg.run.out_dir)
    manifest, classes = check_data(cfg)

    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    model = Expert(cfg.model.arch, len(classes), cfg.data.channels, cfg.model.input_size, cfg.model.head,
                   cfg.model.drop_rate)
    resume = latest_checkpoint(out / "checkpoints") if cfg.run.resume == "auto" else None
    if resume is not None:
        load_resume_weights(model, resume[1], cfg.data.shards)
    elif cfg.model.pretrained:
        log_line(load_initial_weights(model, cfg.model.pretrained), world.is_main)

    samples = cfg.data.samples_per_epoch or split_count(cfg.data.shards, "train", cfg.data.subset)
    steps_per_epoch = batches_per_epoch(samples, cfg.data.batch_size, world.world_size)
    total_steps = steps_per_epoch * cfg.train.epochs
    state = {"epoch": 0, "batch": 0, "step": 0, "best_accuracy": -1.0, "best_epoch": -1, "stale_epochs": 0,
             "early_stopped": False, "world_size": world.world_size}

    if cfg.model.sync_batchnorm and world.distributed:
        if device.type == "cuda":
            from timm.layers import convert_sync_batchnorm  # also converts timm's BatchNormAct layers

            model = convert_sync_batchnorm(model)
        else:
            log_line("note: model.sync_batchnorm needs a GPU (PyTorch's SyncBatchNorm); ignored on CPU",
                     world.is_main)
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                                  betas=cfg.optim.betas)
    scheduler = make_scheduler(optimizer, cfg.optim, total_steps)
    rng_state = None
    if resume is not None:
        folder = resume[1]
        advice = f"delete {folder} to fall back to an older checkpoint, or set run.resume=never"
        optimizer.load_state_dict(_load_torch(folder / "optimizer.pt", device, advice))
        scheduler.load_state_dict(_load_torch(folder / "scheduler.pt", "cpu", advice))
        state = {**state, **read_json(folder / "state.json", "checkpoint state")}
        if state.get("world_size") == world.world_size and (folder / f"rng-{world.rank}.pt").is_file():
            rng_state = _load_torch(folder / f"rng-{world.rank}.pt", "cpu", advice)
        elif state.get("world_size") != world.world_size:
            log_line(f"note: {folder} was written by {state.get('world_size')} process(es), this run has "
                     f"{world.world_size}: it continues, but not exactly as the original run would", world.is_main)
        state["world_size"] = world.world_size
        log_line(f"resumed from {folder} (epoch {state['epoch']}, batch {state['batch']})", world.is_main)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world.distributed else model

    if world.is_main:
        stop.clear_stale_file()
        save_config(cfg, out / "config.yaml")
    barrier()  # no rank may see the stale STOP file the main rank just removed
    logger = RunLogger(out, world.is_main)

    def checkpoint() -> None:
        def write(folder: Path) -> None:
            # Every rank keeps its RNG state (dropout, ...) so a mid-epoch resume continues exactly.
            rng = {"cpu": torch.get_rng_state()}
            if device.type == "cuda":
                rng["cuda"] = torch.cuda.get_rng_state(device)
            torch.save(rng, folder / f"rng-{world.rank}.pt")
            if world.is_main:
                save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                          str(folder / "model.safetensors"))
                torch.save(optimizer.state_dict(), folder / "optimizer.pt")
                torch.save(scheduler.state_dict(), folder / "scheduler.pt")
                atomic_write_json(folder / "state.json", state)

        save_checkpoint(out / "checkpoints", state["step"], write, keep_last=cfg.checkpoint.keep_last,
                        is_main=world.is_main)

    if state["early_stopped"] or state["epoch"] >= cfg.train.epochs:
        log_line(f"{out}: training already finished (epoch {state['epoch']}); writing the outputs again",
                 world.is_main)
    else:
        log_line(f"expert {cfg.model.arch}: {world.world_size} process(es) on {device.type}, "
                 f"{steps_per_epoch} steps/epoch x {cfg.train.epochs} epochs", world.is_main)
    stopped = False
    while state["epoch"] < cfg.train.epochs and not state["early_stopped"]:
        epoch = state["epoch"]
        # Reseeded per epoch (and rank) so a run resumed at an epoch boundary repeats the same randomness.
        torch.manual_seed(cfg.run.seed * 100003 + epoch * 1009 + world.rank)
        loader = train_loader(cfg.data.shards, batch_size=cfg.data.batch_size, image_size=cfg.data.image_size,
                              channels=cfg.data.channels, seed=cfg.run.seed, epoch=epoch, rank=world.rank,
                              world_size=world.world_size, workers=cfg.data.workers,
                              shuffle_buffer=cfg.data.shuffle_buffer, samples_per_epoch=samples,
                              views=cfg.data.views, subset=cfg.data.subset, subset_seed=cfg.data.subset_seed,
                              start_batch=state["batch"])
        batches = iter(loader)  # draws the DataLoader's base seed from the RNG, as an uninterrupted run did
        if rng_state is not None:  # resumed mid-epoch: continue the RNG where the stopped run left it
            if state["batch"] > 0:
                torch.set_rng_state(rng_state["cpu"])
                if "cuda" in rng_state and device.type == "cuda":
                    torch.cuda.set_rng_state(rng_state["cuda"], device)
            rng_state = None
        started, seen = time.perf_counter(), 0
        for batch in batches:
            images, labels = batch["image"].to(device), batch["label"].to(device)
            with autocast(device, cfg.train.mixed_precision):
                loss = F.cross_entropy(ddp(images), labels, label_smoothing=cfg.train.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or float("inf"))
            optimizer.step()
            scheduler.step()
            state["step"] += 1
            state["batch"] += 1
            seen += images.shape[0] * world.world_size
            if state["step"] % cfg.train.log_every == 0:
                logger.scalars(state["step"], {"train/loss": loss.item(), "train/grad_norm": grad_norm.item(),
                                               "train/lr": scheduler.get_last_lr()[0],
                                               "train/images_per_s": seen / (time.perf_counter() - started)})
            if any_rank(stop.requested(), device):
                stopped = True
                break
        if stopped:
            log_line(f"stop requested ({stop.reason or 'another rank'}): checkpointing at step {state['step']}",
                     world.is_main)
            checkpoint()
            break

        recalibrate_batchnorm(model, cfg, world, device, epoch, steps_per_epoch)
        confusion = evaluate(model, cfg, world, device, len(classes))
        if confusion.sum() == 0:
            raise FadscaleError(f"{cfg.data.shards}: no val tile falls in data.subset {cfg.data.subset}; "
                                "shard with a larger --val-fraction")
        accuracy = float(confusion.diag().sum() / confusion.sum())
        per_class = confusion.diag() / confusion.sum(1).clamp(min=1)
        logger.scalars(state["step"], {"val/accuracy": accuracy, "epoch": epoch,
                                       **{f"val/accuracy/{c}": float(a) for c, a in zip(classes, per_class)}})
        log_line(f"epoch {epoch + 1}/{cfg.train.epochs}: val accuracy {accuracy:.3f} "
                 f"({int(confusion.sum())} tiles)", world.is_main)
        if accuracy > state["best_accuracy"]:
            state.update(best_accuracy=accuracy, best_epoch=epoch, stale_epochs=0,
                         best_confusion=confusion.tolist())
            if world.is_main:
                tmp = out / f".{BEST_WEIGHTS}.tmp"
                save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))
                tmp.replace(out / BEST_WEIGHTS)
        else:
            state["stale_epochs"] += 1
        state["epoch"], state["batch"] = epoch + 1, 0
        early = cfg.train.early_stopping is not None and state["stale_epochs"] >= cfg.train.early_stopping
        state["early_stopped"] = early
        if (epoch + 1) % cfg.checkpoint.every == 0 or early or state["epoch"] == cfg.train.epochs:
            checkpoint()
        if early:
            log_line(f"early stopping: no improvement for {state['stale_epochs']} epochs", world.is_main)

    if not stopped:
        digests = gather_digests(state_digest(model), world, device)
        if len(set(digests)) > 1:
            log_line(f"warning: the ranks' final weights differ: {digests}", world.is_main)
        if world.is_main:
            write_outputs(cfg, out, classes, manifest, state, world, digests)
    logger.close()
    barrier()
    return 0


def write_outputs(cfg: ExpertConfig, out: Path, classes: list[str], manifest: dict, state: dict,
                  world: World, replica_digests: list[str]) -> None:
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
                 "subset_seed": cfg.data.subset_seed,
                 "manifest_sha256": sha256_file(Path(cfg.data.shards) / "manifest.json")},
        "config": cfg.model_dump(mode="json"),
        "world_size": world.world_size,
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
