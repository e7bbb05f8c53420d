"""Train feature-aligned diffusion (FAD), or plain fine-tuning with `align.enabled: false`.

    accelerate launch -m fadscale.train_fad --config configs/fad.yaml
    accelerate launch --multi_gpu --num_processes 2 -m fadscale.train_fad --config configs/tiny/fad.yaml  (CPU)

The step, top to bottom (`FadTrainer.step`): noise a batch of tiles at random timesteps; one UNet
forward that also yields the aligned layer's feature (a hook); noise loss + align.weight x alignment
loss against the expert feature read from the cache for the view the UNet sees; one backward.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from fadscale import __version__
from fadscale.align import FeatureTap, build_projector, top_direction_share
from fadscale.cache_features import build_cache, check_cache, needs_spatial
from fadscale.conditioning import CONDITIONING_FILE, ClassConditioning, load_table
from fadscale.learning_curve import GenerationProbe
from fadscale.config import FadConfig, save_config
from fadscale.data.loader import batches_per_epoch, eval_loader, train_loader
from fadscale.data.shard import load_manifest
from fadscale.models.expert import expert_input, load_expert, read_card
from fadscale.models.unet import build_unet, count_parameters, get_module, probe_feature_shape, uses_class_labels
from fadscale.runtime.checkpoint import latest_checkpoint, save_checkpoint
from fadscale.runtime.distributed import any_rank
from fadscale.runtime.entry import run_entry
from fadscale.runtime.io import FadscaleError, atomic_output_dir, atomic_write_json, git_commit, read_json
from fadscale.runtime.logging import RunLogger, log_line, read_metrics
from fadscale.runtime.schedule import make_scheduler
from fadscale.runtime.signals import StopRequest
from fadscale.sampling import generate, grid, make_scheduler as make_sampler, noise_config

HEAD_FILE = "fad_head.safetensors"


class FadModel(nn.Module):
    """UNet + class conditioning + (optional) alignment projector: one module, so DDP/DeepSpeed wrap
    and synchronise all trainable parts together and the alignment loss is part of the forward."""

    def __init__(self, unet: nn.Module, conditioning: ClassConditioning, projector: nn.Module | None, layer: str):
        super().__init__()
        self.unet, self.conditioning, self.projector = unet, conditioning, projector
        self.tap = FeatureTap(get_module(unet, layer)) if projector is not None else None

    def forward(self, noisy, timesteps, labels, drop, expert_target=None):
        tokens = self.conditioning(labels, drop)
        class_labels = self.conditioning.labels(labels, drop) if uses_class_labels(self.unet) else None
        if self.tap is not None:
            self.tap.arm()
        prediction = self.unet(noisy, timesteps, tokens, class_labels=class_labels).sample
        if self.tap is None:
            return prediction, None, None
        feature = self.tap.pop()
        if expert_target is None:  # alignment switched off for this step (align.until_step)
            return prediction, None, None
        align_loss, diagnostics = self.projector(feature, expert_target)
        return prediction, align_loss, diagnostics


def min_snr_weights(noise_scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023)."""
    alphas = noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    snr = alphas / (1 - alphas)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if prediction == "v_prediction" else clipped / snr


class TrainClock:
    """Seconds spent training (resumed runs continue the count), not counting what runs `paused()`:
    learning-curve points, sample grids and checkpoints. Time to quality is read off it."""

    def __init__(self, seconds: float = 0.0):
        self._base, self._start, self._paused = seconds, time.perf_counter(), 0.0

    def seconds(self) -> float:
        return self._base + time.perf_counter() - self._start - self._paused

    @contextlib.contextmanager
    def paused(self):
        start = time.perf_counter()
        try:
            yield
        finally:
            self._paused += time.perf_counter() - start


