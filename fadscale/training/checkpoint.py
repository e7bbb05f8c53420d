"""The checkpoint format: one layout for every trainer, written atomically, verified before resuming.

    <run>/checkpoints/step-00000120/
        model.safetensors      the trained module (parameters and buffers)      } deepspeed/ instead under
        optimizer.pt           optimizer state (tensors only: weights_only)      } DeepSpeed (ZeRO shards)
        schedule.pt            learning-rate schedule
        ema.safetensors        EMA weights (when the trainer keeps an EMA)
        rng-<rank>.pt          each rank's torch RNG state (CPU, and CUDA on a GPU)
        trainer_state.json     step, micro-step, epoch and batch (the data position), counters, train
                               seconds, world size, the task's own state
        checksums.json         sha256 of every file above: written last, so its presence means complete

A folder is written as `.step-00000120.partial/` and renamed when complete; the newest `keep_last` are
kept. Resuming verifies the newest checkpoint against its checksums and falls back to the newest intact
one, with a warning that names what was wrong; nothing unreadable is silently skipped.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable

from fadscale.errors import FadscaleError
from fadscale.runtime.io import CHECKSUMS, checksum_problems, share_tree, write_checksums
from fadscale.runtime.logging import log_line

STATE = "trainer_state.json"
SCHEDULE = "schedule.pt"
EMA = "ema.safetensors"
_NAME = re.compile(r"^step-(\d{8})$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def rng_file(rank: int) -> str:
    return f"rng-{rank}.pt"


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Renamed (complete-looking) checkpoint folders under `root`, oldest first; not yet verified."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), child) for child in root.iterdir()
             if (m := _NAME.match(child.name)) and child.is_dir()]
    return sorted(found)


def problems(folder: Path) -> list[str]:
    """What is wrong with a checkpoint folder (empty: intact)."""
    found = checksum_problems(folder)
    if found is None:
        return [f"no {CHECKSUMS} (an incomplete write, or another fadscale version's layout)"]
    return found


class Checkpointer:
    """Saves and finds checkpoints of one run; `save` and `newest_intact` are called on every rank."""

    def __init__(self, root: str | Path, keep_last: int, backend):
        self.root, self.keep_last, self.backend = Path(root), keep_last, backend

    def save(self, step: int, write: Callable[[Path], list[str]]) -> Path:
        """Collective: every rank calls `write(folder)`, which writes its files (the backend's model and
        optimizer files among them) and returns the names of the others it wrote. The main rank then
        writes the checksum list, renames the folder into place and prunes old ones."""
        backend = self.backend
        final = self.root / checkpoint_name(step)
        tmp = self.root / f".{final.name}.partial"
        try:
            if backend.is_main:
                self.root.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed mid-save
                tmp.mkdir()
            backend.barrier()
            names = write(tmp)
            everything = _gather_names(backend, names)
            backend.barrier()
            if backend.is_main:
                everything = sorted(set(everything) | set(backend.files(tmp)))  # sharded files: listed once all exist
                write_checksums(tmp, everything, step=step)
                share_tree(tmp)
                if final.exists():  # the same step saved again (a stop request right after a periodic save)
                    shutil.rmtree(final)
                os.replace(tmp, final)
                for _, old in list_checkpoints(self.root)[:-self.keep_last]:
                    shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            # A half-written checkpoint (a full disk, a stop) must not keep its space: the retry needs it.
            if backend.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        backend.barrier()
        return final

    def newest_intact(self) -> tuple[int, Path] | None:
        """The newest checkpoint whose files match its checksums; each newer damaged one is reported."""
        for step, folder in reversed(list_checkpoints(self.root)):
            wrong = problems(folder)
            if not wrong:
                return step, folder
            log_line(f"warning: checkpoint {folder} is not usable ({'; '.join(wrong)}): trying an older one",
                     self.backend.is_main)
        return None

    def newest_step(self) -> int | None:
        found = list_checkpoints(self.root)
        return found[-1][0] if found else None


def _gather_names(backend, names: list[str]) -> list[str]:
    """Every rank's file names, on every rank (rank files differ per rank)."""
    if backend.world == 1:
        return sorted(set(names))
    import torch.distributed as dist

    gathered: list = [None] * backend.world
    dist.all_gather_object(gathered, sorted(names))
    return sorted({n for part in gathered for n in part})


def read_state(folder: Path) -> dict:
    try:
        return json.loads((folder / STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise FadscaleError(f"{folder / STATE}: unreadable ({type(exc).__name__})") from None
