"""Checkpoint folders: written under a temporary name, renamed when complete, newest K kept.

Layout: `<run>/checkpoints/step-00000120/` (complete) and `.step-00000120.partial/` (being written).
Only complete folders are ever resumed from, so a run killed mid-save loses nothing already on disk.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Callable

from fadscale.runtime.distributed import barrier

_NAME = re.compile(r"^step-(\d{8})$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _NAME.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(root: str | Path) -> tuple[int, Path] | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def save_checkpoint(
    root: str | Path,
    step: int,
    write: Callable[[Path], None],
    *,
    keep_last: int,
    is_main: bool,
) -> Path:
    """Collective: every rank calls `write(tmp_dir)` (ranks may each write their own files), then the
    main rank renames the folder into place and prunes old ones. Returns the final path."""
    root = Path(root)
    final = root / checkpoint_name(step)
    tmp = root / f".{final.name}.partial"
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed mid-save
        tmp.mkdir()
    barrier()
    write(tmp)
    barrier()
    if is_main:
        if final.exists():  # the same step saved again (a stop request right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final
