"""Run logging shared by the trainers: TensorBoard scalars, a metrics.jsonl file, rank-0 console lines."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from fadscale.runtime.io import atomic_write_text


def log_line(message: str, is_main: bool = True) -> None:
    if is_main:
        print(message, file=sys.stderr, flush=True)


class RunLogger:
    """Writes only on the main rank; every other rank gets a logger that does nothing."""

    def __init__(self, run_dir: str | Path, is_main: bool, tensorboard: bool = True, resumed_at: int | None = None):
        """`resumed_at`: the step a resumed run continues from. Records of later steps (logged by the run
        before it was killed, after its last checkpoint) are dropped, as the resumed run logs them again."""
        self.is_main = is_main
        self._tb = None
        self._jsonl = None
        if not is_main:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        # Appending keeps the history of a resumed run in one file.
        if resumed_at is not None:
            _drop_after(run_dir / "metrics.jsonl", resumed_at)
        self._jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.is_main:
            return
        record = {"step": step, "time": time.time(), **{k: float(v) for k, v in values.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, float(value), step)

    def event(self, step: int, name: str, data: dict) -> None:
        """A record that is not a scalar (e.g. a forced resume's changed settings); `read_metrics` skips it
        unless asked."""
        if self.is_main:
            self._jsonl.write(json.dumps({"step": step, "time": time.time(), "event": name, **data}, default=str) + "\n")
            self._jsonl.flush()

    def image(self, tag: str, step: int, image_chw) -> None:
        if self.is_main and self._tb is not None:
            self._tb.add_image(tag, image_chw, step)

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        if self.is_main and self._tb is not None:
            flat = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}
            self._tb.add_hparams(flat, metrics, run_name=".")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None


def _drop_after(path: Path, step: int) -> None:
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(line + "\n" for line in kept))


def read_metrics(run_dir: str | Path, events: bool = False) -> list[dict]:
    """The scalar records of a run's metrics.jsonl (and its event records when `events`)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return records if events else [r for r in records if "event" not in r]
