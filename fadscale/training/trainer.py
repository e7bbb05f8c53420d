"""The training loop, one for every trainer (the expert and FAD): read it top to bottom in `run`.

Each optimizer step: the task computes the loss of a micro-batch; a non-finite loss on any rank skips
it (`nan_tolerance` in a row stop the run with a clear error, checkpoints untouched); otherwise
backward, and once `grad_accum` micro-batches are in, clip, optimizer and schedule step, EMA. Then,
in this order: log (every `log_every`), the task's periodic work (validation, learning curves; it may
end training early), a checkpoint (every `checkpoint_every`, and at the end), and the stop request
(SIGUSR1/SIGTERM or a STOP file: every rank finishes the step, checkpoints and exits 0).

Determinism: each epoch's global RNG is seeded from (seed, epoch, rank) and a mid-epoch resume restores
each rank's RNG state after the loader is built, so a resumed run repeats the uninterrupted one; the
data position is the micro-batch count (epoch, batch within it).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from fadscale.config import save_config
from fadscale.errors import FadscaleError
from fadscale.runtime.io import atomic_write_json
from fadscale.runtime.lock import RunLock
from fadscale.runtime.logging import RunLogger, log_line
from fadscale.runtime.signals import StopRequest
from fadscale.training.backend import Backend, load_torch
from fadscale.training.checkpoint import EMA, SCHEDULE, STATE, Checkpointer, read_state, rng_file
from fadscale.training.fingerprint import changed_settings, describe_changes, settings_fingerprint
from fadscale.training.task import LoopSettings, LoopView, Task


class TrainClock:
    """Seconds spent training (a resumed run continues the count), not counting what runs `paused()`:
    the task's periodic work and checkpoints. Time to quality is read off it."""

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


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return seed * 100_003 + epoch * 1_009 + rank


