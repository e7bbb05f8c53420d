"""Distributed setup in one place: who am I (torchrun, SLURM or a single process), init, shutdown.

The expert trainer uses `init_distributed` directly (raw torch.distributed + DDP); the accelerate-based
stages let accelerate initialise but share `detect_world` and `shutdown`.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.distributed as dist

from fadscale.errors import FadscaleError


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    source: str = "single"  # "torchrun", "slurm" or "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def cpu_threads(env: Mapping[str, str] | None = None) -> int:
    """Torch threads for this process: FADSCALE_THREADS when set, else the CPUs this process may use
    divided by the processes on this node (LOCAL_WORLD_SIZE), at least 1: oversubscribed cores slow a step
    several-fold (docs/results/benchmarks.md)."""
    env = os.environ if env is None else env
    if env.get("FADSCALE_THREADS"):
        try:
            wanted = int(env["FADSCALE_THREADS"])
        except ValueError:
            wanted = 0
        if wanted < 1:
            raise FadscaleError(f"FADSCALE_THREADS={env['FADSCALE_THREADS']!r}: expected an integer >= 1")
        return wanted
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, available // max(1, int(env.get("LOCAL_WORLD_SIZE", "1") or 1)))


def set_cpu_threads(count: int | None = None) -> int:
    """Set torch's intra-op threads (explicitly, as every entry point and benchmark should); returns it."""
    count = count or cpu_threads()
    torch.set_num_threads(count)
    return count


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[07-09,12],cpu1' -> 'gpu07', 'rack[1-2]-n[01-04]' -> 'rack1-n01'."""
    text = nodelist.strip()
    host, depth = [], 0
    for char in text:  # the first host ends at the first comma outside brackets
        if char == "," and depth == 0:
            break
        depth += {"[": 1, "]": -1}.get(char, 0)
        host.append(char)
    host = "".join(host)
    if not host or depth != 0:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    # Each bracket group stands for a range of names: the first host takes the first of each.
    return re.sub(r"\[([^\]]+)\]", lambda m: m.group(1).split(",")[0].split("-")[0], host)


def detect_world(env: Mapping[str, str] | None = None) -> World:
    """Rank and world size from torchrun's variables, else from SLURM's (one task per process), else single."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return World(
            rank=int(env["RANK"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            world_size=int(env["WORLD_SIZE"]),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            source="torchrun",
        )
    # Only an srun step has its tasks running, and only a step sets SLURM_STEP_NUM_TASKS: the batch script
    # itself also sees SLURM_PROCID=0 and SLURM_NTASKS=N (measured on slurm 22-24), and a `python -m ...`
    # there is one process that must not wait for N - 1 peers that never start.
    if "SLURM_PROCID" in env and int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        job_id = int(env.get("SLURM_JOB_ID", "0"))
        return World(
            rank=int(env["SLURM_PROCID"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            world_size=int(env["SLURM_STEP_NUM_TASKS"]),
            master_addr=env.get("MASTER_ADDR") or first_host(nodelist),
            # A port derived from the job id, so two jobs sharing a node do not collide.
            master_port=int(env.get("MASTER_PORT") or 20000 + job_id % 20000),
            source="slurm",
        )
    return World()


def init_distributed(world: World) -> torch.device:
    """Join the process group (gloo on CPU, NCCL on GPU) and return this process's device."""
    if torch.cuda.is_available():
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world.distributed and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", world.master_addr)
        os.environ.setdefault("MASTER_PORT", str(world.master_port))
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            rank=world.rank,
            world_size=world.world_size,
        )
    return device


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool, device: torch.device | str | None = None) -> bool:
    """True on every rank when `flag` is true on any rank (for stop requests and errors)."""
    if device is None:  # NCCL reduces only CUDA tensors
        nccl = dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    return bool(all_reduce_sum(value).item() > 0)


def shutdown(exit_code: int = 0) -> None:
    """Leave the process group and exit without the interpreter's teardown.

    gloo aborts at interpreter exit in 1 of 4-10 two-process runs ("terminate called without an
    active exception") after all work is done; barrier + destroy + os._exit made it 15/15 clean.
    """
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
            dist.destroy_process_group()
        except Exception:  # a peer already gone: nothing left to synchronise
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
