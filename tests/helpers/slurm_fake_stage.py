"""A stand-in entry point for testing the launch machinery (sbatch script, srun, torchrun/accelerate,
STOP file, requeue, resume) without the real trainers. It follows the trainers' stop contract:

- run folder from the config's `run.out_dir`; `fake.steps` steps of `fake.step_s` seconds each;
- every step all ranks agree whether `<out_dir>/STOP` exists or SIGUSR1/SIGTERM arrived; if so they
  write a checkpoint `<out_dir>/checkpoints/step-XXXXXXXX/` (one file per rank, renamed into place
  when complete) and exit 0;
- at start they resume from the newest complete checkpoint and remove a stale STOP file;
- at the end rank 0 writes `<out_dir>/final/run_card.json` with a "step" field.

Rank 0 also appends one JSON line per start to `<out_dir>/starts.jsonl` and keeps
`<out_dir>/progress.json` up to date, for the tests to poll.

Usage: python -m torch.distributed.run --nproc_per_node 2 -m tests.helpers.slurm_fake_stage --config F
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj) + "\n")
    os.replace(tmp, path)


def _latest(ckpt_root: Path) -> int:
    steps = [int(m.group(1)) for p in ckpt_root.glob("step-*") if (m := re.fullmatch(r"step-(\d{8})", p.name))]
    return max(steps, default=0)


def _any(flag: bool) -> bool:
    value = torch.tensor([1.0 if flag else 0.0])
    if dist.is_initialized():
        dist.all_reduce(value)
    return bool(value.item() > 0)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args(argv)
    cfg = yaml.safe_load(Path(args.config).read_text()) or {}
    for item in args.set:  # only the keys this stand-in knows
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        cfg.setdefault(section, {})[name] = yaml.safe_load(value)
    out = Path(cfg.get("run", {}).get("out_dir") or "runs/fake").resolve()
    steps = int(cfg.get("fake", {}).get("steps", 10))
    step_s = float(cfg.get("fake", {}).get("step_s", 0.1))

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        dist.init_process_group("gloo")
    stop_flag = {"reason": ""}

    def on_signal(signum, _frame):
        stop_flag["reason"] = signal.Signals(signum).name

    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, on_signal)

    ckpt_root = out / "checkpoints"
    stop_file = out / "STOP"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        stop_file.unlink(missing_ok=True)  # stale: left by the run before a requeue
    _barrier()
    start = _latest(ckpt_root)
    restart = int(os.environ.get("SLURM_RESTART_COUNT", 0))
    if rank == 0:
        with open(out / "starts.jsonl", "a") as handle:
            handle.write(json.dumps({"start_step": start, "world_size": world, "restart_count": restart}) + "\n")
    print(f"[fake] rank={rank} world={world} start_step={start} restart={restart}", flush=True)

    step = start
    while step < steps:
        time.sleep(step_s)
        step += 1
        if rank == 0:
            _write_json(out / "progress.json", {"step": step, "world_size": world})
        if _any(bool(stop_flag["reason"]) or stop_file.exists()):
            final = ckpt_root / f"step-{step:08d}"
            tmp = ckpt_root / f".step-{step:08d}.partial"
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            _barrier()
            _write_json(tmp / f"rank-{rank}.json", {"step": step, "rank": rank})
            _barrier()
            if rank == 0:
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
            print(f"[fake] rank={rank} stop requested at step {step}: checkpointed {final}", flush=True)
            return 0
    if rank == 0:
        (out / "final").mkdir(parents=True, exist_ok=True)
        _write_json(
            out / "final" / "run_card.json",
            {"step": step, "world_size": world, "resumed_from": start, "restart_count": restart},
        )
    print(f"[fake] rank={rank} done at step {step}", flush=True)
    return 0


if __name__ == "__main__":
    from fadscale.runtime.distributed import shutdown

    shutdown(main())  # barrier, destroy the group, os._exit: exits cleanly where gloo teardown can hang
