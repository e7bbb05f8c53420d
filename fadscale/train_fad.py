"""Train feature-aligned diffusion (FAD), or plain training with `align.enabled: false`.

    accelerate launch -m fadscale.train_fad --config configs/fad.yaml
    accelerate launch --multi_gpu --num_processes 2 -m fadscale.train_fad --config configs/tiny/fad.yaml  (CPU)

The step is fadscale.core.fad's FadObjective on its FadModel: noise a batch of tiles at random timesteps;
one UNet forward that also yields the aligned layer's feature (a hook); noise loss + align.weight x
alignment loss against the expert feature read from the feature cache for the view the UNet sees. This
module builds them from the config, feeds the data and writes what a run leaves: learning curves, sample
grids and final/ (the run card). The loop around it (backward, accumulation, EMA, checkpoints, stop/resume) is fadscale.training's Trainer,
on the accelerate backend (DDP or DeepSpeed).

The feature cache must exist (`fadscale cache-features`, which `fadscale train` and the pipeline run
first); a missing or stale one is refused with the command that builds it.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
from diffusers import DDPMScheduler
from safetensors.torch import save_file
from torch import nn

from fadscale import __version__
from fadscale.artifacts import HEAD_FILE, RUN_CARD
from fadscale.core.align import build_projector, top_direction_share
from fadscale.artifacts.feature_cache import check_cache
from fadscale.core.conditioning import CONDITIONING_FILE, ClassConditioning, load_table
from fadscale.config import FadConfig, needs_spatial, uses_cache
from fadscale.data.loader import batches_per_epoch, eval_loader, loader_from_config, split_count
from fadscale.data.shard import load_manifest
from fadscale.core.probe import GenerationProbe
from fadscale.core.models.expert import load_expert, read_card
from fadscale.core.models.unet import build_unet, count_parameters, get_module, probe_feature_shape
from fadscale.core.models.vae import vae_scaling_factor
from fadscale.core.fad import FadModel, FadObjective
from fadscale.core.objective import random_crops, step_generator
from fadscale.runtime.entry import run_entry
from fadscale.errors import FadscaleError
from fadscale.runtime.io import atomic_output_dir, foreign_entries, git_commit, write_checksums
from fadscale.runtime.logging import log_line, read_metrics
from fadscale.training.lr_schedule import make_lr_schedule
from fadscale.training.optimizer import make_optimizer
from fadscale.core.sampling import generate, grid, make_scheduler as make_sampler, noise_config
from fadscale.training.backend import AccelerateBackend
from fadscale.training.fingerprint import digest
from fadscale.training.task import LoopSettings, LoopView, TrainParts
from fadscale.training.trainer import Trainer

def loop_settings(cfg: FadConfig, source: str, world: int) -> LoopSettings:
    samples = cfg.data.samples_per_epoch or split_count(source, "train", cfg.data.subset, cfg.data.max_per_class)
    return LoopSettings(out_dir=Path(cfg.run.out_dir), seed=cfg.run.seed, resume=cfg.run.resume,
                        max_steps=cfg.train.max_steps,
                        batches_per_epoch=batches_per_epoch(samples, cfg.data.batch_size, world),
                        log_every=cfg.train.log_every, checkpoint_every=cfg.checkpoint.every,
                        keep_last=cfg.checkpoint.keep_last, grad_clip=cfg.optim.grad_clip,
                        nan_tolerance=cfg.train.nan_tolerance, ema_decay=cfg.train.ema_decay,
                        batch_size=cfg.data.batch_size)


class FadTask:
    """FAD (or vanilla) on the training core: the model, the data from the feature cache, the step, learning
    curves and sample grids during training, and final/ at the end."""

    def __init__(self, cfg: FadConfig, backend: AccelerateBackend):
        self.cfg, self.backend = cfg, backend
        self.name = "FAD" if cfg.align.enabled else "vanilla"
        self.out = Path(cfg.run.out_dir)
        _check_output_dir(self.out, backend.rank)
        self.card = read_card(cfg.expert)
        self.manifest = load_manifest(cfg.data.shards)
        self.classes = [c["name"] for c in self.manifest["classes"]]
        if self.card["classes"] != self.classes:
            raise FadscaleError(f"{cfg.expert}: the expert's classes {self.card['classes']} differ from those "
                                f"of {cfg.data.shards} {self.classes}")
        self.uses_cache = uses_cache(cfg)
        self.cache_manifest = check_cache(cfg, self.card) if self.uses_cache else None
        self.noise = DDPMScheduler(**noise_config(cfg.noise))
        self.probe = None
        self.online_expert = None

    # ---------------------------------------------------------------- build

    def build(self, backend) -> TrainParts:
        cfg = self.cfg
        torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank
        self.space_channels, self.sample_size = cfg.data.channels, cfg.data.image_size
        if cfg.model.space == "latent":
            latent = self.cache_manifest["cache"]["arrays"]["latent.npy"]["shape"]  # [8, 2C, h, w]
            self.space_channels, self.sample_size = latent[1] // 2, latent[2]
            self.vae_scale = vae_scaling_factor(cfg.model.vae)
        class_embeds = len(self.classes) + 1 if cfg.conditioning.class_embedding else None  # + the null class
        unet = build_unet(cfg.model.preset, self.space_channels, self.sample_size, cfg.model.pretrained, class_embeds)
        table = load_table(Path(cfg.cache.dir) / CONDITIONING_FILE) if cfg.conditioning.text_encoder else None
        conditioning = ClassConditioning(len(self.classes), unet.config.cross_attention_dim, table)
        projector = None
        if cfg.align.enabled:
            shape = probe_feature_shape(unet, cfg.align.layer, self.space_channels, self.sample_size)
            projector = build_projector(cfg.align.projector, self._target_dim(), shape,
                                        cfg.align.repa_hidden, cfg.align.layer, cfg.align.center_target)
        else:
            get_module(unet, cfg.align.layer)  # a typo in the layer is still an error in the baseline
        if cfg.model.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        self.channels_last = cfg.model.channels_last and backend.deepspeed is None
        if self.channels_last:  # DeepSpeed broadcasts parameters as flat bytes: they must stay contiguous
            unet.to(memory_format=torch.channels_last)
        model = FadModel(unet, conditioning, projector, cfg.align.layer)
        if cfg.align.enabled and cfg.align.target in ("noisy-online", "noisy-reference"):
            if projector.needs_spatial:
                raise FadscaleError(f"align.target {cfg.align.target} works with the seed projector only")
            self.online_expert = load_expert(cfg.expert, backend.device)[0].requires_grad_(False)
            if cfg.align.target == "noisy-reference":
                self.online_expert.train()  # BatchNorm on batch statistics, as the reference leaves it
        self.objective = FadObjective(cfg, self.noise, self.card, self.online_expert, needs_spatial(cfg))
        optimizer = make_optimizer(model.parameters(), cfg.optim, backend.device)
        schedule = make_lr_schedule(optimizer, cfg.optim, cfg.train.max_steps)
        if cfg.model.compile:
            model.unet = torch.compile(model.unet)
        backend.configure_deepspeed(cfg.data.batch_size, cfg.optim.grad_clip)
        if cfg.eval.every and backend.is_main:
            self.probe = self._build_probe()
        self.model = model  # unwrapped; the trainer prepares its own reference
        log_line(f"{self.name} training: UNet {cfg.model.preset} ({count_parameters(unet) / 1e6:.1f}M params), "
                 f"{backend.world} process(es) on {backend.device.type}, mixed precision {backend.mixed_precision}, "
                 f"{cfg.train.max_steps} steps", backend.is_main)
        return TrainParts(model, optimizer, schedule, ema_module=unet)

    def _target_dim(self) -> int:
        """Channels of what the projector is compared with: the cached map's (a stage's map may be narrower than
        the pooled feature), else the expert's pooled feature."""
        if self.uses_cache and needs_spatial(self.cfg):
            return int(self.cache_manifest["cache"]["arrays"]["spatial.npy"]["shape"][1])
        return int(self.card["feature_dim"])

    def _build_probe(self) -> GenerationProbe:
        cfg = self.cfg
        if cfg.model.space == "latent":
            raise FadscaleError("eval.every: learning curves are scored in pixel space only (this run is latent); "
                                "sample and evaluate the final run instead")
        return GenerationProbe(evaluator_card=cfg.eval.evaluator, alignment_card=self.card,
                               shards=cfg.data.shards, classes=self.classes, image_size=self.sample_size,
                               channels=self.space_channels, per_class=cfg.eval.per_class,
                               scheduler=cfg.eval.scheduler, steps=cfg.eval.steps, noise=noise_config(cfg.noise),
                               device=self.backend.device)

    @property
    def unet(self) -> nn.Module:
        return self.model.unet

    @property
    def input_dtype(self) -> torch.dtype:
        # DeepSpeed bf16 keeps bf16 weights (fp32 master copies in the optimizer): inputs must match.
        return next(self.model.unet.parameters()).dtype

    # ---------------------------------------------------------------- data

    def _features(self) -> tuple[str, ...]:
        wanted = []
        if self.cfg.align.enabled and self.cfg.align.target == "cached":
            wanted.append("spatial.npy" if needs_spatial(self.cfg) else "pooled.npy")
        if self.cfg.model.space == "latent":
            wanted.append("latent.npy")
        return tuple(wanted)

    @property
    def source(self) -> str:
        """What the loader reads: the feature cache (a shard folder with the cached arrays) or the shards."""
        return self.cfg.cache.dir if self.uses_cache else self.cfg.data.shards

    def loader(self, epoch: int, start_batch: int):
        return loader_from_config(self.cfg, self.source, epoch=epoch, rank=self.backend.rank, world_size=self.backend.world,
                                  features=self._features(), start_batch=start_batch)

    # ---------------------------------------------------------------- the step

    def train_step(self, model: nn.Module, batch: dict, micro_step: int, step: int) -> tuple[torch.Tensor, dict]:
        gen = step_generator(self.cfg.run.seed, micro_step, self.backend.rank)
        labels = batch["label"].to(self.backend.device)
        clean = self._clean(batch, gen)
        crop, until = self.cfg.train.crop, self.cfg.train.crop_until
        if crop and (until is None or step < until):
            clean = random_crops(clean, crop, gen)
        return self.objective(model, clean, labels, batch, step, gen, self.input_dtype, self.channels_last)

    def _clean(self, batch: dict, gen: torch.Generator) -> torch.Tensor:
        """The clean sample: the tile, or in latent space a draw from the cached VAE posterior."""
        device = self.backend.device
        if self.cfg.model.space != "latent":
            return batch["image"].to(device)
        mean, logvar = batch["latent"].to(device).chunk(2, dim=1)
        eps = torch.randn(mean.shape, generator=gen).to(device)
        return (mean + torch.exp(0.5 * logvar) * eps) * self.vae_scale

    # ---------------------------------------------------------------- periodic work

    def after_step(self, view: LoopView) -> bool:
        cfg, step = self.cfg, view.step
        # A grid at the last step whatever sample_every says: every run's TensorBoard shows what it makes.
        if (cfg.train.sample_every and step % cfg.train.sample_every == 0) or step == cfg.train.max_steps:
            self._log_grid(view)
        if cfg.eval.every and (step % cfg.eval.every == 0 or step == cfg.train.max_steps):
            self._evaluate(view)
        return False

    @contextlib.contextmanager
    def _ema_weights(self, ema):
        """The UNet with its EMA weights (when kept) for the duration of the block."""
        params = list(self.unet.parameters())
        if ema is None:
            yield self.unet
            return
        ema.store(params)
        ema.copy_to(params)
        try:
            yield self.unet
        finally:
            ema.restore(params)

    def conditioning_table(self) -> torch.Tensor:
        return self.model.conditioning.table.detach().float().cpu()

    @torch.no_grad()
    def _log_grid(self, view: LoopView) -> None:
        if self.backend.is_main and self.cfg.model.space != "latent":
            per_class = 4
            labels = torch.arange(len(self.classes)).repeat_interleave(per_class)
            with self._ema_weights(view.ema) as unet:
                was_training = unet.training
                unet.eval()
                images = generate(unet, self.conditioning_table(), labels, list(range(len(labels))),
                                  scheduler=make_sampler("dpm++", noise_config(self.cfg.noise)), steps=15,
                                  image_size=self.sample_size, channels=self.space_channels, device=self.backend.device,
                                  dtype=self.input_dtype)
                unet.train(was_training)
            view.logger.image("samples/per_class", view.step, (grid(images.cpu(), len(self.classes)) + 1) / 2)
        self.backend.barrier()

    @torch.no_grad()
    def _evaluate(self, view: LoopView) -> None:
        """A learning-curve point (main rank, EMA weights when kept); the other ranks wait for it."""
        if self.probe is not None:
            with self._ema_weights(view.ema) as unet:
                scores = self.probe(unet, self.conditioning_table().to(self.input_dtype))
            view.logger.scalars(view.step, {**scores, "eval/train_seconds": view.train_seconds})
            log_line(f"step {view.step}: generation accuracy {scores['eval/generation_accuracy']:.3f}, "
                     f"Frechet {scores['eval/frechet']:.1f}", True)
        self.backend.barrier()

    # ---------------------------------------------------------------- resumable state, final artifacts

    def state_dict(self) -> dict:
        return {}  # everything the step depends on is in the model (the projector's buffers too) and the loop

    def load_state_dict(self, state: dict) -> None:
        pass

    @torch.no_grad()
    def target_diagnostic(self, tiles: int = 256) -> dict | None:
        """The collapse diagnostic of the final run: the top-direction share (align.top_direction_share) of
        the alignment targets of up to `tiles` training tiles (view 0), and of the expert features they
        come from (cached, or the online expert on the clean tiles)."""
        cfg = self.cfg
        projector = self.model.projector
        if projector is None:
            return None
        cached = cfg.align.target == "cached"
        key = "spatial" if needs_spatial(cfg) else "pooled"
        loader = eval_loader(cfg.cache.dir if cached else cfg.data.shards, split="train", batch_size=64,
                             image_size=cfg.data.image_size, channels=cfg.data.channels,
                             features=(f"{key}.npy",) if cached else ())
        features, count = [], 0
        for batch in loader:
            if cached:
                features.append(batch[key].to(self.backend.device))
            else:
                images = batch["image"].to(self.backend.device)
                features.append(self.online_expert.features(self.objective.expert_input(images)))
            count += len(features[-1])
            if count >= tiles:
                break
        expert = torch.cat(features)[:tiles].float()
        was_training = projector.training
        projector.eval()
        targets = projector.targets(expert)
        projector.train(was_training)
        return {"tiles": len(expert), "target_top_direction_share": top_direction_share(targets),
                "expert_top_direction_share": top_direction_share(expert),
                "what": "share of the unit-normalised targets' second moment along its top direction "
                        "(1: every tile's target points one way)"}

    def _rank_checksums(self) -> list[float]:
        """A checksum of this rank's trainable weights, gathered from every rank: equal when in sync."""
        total = torch.stack([p.detach().double().sum() for p in self.model.parameters()]).sum()
        return self.backend.gather_float(float(total))

    def export(self, view: LoopView) -> None:
        """final/: unet (raw) and unet_ema in diffusers format, the FAD head, the run card; atomically."""
        logger, ema, state = view.logger, view.ema, view.state
        checksums = self._rank_checksums()  # collective: before the main-rank-only part
        if not self.backend.is_main:
            return
        cfg, model = self.cfg, self.model
        unet = model.unet._orig_mod if hasattr(model.unet, "_orig_mod") else model.unet
        with atomic_output_dir(self.out / "final", overwrite=True, made_by=RUN_CARD.filename) as folder:
            unet.save_pretrained(folder / "unet")
            if ema is not None:
                with self._ema_weights(ema):
                    unet.save_pretrained(folder / "unet_ema")
            head = {"conditioning.table": model.conditioning.table.detach().float().cpu().contiguous()}
            if model.projector is not None:
                head.update({f"projector.{k}": v.detach().float().cpu().contiguous()
                             for k, v in model.projector.state_dict().items()})
            save_file(head, str(folder / HEAD_FILE))
            last: dict = {}  # the newest value of every logged key (loss records and eval records alike)
            for record in read_metrics(self.out):
                last.update(record)
            card = {
                "step": state["step"],
                "method": "fad" if cfg.align.enabled else "vanilla",
                "classes": self.classes,
                "space": cfg.model.space,
                "channels": self.space_channels,
                "image_size": cfg.data.image_size,
                "sample_size": self.sample_size,
                "null_index": len(self.classes),
                "noise": noise_config(cfg.noise),
                "expert": {"card": str(Path(cfg.expert).resolve()), "sha256": self.card["sha256"]},
                "shards_manifest": str((Path(cfg.data.shards) / "manifest.json").resolve()),
                "cache": cfg.cache.dir if self.uses_cache else None,
                "vae": cfg.model.vae,
                "final_metrics": {k: v for k, v in last.items() if k not in ("step", "time")},
                "alignment_diagnostic": self.target_diagnostic(),
                "skipped_steps": state["nan_total"],
                "skipped_records": state.get("skipped_records", 0),
                "world_size": self.backend.world,
                "rank_weight_checksums": checksums,
                "ranks_in_sync": len(set(checksums)) == 1,
                "mixed_precision": self.backend.mixed_precision,
                "config": cfg.model_dump(mode="json"),
                "settings_digest": digest(state["settings"]) if state.get("settings") else None,
                "settings_changes": state.get("settings_changes", []),
                "fadscale_version": __version__,
                "git_commit": git_commit(),
                "torch": torch.__version__,
            }
            RUN_CARD.write(folder, card)
            write_checksums(folder)  # last: `fadscale sample` and export check the files against it
        logger.hparams({"method": card["method"], "lr": cfg.optim.lr, "align_weight": cfg.align.weight,
                        "projector": cfg.align.projector, "layer": cfg.align.layer, "batch": cfg.data.batch_size},
                       {"hparam/final_noise_loss": float(last.get("loss/noise", math.nan)),
                        **{f"hparam/{key.removeprefix('eval/')}": float(last[key])
                           for key in ("eval/generation_accuracy", "eval/frechet") if key in last}})
        log_line(f"wrote {self.out / 'final'} (step {state['step']})", True)


def _check_output_dir(out: Path, rank: int) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{rank}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise FadscaleError(f"run.out_dir {out}: not writable ({exc.strerror})") from None
    # final/ is replaced at the end: say now, not after hours of training, that it holds something of the user's.
    if (out / "final").is_dir() and (foreign := foreign_entries(out / "final")):
        raise FadscaleError(f"{out / 'final'}: holds {', '.join(foreign[:3])}, which training did not write; it "
                            "replaces final/ when it ends: move it out first")


def fad_trainer(cfg: FadConfig) -> Trainer:
    """The FAD task on the accelerate backend under the training loop (not yet run)."""
    # Parameters unused in some steps (alignment switched off at until_step) need DDP's search for them.
    backend = AccelerateBackend(cfg.train.mixed_precision, cfg.train.grad_accum,
                                find_unused_parameters=cfg.align.until_step is not None)
    task = FadTask(cfg, backend)
    return Trainer(task, backend, loop_settings(cfg, task.source, backend.world), config=cfg)


def run(cfg: FadConfig) -> int:
    return fad_trainer(cfg).run()


def main(argv=None) -> None:
    run_entry("train_fad", FadConfig, run, argv)


if __name__ == "__main__":
    main()
