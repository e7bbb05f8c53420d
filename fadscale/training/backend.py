"""Backends: how one training loop runs on one process or many. The `Trainer` only talks to this interface.

- `DDPBackend`: raw torch.distributed + DistributedDataParallel (the expert); rank and world size from
  torchrun's or SLURM's variables (`runtime.distributed.detect_world`).
- `AccelerateBackend`: accelerate (the FAD trainer): DDP, or DeepSpeed ZeRO through an accelerate config,
  bf16 autocast, gradient accumulation.

Both save and load the model and optimizer the same way into a checkpoint folder (model.safetensors,
optimizer.pt), except under DeepSpeed, whose ZeRO optimizer state is sharded by rank and saved by
DeepSpeed itself (a `deepspeed/` sub-folder).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fadscale.runtime import distributed
from fadscale.errors import FadscaleError
from fadscale.runtime.logging import log_line

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
DEEPSPEED_DIR = "deepspeed"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX). Without it (an AVX2-only CPU, as
    many AMD EPYC and older Intel parts are), oneDNN emulates bf16 and autocast makes the demo's step
    about 12x slower than fp32 (tools/bench_step.py on a 2-core AVX2 EPYC: 4.48 against 0.38 s/step)."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without these probes: assume not, fp32 is never the slow path
        return False


def resolve_precision(mode: str, device: torch.device | None = None) -> str:
    """'auto' -> 'bf16' on a GPU or on a CPU with native bf16, 'no' elsewhere; 'no' and 'bf16' as given.
    The one place that decides."""
    if mode != "auto":
        return mode
    on_gpu = device.type == "cuda" if device is not None else torch.cuda.is_available()
    return "bf16" if on_gpu or cpu_has_native_bf16() else "no"


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def load_weights(module: nn.Module, path: Path) -> None:
    """A checkpoint's model weights into `module` (strict), one clear line when they do not fit."""
    try:
        state = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - truncated, not safetensors: the checkpointer reports it
        raise FadscaleError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0]
        raise FadscaleError(f"{path}: does not fit the model being trained ({detail[:200]})") from None