class Trainer:
    def __init__(self, task: Task, backend: Backend, settings: LoopSettings, config=None):
        self.task, self.backend, self.settings, self.config = task, backend, settings, config
        self.out = Path(settings.out_dir)
        self.stop = StopRequest(self.out)
        self.stopped = False  # run() ended on a stop request: checkpointed, not finished, nothing exported
        parts = task.build(backend)
        self.model, self.optimizer = backend.prepare(parts.model, parts.optimizer)
        self.schedule = parts.schedule
        self.ema_module = parts.ema_module
        self.ema = None
        if settings.ema_decay and parts.ema_module is not None:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(parts.ema_module.parameters(), decay=settings.ema_decay)
            self.ema.to(backend.device)
        self.checkpointer = Checkpointer(self.out / "checkpoints", settings.keep_last, backend)
        self.state = {"step": 0, "micro": 0, "epoch": 0, "batch": 0, "nan_in_row": 0, "nan_total": 0,
                      "skipped_records": 0,  # damaged records the loader left out (data.on_corrupt=skip)
                      "train_seconds": 0.0, "ended_early": False, "world_size": backend.world, "task": {},
                      "settings": settings_fingerprint(config) if config is not None else None,
                      "settings_changes": []}
        self.clock = TrainClock()
        self._rng_to_restore = None
        self._changes: dict = {}  # settings changed on a forced resume: {key: [old, new]}

    # ---------------------------------------------------------------- one step

    def step(self, batch: dict) -> dict:
        """One micro-batch through the whole step: loss, NaN policy, backward and, when the accumulation is
        complete, clip, optimizer, schedule and EMA. Returns the task's metrics (+ grad norm), or
        {"skipped": True} (a non-finite loss on some rank), or {"accumulating": True}."""
        backend, micro = self.backend, self.state["micro"]
        self.state["micro"] += 1
        with backend.accumulate(self.model, micro):
            with backend.autocast():
                loss, metrics = self.task.train_step(self.model, batch, micro, self.state["step"])
            if backend.any_rank(not torch.isfinite(loss).item()):
                self.optimizer.zero_grad(set_to_none=True)
                return {"skipped": True}
            backend.backward(loss)
            if not backend.sync_gradients(micro):
                return {"accumulating": True}
            metrics["train/grad_norm"] = backend.clip_grad_norm(self.model, self.settings.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()
        if self.ema is not None:
            self.ema.step(self.ema_module.parameters())
        self.state["step"] += 1
        return metrics

    # ---------------------------------------------------------------- the loop

    def run(self) -> int:
        lock = self._lock()
        try:
            with self.stop:  # SIGUSR1/SIGTERM mean "checkpoint and exit" only while the loop runs
                return self._run()
        finally:
            if lock is not None:
                lock.release()

    def _lock(self) -> RunLock | None:
        """One writer per run folder (the main rank holds the lock); every rank fails together."""
        lock, error = None, None
        if self.backend.is_main:
            try:
                lock = RunLock(self.out).acquire()
            except FadscaleError as exc:
                error = exc
            if lock is not None and lock.took_over:
                old = lock.took_over
                log_line(f"{self.out}: taking over the lock left by pid {old.get('pid')} on host {old.get('host')} "
                         f"(that process is gone)")
        if self.backend.any_rank(error is not None):
            if lock is not None:
                lock.release()
            raise error or FadscaleError(f"{self.out}: run folder in use by another run (see rank 0's message)")
        return lock

    def _run(self) -> int:
        s, backend, state = self.settings, self.backend, self.state
        self._resume()
        self.clock = TrainClock(state["train_seconds"])
        if backend.is_main:
            self.stop.clear_stale_file()
            if self.config is not None:
                save_config(self.config, self.out / "config.yaml")
        backend.barrier()  # no rank may see the stale STOP file the main rank just removed
        logger = RunLogger(self.out, backend.is_main, resumed_at=state["step"])
        if self._changes:  # run.resume=force went on with changed settings: the metrics say so too
            logger.event(state["step"], "resumed with changed settings", {"changes": self._changes})
        done = state["ended_early"] or state["step"] >= s.max_steps  # a longer max_steps continues a run
        if done:
            log_line(f"{self.out}: training already finished (step {state['step']}); writing the outputs again",
                     backend.is_main)
        progress = tqdm(total=s.max_steps, initial=state["step"], desc="train", unit="step",
                        disable=not backend.is_main or done, dynamic_ncols=True)
        window_start, window_images = time.perf_counter(), 0
        self.stopped = False
        while not done and not self.stopped:
            epoch, start = divmod(state["micro"], s.batches_per_epoch)
            torch.manual_seed(epoch_seed(s.seed, epoch, backend.rank))
            batches = iter(self.task.loader(epoch, start))  # draws the DataLoader's seed, as the first run did
            if self._rng_to_restore is not None:  # resumed mid-epoch: continue the RNG where it was
                torch.set_rng_state(self._rng_to_restore["cpu"])
                if "cuda" in self._rng_to_restore and backend.device.type == "cuda":
                    torch.cuda.set_rng_state(self._rng_to_restore["cuda"], backend.device)
                self._rng_to_restore = None
            for batch in batches:
                metrics = self.step(batch)
                state["epoch"], state["batch"] = divmod(state["micro"], s.batches_per_epoch)
                window_images += len(batch["label"]) * backend.world
                state["skipped_records"] += int(batch.get("skipped", 0))
                if metrics.get("skipped"):
                    self._count_nan()
                    continue
                if metrics.get("accumulating"):
                    continue
                state["nan_in_row"] = 0
                step = state["step"]
                progress.update(1)
                if step % s.log_every == 0 or step == s.max_steps:
                    elapsed = time.perf_counter() - window_start
                    metrics.update({"train/lr": self.schedule.get_last_lr()[0],
                                    "train/images_per_s": window_images / max(elapsed, 1e-9),
                                    "train/memory_gib": self._memory_gib(), "train/skipped_total": state["nan_total"],
                                    "data/skipped_records": state["skipped_records"]})
                    logger.scalars(step, metrics)
                    progress.set_postfix({k.split("/")[-1]: f"{v:.4f}" for k, v in metrics.items()
                                          if k.startswith("loss") or k == "train/loss"})
                    window_start, window_images = time.perf_counter(), 0
                with self.clock.paused():
                    finish = self.task.after_step(self.view(logger))
                state["ended_early"] = bool(finish)
                done = finish or step >= s.max_steps
                if step % s.checkpoint_every == 0 or done:
                    self._save()
                if done:
                    break
                if backend.any_rank(self.stop.requested()):
                    log_line(f"stop requested ({self.stop.reason or 'on another rank'}): checkpoint at step "
                             f"{step}, exit", backend.is_main)
                    self._save()
                    self.stopped = True
                    break
        progress.close()
        if not self.stopped:
            self.task.export(self.view(logger))
        logger.close()
        backend.barrier()
        return 0

    def view(self, logger) -> LoopView:
        return LoopView(self.state["step"], logger, self.ema, self.clock.seconds(), self.state)

    def _count_nan(self) -> None:
        state = self.state
        state["nan_in_row"] += 1
        state["nan_total"] += 1
        log_line(f"non-finite loss at step {state['step']}: step skipped ({state['nan_in_row']} in a row)",
                 self.backend.is_main)
        if state["nan_in_row"] >= self.settings.nan_tolerance:
            raise FadscaleError(
                f"{state['nan_in_row']} non-finite losses in a row at step {state['step']} "
                f"(train.nan_tolerance={self.settings.nan_tolerance}); lower optim.lr or check the data; "
                "checkpoints on disk are untouched")

    def _memory_gib(self) -> float:
        if self.backend.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.backend.device) / 2**30
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux

    # ---------------------------------------------------------------- checkpoints

    def _save(self) -> Path:
        backend = self.backend
        self.state.update(train_seconds=self.clock.seconds(), world_size=backend.world,
                          task=self.task.state_dict())
        with self.clock.paused():
            def write(folder: Path) -> list[str]:
                backend.save(folder, self.model, self.optimizer)
                rng = {"cpu": torch.get_rng_state()}
                if backend.device.type == "cuda":
                    rng["cuda"] = torch.cuda.get_rng_state(backend.device)
                torch.save(rng, folder / rng_file(backend.rank))
                names = [rng_file(backend.rank)]
                if backend.is_main:
                    torch.save(self.schedule.state_dict(), folder / SCHEDULE)
                    names.append(SCHEDULE)
                    if self.ema is not None:
                        save_file({str(i): p.detach().cpu().contiguous() for i, p in enumerate(self.ema.shadow_params)},
                                  str(folder / EMA))
                        names.append(EMA)
                    atomic_write_json(folder / STATE, self.state)
                    names.append(STATE)
                return names

            path = self.checkpointer.save(self.state["step"], write)
        log_line(f"checkpoint {path}", backend.is_main)
        return path

    def _resume(self) -> None:
        if self.settings.resume not in ("auto", "force"):
            return
        found = self.checkpointer.newest_intact()
        if found is None:
            if self.checkpointer.newest_step() is not None:  # nothing is deleted: the user decides
                raise FadscaleError(f"{self.checkpointer.root}: no intact checkpoint to resume from (see the "
                                    "warnings above); move the folder away, or set run.resume=never to start over")
            return
        _, folder = found
        backend = self.backend
        saved = read_state(folder)
        self._check_settings(folder, saved)
        backend.load(folder, self.model, self.optimizer)
        self.schedule.load_state_dict(load_torch(folder / SCHEDULE))
        if self.ema is not None:
            if not (folder / EMA).is_file():
                raise FadscaleError(f"{folder}: no {EMA}, but this run keeps an EMA (train.ema_decay): resume "
                                    "with the settings the run was started with")
            shadow = load_file(str(folder / EMA))
            for i, param in enumerate(self.ema.shadow_params):
                param.data.copy_(shadow[str(i)].to(param.device))
            self.ema.optimization_step = saved["step"]  # the EMA warm-up depends on the step count
        self.state.update({k: v for k, v in saved.items() if k in self.state and k != "settings"})  # ours: current
        if self._changes:
            self.state["settings_changes"] = [*self.state["settings_changes"],
                                              {"step": saved["step"], "changes": self._changes}]
        self.task.load_state_dict(saved.get("task") or {})
        same_world = saved.get("world_size") == backend.world
        if not same_world:
            log_line(f"note: {folder} was written by {saved.get('world_size')} process(es), this run has "
                     f"{backend.world}: it continues, but not exactly as the original run would", backend.is_main)
        elif self.state["batch"] > 0:
            self._rng_to_restore = load_torch(folder / rng_file(backend.rank))
        self.state["world_size"] = backend.world
        log_line(f"resumed from {folder} at step {self.state['step']} (epoch {self.state['epoch']}, batch "
                 f"{self.state['batch']})", backend.is_main)

    def _check_settings(self, folder: Path, saved: dict) -> None:
        """Refuse to resume with settings that change what is trained (run.resume=force: record them)."""
        current = self.state["settings"]
        if current is None:
            return
        if not isinstance(saved.get("settings"), dict):
            log_line(f"note: {folder} records no settings (written by an older fadscale): the config is not "
                     "compared", self.backend.is_main)
            return
        self._changes = changed_settings(saved["settings"], current)
        if not self._changes:
            return
        what = describe_changes(self._changes)
        if self.settings.resume != "force":
            raise FadscaleError(
                f"{self.out}: the config differs from the one this run was trained with ({what}); these change "
                "what is trained: choose a new run.out_dir to start a new run, or set run.resume=force to continue "
                "this one (the change is recorded in its checkpoints, metrics and card)")
        log_line(f"warning: run.resume=force: continuing {self.out} with changed settings ({what}); recorded",
                 self.backend.is_main)