class FadTrainer:
    def __init__(self, cfg: FadConfig):
        self.cfg = cfg
        mixed = cfg.train.mixed_precision
        if mixed == "auto":
            mixed = "bf16" if torch.cuda.is_available() else "no"
        # Parameters unused in some steps (alignment switched off at until_step) need DDP's search for them.
        ddp_kwargs = DistributedDataParallelKwargs(find_unused_parameters=cfg.align.until_step is not None)
        self.accelerator = Accelerator(mixed_precision=mixed, gradient_accumulation_steps=cfg.train.grad_accum,
                                       cpu=not torch.cuda.is_available(), kwargs_handlers=[ddp_kwargs])
        acc = self.accelerator
        self.is_main, self.rank, self.world = acc.is_main_process, acc.process_index, acc.num_processes
        self.device = acc.device
        self.out = Path(cfg.run.out_dir)
        self._check_output_dir()
        self.stop = StopRequest(self.out)

        self.card = read_card(cfg.expert)
        self.manifest = load_manifest(cfg.data.shards)
        self.classes = [c["name"] for c in self.manifest["classes"]]
        if self.card["classes"] != self.classes:
            raise FadscaleError(f"{cfg.expert}: the expert's classes {self.card['classes']} differ from those "
                                f"of {cfg.data.shards} {self.classes}")
        self.uses_cache = (cfg.align.enabled and cfg.align.target == "cached") or cfg.model.space == "latent" \
            or cfg.conditioning.text_encoder is not None
        self.cache_manifest = self._prepare_cache() if self.uses_cache else None
        self._build_model()
        self.noise = DDPMScheduler(**noise_config(cfg.noise))
        self.probe = self._build_probe() if cfg.eval.every and self.is_main else None

    # ---------------------------------------------------------------- setup

    def _check_output_dir(self) -> None:
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            probe = self.out / f".write-test-{self.rank}"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise FadscaleError(f"run.out_dir {self.out}: not writable ({exc.strerror})") from None

    def _prepare_cache(self) -> dict:
        """Use the cache when it is complete and fits; build it (on all ranks) when it does not exist."""
        if not (Path(self.cfg.cache.dir) / "manifest.json").exists():
            log_line(f"feature cache {self.cfg.cache.dir} missing: building it first", self.is_main)
            build_cache(self.cfg)
        return check_cache(self.cfg, self.card)

    def _build_model(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank
        space_channels = cfg.data.channels
        sample_size = cfg.data.image_size
        if cfg.model.space == "latent":
            latent = self.cache_manifest["cache"]["arrays"]["latent.npy"]["shape"]  # [8, 2C, h, w]
            space_channels, sample_size = latent[1] // 2, latent[2]
            from diffusers import AutoencoderKL

            self.vae_scale = AutoencoderKL.load_config(cfg.model.vae).get("scaling_factor", 0.18215)
        self.space_channels, self.sample_size = space_channels, sample_size
        class_embeds = len(self.classes) + 1 if cfg.conditioning.class_embedding else None  # + the null class
        unet = build_unet(cfg.model.preset, space_channels, sample_size, cfg.model.pretrained, class_embeds)
        dim = unet.config.cross_attention_dim
        table = None
        if cfg.conditioning.text_encoder:
            table = load_table(Path(cfg.cache.dir) / CONDITIONING_FILE)
        conditioning = ClassConditioning(len(self.classes), dim, table)
        projector = None
        if cfg.align.enabled:
            shape = probe_feature_shape(unet, cfg.align.layer, space_channels, sample_size)
            projector = build_projector(cfg.align.projector, self.card["feature_dim"], shape,
                                        cfg.align.repa_hidden, cfg.align.layer, cfg.align.center_target)
        else:
            get_module(unet, cfg.align.layer)  # a typo in the layer is still an error in the baseline
        if cfg.model.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        self.channels_last = cfg.model.channels_last and self.accelerator.state.deepspeed_plugin is None
        if self.channels_last:  # DeepSpeed broadcasts parameters as flat bytes: they must stay contiguous
            unet.to(memory_format=torch.channels_last)
        self.model = FadModel(unet, conditioning, projector, cfg.align.layer)
        self.online_expert = None
        if cfg.align.enabled and cfg.align.target in ("noisy-online", "noisy-reference"):
            self.online_expert = load_expert(cfg.expert, self.device)[0].requires_grad_(False)
            if cfg.align.target == "noisy-reference":
                self.online_expert.train()  # BatchNorm on batch statistics, as the reference leaves it
            if projector is not None and projector.needs_spatial:
                raise FadscaleError(f"align.target {cfg.align.target} works with the seed projector only")
        self.ema = EMAModel(unet.parameters(), decay=cfg.train.ema_decay) if cfg.train.ema_decay else None
        if self.ema is not None:
            self.ema.to(self.device)
        optim = cfg.optim
        fused = {"fused": True} if self.device.type == "cuda" else {}
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=optim.lr, betas=optim.betas,
                                           weight_decay=optim.weight_decay, **fused)
        self.lr_schedule = make_scheduler(self.optimizer, optim, cfg.train.max_steps)
        if cfg.model.compile:
            self.model.unet = torch.compile(self.model.unet)
        deepspeed = self.accelerator.state.deepspeed_plugin
        if deepspeed is not None:
            # We feed our own loader, so DeepSpeed cannot infer these "auto" values from a DataLoader.
            deepspeed.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
            deepspeed.deepspeed_config["gradient_clipping"] = optim.grad_clip or 0.0
        self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        # DeepSpeed bf16 keeps bf16 weights (fp32 master copies in the optimizer): inputs must match.
        self.input_dtype = next(self.accelerator.unwrap_model(self.model).unet.parameters()).dtype
        self.unet = self.accelerator.unwrap_model(self.model).unet

    def _build_probe(self) -> GenerationProbe:
        cfg = self.cfg
        if cfg.model.space == "latent":
            raise FadscaleError("eval.every: learning curves are scored in pixel space only (this run is latent); "
                                "sample and evaluate the final run instead")
        return GenerationProbe(evaluator_card=cfg.eval.evaluator, alignment_sha256=self.card["sha256"],
                               shards=cfg.data.shards, classes=self.classes, image_size=self.sample_size,
                               channels=self.space_channels, per_class=cfg.eval.per_class,
                               scheduler=cfg.eval.scheduler, steps=cfg.eval.steps, noise=noise_config(cfg.noise),
                               device=self.device)

    # ---------------------------------------------------------------- data

    def _features(self) -> tuple[str, ...]:
        if not self.uses_cache:
            return ()
        wanted = []
        if self.cfg.align.enabled and self.cfg.align.target == "cached":
            wanted.append("spatial.npy" if needs_spatial(self.cfg) else "pooled.npy")
        if self.cfg.model.space == "latent":
            wanted.append("latent.npy")
        return tuple(wanted)

    def _loader(self, epoch: int, start_batch: int):
        cfg = self.cfg
        source = cfg.cache.dir if self.uses_cache else cfg.data.shards
        return train_loader(source, batch_size=cfg.data.batch_size, image_size=cfg.data.image_size,
                            channels=cfg.data.channels, seed=cfg.run.seed, epoch=epoch, rank=self.rank,
                            world_size=self.world, workers=cfg.data.workers, shuffle_buffer=cfg.data.shuffle_buffer,
                            samples_per_epoch=cfg.data.samples_per_epoch, views=cfg.data.views,
                            subset=cfg.data.subset, subset_seed=cfg.data.subset_seed,
                            features=self._features(), start_batch=start_batch)

    # ---------------------------------------------------------------- the step

    def step(self, batch: dict, micro_step: int) -> dict:
        """One micro-batch: forward, loss, backward (the optimizer steps when accumulation is complete)."""
        cfg, device = self.cfg, self.device
        # Randomness from (seed, micro-step, rank) alone: a resumed run draws the same noise as an uninterrupted one.
        gen = torch.Generator().manual_seed(cfg.run.seed * 1_000_003 + micro_step * 1_009 + self.rank)
        labels = batch["label"].to(device)
        if cfg.model.space == "latent":
            mean, logvar = batch["latent"].to(device).chunk(2, dim=1)
            eps = torch.randn(mean.shape, generator=gen).to(device)
            clean = (mean + torch.exp(0.5 * logvar) * eps) * self.vae_scale
        else:
            clean = batch["image"].to(device)
        noise = torch.randn(clean.shape, generator=gen).to(device)
        timesteps = torch.randint(0, cfg.noise.num_train_timesteps, (clean.shape[0],), generator=gen).to(device)
        drop = (torch.rand(clean.shape[0], generator=gen) < cfg.train.label_dropout).to(device)
        noisy = self.noise.add_noise(clean, noise, timesteps).to(self.input_dtype)
        if self.channels_last:
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        target = noise if cfg.noise.prediction_type == "epsilon" else self.noise.get_velocity(clean, noise, timesteps)

        aligning = cfg.align.enabled and (cfg.align.until_step is None or self.state["step"] < cfg.align.until_step)
        expert_target = None
        if aligning and cfg.align.target == "cached":
            expert_target = batch["spatial" if needs_spatial(cfg) else "pooled"].to(device)
        elif aligning:  # the expert sees the noisy input, every step (the reference's behaviour)
            with torch.no_grad():
                expert_target = self.online_expert.features(self._online_expert_input(noisy.float()))

        with self.accelerator.accumulate(self.model):
            prediction, align_loss, diagnostics = self.model(noisy, timesteps, labels, drop, expert_target)
            per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
            if cfg.noise.min_snr_gamma:
                per_sample = per_sample * min_snr_weights(self.noise, timesteps, cfg.noise.min_snr_gamma,
                                                          cfg.noise.prediction_type)
            noise_loss = per_sample.mean()
            loss = noise_loss + cfg.align.weight * align_loss if align_loss is not None else noise_loss
            if any_rank(not torch.isfinite(loss).item(), device):
                self.optimizer.zero_grad(set_to_none=True)
                return {"skipped": True}
            self.accelerator.backward(loss)
            grad_norm = None
            if self.accelerator.sync_gradients:
                grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip or float("inf"))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        metrics = {"loss/noise": noise_loss.item(), "loss/total": loss.item()}
        if align_loss is not None:
            metrics.update({"loss/align": align_loss.item(), **{k: v.item() for k, v in diagnostics.items()}})
        if grad_norm is not None:
            metrics["train/grad_norm"] = float(grad_norm)
        return metrics

    def _online_expert_input(self, noisy: torch.Tensor) -> torch.Tensor:
        """noisy-online: the expert's own input (size, channels, normalisation from its card).
        noisy-reference: the reference's: the noisy tile at the expert's size in the [0, 1] pixel range,
        not normalised (and the expert's BatchNorm in train mode, set at build)."""
        if self.cfg.align.target == "noisy-online":
            return expert_input(noisy, self.card)
        plain = {**self.card, "normalization": {"mean": [0.0] * self.card["in_chans"],
                                                 "std": [1.0] * self.card["in_chans"]}}
        return expert_input(noisy, plain)

    # ---------------------------------------------------------------- checkpoints

    def _save(self) -> None:
        self.state["train_seconds"] = self._clock.seconds()

        def write(folder: Path) -> None:
            self.accelerator.save_state(str(folder))
            if self.is_main:
                torch.save(self.lr_schedule.state_dict(), folder / "lr_schedule.pt")
                if self.ema is not None:
                    save_file({str(i): p.detach().cpu().contiguous() for i, p in enumerate(self.ema.shadow_params)},
                              str(folder / "ema.safetensors"))
                atomic_write_json(folder / "trainer_state.json", self.state)

        path = save_checkpoint(self.out / "checkpoints", self.state["step"], write,
                               keep_last=self.cfg.checkpoint.keep_last, is_main=self.is_main)
        log_line(f"checkpoint {path}", self.is_main)

    def _resume(self) -> None:
        found = latest_checkpoint(self.out / "checkpoints") if self.cfg.run.resume == "auto" else None
        if found is None:
            return
        _, path = found
        self.accelerator.load_state(str(path))
        self.lr_schedule.load_state_dict(torch.load(path / "lr_schedule.pt", weights_only=True))
        if self.ema is not None:
            shadow = load_file(str(path / "ema.safetensors"))
            for i, param in enumerate(self.ema.shadow_params):
                param.data.copy_(shadow[str(i)].to(param.device))
        self.state = read_json(path / "trainer_state.json")
        if self.ema is not None:  # EMA's warm-up depends on the step count
            self.ema.optimization_step = self.state["step"]
        log_line(f"resumed from {path} at step {self.state['step']}", self.is_main)

    # ---------------------------------------------------------------- the loop

    def train(self) -> int:
        with self.stop:  # SIGUSR1/SIGTERM mean "checkpoint and exit" only while the loop runs
            return self._train()

    def _train(self) -> int:
        cfg = self.cfg
        self.state = {"step": 0, "micro": 0, "nan_in_row": 0, "nan_total": 0, "train_seconds": 0.0}
        self._resume()
        self._clock = TrainClock(self.state.get("train_seconds", 0.0))
        if self.is_main:
            self.stop.clear_stale_file()
            save_config(cfg, self.out / "config.yaml")
        self.accelerator.wait_for_everyone()
        logger = RunLogger(self.out, self.is_main)
        samples = cfg.data.samples_per_epoch or self.cache_or_shards_count()
        per_epoch = batches_per_epoch(samples, cfg.data.batch_size, self.world)
        unet_params = count_parameters(self.unet)
        log_line(f"{'FAD' if cfg.align.enabled else 'vanilla'} training: UNet {cfg.model.preset} "
                 f"({unet_params / 1e6:.1f}M params), {self.world} process(es) on {self.device.type}, "
                 f"mixed precision {self.accelerator.mixed_precision}, {cfg.train.max_steps} steps", self.is_main)
        progress = tqdm(total=cfg.train.max_steps, initial=self.state["step"], desc="train", unit="step",
                        disable=not self.is_main, dynamic_ncols=True)
        window_start, window_images = time.perf_counter(), 0
        stopped = False
        while self.state["step"] < cfg.train.max_steps and not stopped:
            epoch, start = divmod(self.state["micro"], per_epoch)
            for batch in self._loader(epoch, start):
                metrics = self.step(batch, self.state["micro"])
                self.state["micro"] += 1
                window_images += batch["label"].shape[0] * self.world
                if metrics.get("skipped"):
                    self.state["nan_in_row"] += 1
                    self.state["nan_total"] += 1
                    log_line(f"non-finite loss at step {self.state['step']}: step skipped "
                             f"({self.state['nan_in_row']} in a row)", self.is_main)
                    if self.state["nan_in_row"] >= cfg.train.nan_tolerance:
                        raise FadscaleError(
                            f"{self.state['nan_in_row']} non-finite losses in a row at step {self.state['step']} "
                            f"(train.nan_tolerance={cfg.train.nan_tolerance}); lower optim.lr or check the data; "
                            f"checkpoints on disk are untouched")
                    continue
                if not self.accelerator.sync_gradients:
                    continue  # accumulating: the optimizer step happens on the last micro-batch
                self.state["nan_in_row"] = 0
                self.state["step"] += 1
                step = self.state["step"]
                self.lr_schedule.step()
                if self.ema is not None:
                    self.ema.step(self.unet.parameters())
                progress.update(1)
                if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
                    elapsed = time.perf_counter() - window_start
                    metrics.update({"train/lr": self.lr_schedule.get_last_lr()[0],
                                    "train/images_per_s": window_images / max(elapsed, 1e-9),
                                    "train/memory_gib": self._memory_gib(), "train/skipped_total": self.state["nan_total"]})
                    logger.scalars(step, metrics)
                    progress.set_postfix({k.split("/")[-1]: f"{v:.4f}" for k, v in metrics.items() if k.startswith("loss")})
                    window_start, window_images = time.perf_counter(), 0
                if cfg.train.sample_every and step % cfg.train.sample_every == 0:
                    with self._clock.paused():
                        self._log_grid(logger, step)
                if cfg.eval.every and (step % cfg.eval.every == 0 or step == cfg.train.max_steps):
                    with self._clock.paused():
                        self._evaluate(logger, step)
                if step % cfg.checkpoint.every == 0 and step < cfg.train.max_steps:
                    with self._clock.paused():
                        self._save()
                if step >= cfg.train.max_steps:
                    break  # done: a stop request now needs no checkpoint of its own, final/ follows
                if any_rank(self.stop.requested(), self.device):
                    log_line(f"stop requested ({self.stop.reason or 'on another rank'}): checkpoint at step {step}, exit",
                             self.is_main)
                    self._save()
                    stopped = True
                    break
        progress.close()
        if not stopped:
            newest = latest_checkpoint(self.out / "checkpoints")
            if newest is None or newest[0] != self.state["step"]:  # a requeue after the end saves nothing new
                self._save()
            self._write_final(logger)
        logger.close()
        self.accelerator.wait_for_everyone()
        return 0

    def cache_or_shards_count(self) -> int:
        manifest = self.cache_manifest or self.manifest
        count = manifest["splits"]["train"]["count"]
        return count if self.cfg.data.subset == "all" else max(1, count // 2)

    def _memory_gib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux

    def conditioning_table(self) -> torch.Tensor:
        return self.accelerator.unwrap_model(self.model).conditioning.table.detach().float().cpu()

    @torch.no_grad()
    def _log_grid(self, logger: RunLogger, step: int) -> None:
        if not self.is_main or self.cfg.model.space == "latent":
            return
        per_class = 4
        labels = torch.arange(len(self.classes)).repeat_interleave(per_class)
        self.unet.eval()
        images = generate(self.unet, self.conditioning_table(), labels, list(range(len(labels))),
                          scheduler=make_sampler("ddim", noise_config(self.cfg.noise)), steps=25,
                          image_size=self.sample_size, channels=self.space_channels, device=self.device)
        self.unet.train()
        logger.image("samples/per_class", step, (grid(images.cpu(), len(self.classes)) + 1) / 2)

    @torch.no_grad()
    def _evaluate(self, logger: RunLogger, step: int) -> None:
        """A learning-curve point (main rank, EMA weights when kept); the other ranks wait for it."""
        if self.probe is not None:
            params = list(self.unet.parameters())
            if self.ema is not None:
                self.ema.store(params)
                self.ema.copy_to(params)
            try:
                scores = self.probe(self.unet, self.conditioning_table().to(self.input_dtype))
            finally:
                if self.ema is not None:
                    self.ema.restore(params)
            logger.scalars(step, {**scores, "eval/train_seconds": self._clock.seconds()})
            log_line(f"step {step}: generation accuracy {scores['eval/generation_accuracy']:.3f}, "
                     f"Frechet {scores['eval/frechet']:.1f}", True)
        self.accelerator.wait_for_everyone()

    @torch.no_grad()
    def _target_diagnostic(self, tiles: int = 256) -> dict | None:
        """The collapse diagnostic of the final run: the top-direction share (align.top_direction_share) of
        the alignment targets of up to `tiles` training tiles (view 0), and of the expert features they
        come from (cached, or the online expert on the clean tiles)."""
        cfg = self.cfg
        projector = self.accelerator.unwrap_model(self.model).projector
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
                features.append(batch[key].to(self.device))
            else:
                images = batch["image"].to(self.device)
                features.append(self.online_expert.features(self._online_expert_input(images)))
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
        params = self.accelerator.unwrap_model(self.model).parameters()
        total = torch.stack([p.detach().double().sum() for p in params]).sum().reshape(1).to(self.device)
        return [float(v) for v in self.accelerator.gather(total).cpu()]

    def _write_final(self, logger: RunLogger) -> None:
        """final/: unet (raw) and unet_ema in diffusers format, the FAD head, the run card; atomically."""
        checksums = self._rank_checksums()  # collective: before the main-rank-only part
        if not self.is_main:
            return
        cfg = self.cfg
        model = self.accelerator.unwrap_model(self.model)
        unet = model.unet._orig_mod if hasattr(model.unet, "_orig_mod") else model.unet
        with atomic_output_dir(self.out / "final", overwrite=True) as folder:
            unet.save_pretrained(folder / "unet")
            if self.ema is not None:
                self.ema.store(unet.parameters())
                self.ema.copy_to(unet.parameters())
                unet.save_pretrained(folder / "unet_ema")
                self.ema.restore(unet.parameters())
            head = {"conditioning.table": model.conditioning.table.detach().float().cpu().contiguous()}
            if model.projector is not None:
                head.update({f"projector.{k}": v.detach().float().cpu().contiguous()
                             for k, v in model.projector.state_dict().items()})
            save_file(head, str(folder / HEAD_FILE))
            last: dict = {}  # the newest value of every logged key (loss records and eval records alike)
            for record in read_metrics(self.out):
                last.update(record)
            card = {
                "format": "fadscale-fad-run",
                "step": self.state["step"],
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
                "alignment_diagnostic": self._target_diagnostic(),
                "skipped_steps": self.state["nan_total"],
                "world_size": self.world,
                "rank_weight_checksums": checksums,
                "ranks_in_sync": len(set(checksums)) == 1,
                "mixed_precision": self.accelerator.mixed_precision,
                "config": cfg.model_dump(mode="json"),
                "fadscale_version": __version__,
                "git_commit": git_commit(),
                "torch": torch.__version__,
            }
            atomic_write_json(folder / "run_card.json", card)
        logger.hparams({"method": card["method"], "lr": cfg.optim.lr, "align_weight": cfg.align.weight,
                        "projector": cfg.align.projector, "layer": cfg.align.layer, "batch": cfg.data.batch_size},
                       {"hparam/final_noise_loss": float(last.get("loss/noise", math.nan)),
                        **{f"hparam/{key.removeprefix('eval/')}": float(last[key])
                           for key in ("eval/generation_accuracy", "eval/frechet") if key in last}})
        log_line(f"wrote {self.out / 'final'} (step {self.state['step']})", True)


def run(cfg: FadConfig) -> int:
    return FadTrainer(cfg).train()


def main(argv=None) -> None:
    run_entry("train_fad", FadConfig, run, argv)


if __name__ == "__main__":
    main()