def load_torch(path: Path, map_location="cpu"):
    """A torch file of tensors and plain containers; never runs code (weights_only)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise FadscaleError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None


class Backend:
    """What the trainer needs of a distributed setup. Subclasses set device, rank, world, is_main."""

    device: torch.device
    rank: int = 0
    world: int = 1
    is_main: bool = True
    mixed_precision: str = "no"
    grad_accum: int = 1

    # -- setup
    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        raise NotImplementedError

    def unwrap(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    # -- the step
    def accumulate(self, model: nn.Module, micro_step: int):
        """Context for one micro-batch; gradients are synchronised on the last of `grad_accum`."""
        raise NotImplementedError

    def sync_gradients(self, micro_step: int) -> bool:
        return (micro_step + 1) % self.grad_accum == 0

    def warn_if_emulated_bf16(self) -> None:
        """bf16 asked for explicitly on a CPU that can only emulate it: say so once, on the main rank."""
        if self.mixed_precision == "bf16" and self.device.type == "cpu" and not cpu_has_native_bf16():
            log_line("warning: mixed precision bf16 on a CPU without native bf16 (no AVX512-BF16 or AMX) is "
                     "emulated, about 12x slower than fp32 here; mixed_precision auto picks fp32 on such a CPU",
                     self.is_main)

    def autocast(self):
        if self.mixed_precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def clip_grad_norm(self, model: nn.Module, max_norm: float | None) -> float:
        raise NotImplementedError

    # -- collectives
    def any_rank(self, flag: bool) -> bool:
        return distributed.any_rank(flag, self.device)

    def barrier(self) -> None:
        distributed.barrier()

    def gather_float(self, value: float) -> list[float]:
        """`value` from every rank, in rank order, on every rank."""
        table = torch.zeros(self.world, dtype=torch.float64, device=self.device)
        table[self.rank] = value
        return [float(v) for v in distributed.all_reduce_sum(table).cpu()]

    # -- checkpoints (called on every rank; the main rank writes the shared files)
    def save(self, folder: Path, model: nn.Module, optimizer) -> None:
        if self.is_main:
            save_file(_tensors(self.unwrap(model)), str(folder / MODEL_FILE))
            torch.save(optimizer.state_dict(), folder / OPTIMIZER_FILE)

    def load(self, folder: Path, model: nn.Module, optimizer) -> None:
        load_weights(self.unwrap(model), folder / MODEL_FILE)
        optimizer.load_state_dict(load_torch(folder / OPTIMIZER_FILE))  # the optimizer moves it to its parameters

    def files(self, folder: Path) -> list[str]:
        """The files `save` writes (for the checksum list)."""
        return [MODEL_FILE, OPTIMIZER_FILE]


class DDPBackend(Backend):
    """Raw torch.distributed + DistributedDataParallel; one process per device (torchrun or srun)."""

    def __init__(self, mixed_precision: str = "auto", grad_accum: int = 1):
        self.world_info = distributed.detect_world()
        self.device = distributed.init_distributed(self.world_info)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.rank, self.world, self.is_main = self.world_info.rank, self.world_info.world_size, self.world_info.is_main
        self.mixed_precision = resolve_precision(mixed_precision, self.device)
        self.grad_accum = grad_accum
        self.warn_if_emulated_bf16()

    def prepare(self, model, optimizer):
        from torch.nn.parallel import DistributedDataParallel

        if self.world > 1:
            model = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return model, optimizer

    def unwrap(self, model):
        return model.module if hasattr(model, "module") else model

    def accumulate(self, model, micro_step: int):
        if self.world > 1 and not self.sync_gradients(micro_step):
            return model.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss):
        (loss / self.grad_accum).backward()

    def clip_grad_norm(self, model, max_norm):
        return float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm or float("inf")))


class AccelerateBackend(Backend):
    """accelerate: DDP or DeepSpeed (from the accelerate config the launcher was given), bf16 autocast,
    gradient accumulation. On a CPU-only machine it runs gloo DDP over the launched processes."""

    def __init__(self, mixed_precision: str = "auto", grad_accum: int = 1, find_unused_parameters: bool = False):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState, GradientState
        from accelerate.utils import DistributedDataParallelKwargs

        # One process may train several runs one after another (the pipeline, the benchmarks), each with
        # its own precision and accumulation; accelerate keeps those in process-wide singletons that refuse
        # a change. The process group (PartialState) is kept.
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
        on_gpu = torch.cuda.is_available()
        self.accelerator = Accelerator(mixed_precision=resolve_precision(mixed_precision), cpu=not on_gpu,
                                       gradient_accumulation_steps=grad_accum,
                                       kwargs_handlers=[DistributedDataParallelKwargs(
                                           find_unused_parameters=find_unused_parameters)])
        acc = self.accelerator
        self.device, self.rank, self.world, self.is_main = acc.device, acc.process_index, acc.num_processes, \
            acc.is_main_process
        self.mixed_precision = acc.mixed_precision
        self.grad_accum = grad_accum
        self.warn_if_emulated_bf16()
        self.deepspeed = acc.state.deepspeed_plugin

    def configure_deepspeed(self, micro_batch: int, grad_clip: float | None) -> None:
        """We feed our own loader, so DeepSpeed cannot infer these "auto" values from a DataLoader."""
        if self.deepspeed is not None:
            self.deepspeed.deepspeed_config["train_micro_batch_size_per_gpu"] = micro_batch
            self.deepspeed.deepspeed_config["gradient_clipping"] = grad_clip or 0.0

    def prepare(self, model, optimizer):
        return self.accelerator.prepare(model, optimizer)

    def unwrap(self, model):
        return self.accelerator.unwrap_model(model)

    def accumulate(self, model, micro_step: int):
        return self.accelerator.accumulate(model)

    def sync_gradients(self, micro_step: int) -> bool:
        return self.accelerator.sync_gradients

    def autocast(self):
        return contextlib.nullcontext()  # accelerate's prepared model runs under its own autocast

    def backward(self, loss):
        self.accelerator.backward(loss)

    def clip_grad_norm(self, model, max_norm):
        if not self.accelerator.sync_gradients:
            return float("nan")
        return float(self.accelerator.clip_grad_norm_(model.parameters(), max_norm or float("inf")))

    def save(self, folder, model, optimizer):
        if self.deepspeed is None:
            return super().save(folder, model, optimizer)
        self.accelerator.save_state(str(folder / DEEPSPEED_DIR))  # ZeRO state is sharded: every rank writes

    def load(self, folder, model, optimizer):
        if self.deepspeed is None:
            return super().load(folder, model, optimizer)
        self.accelerator.load_state(str(folder / DEEPSPEED_DIR))

    def files(self, folder):
        if self.deepspeed is None:
            return super().files(folder)
        return sorted(str(p.relative_to(folder)) for p in (folder / DEEPSPEED_DIR).rglob("*") if p.is_file())
