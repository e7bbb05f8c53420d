"""Stop requests: SIGUSR1/SIGTERM (SLURM's warning signal, a preemption) or a STOP file in the run folder.

A trainer checks `requested()` once per step; all ranks agree through `any_rank`, finish the step,
checkpoint and exit 0. The handlers live only while the request is entered (`with StopRequest(...)`):
left behind, a flag-only SIGTERM handler would make the process, and every process it forks later
(a multiprocessing pool, whose shutdown relies on SIGTERM), ignore SIGTERM for good. The file form
exists because a signal sent to a launcher (srun -> torchrun / accelerate launch) does not always
reach the Python workers; a file on the shared run folder does.
"""

from __future__ import annotations

import signal
from pathlib import Path

STOP_FILE = "STOP"


class StopRequest:
    def __init__(self, run_dir: str | Path | None = None, signals=(signal.SIGUSR1, signal.SIGTERM)):
        self._flag = False
        self.reason = ""
        self.stop_file = Path(run_dir) / STOP_FILE if run_dir is not None else None
        self._signals = tuple(signals)
        self._previous: dict = {}

    def __enter__(self) -> "StopRequest":
        for sig in self._signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *_exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, _frame) -> None:
        self._flag = True
        self.reason = signal.Signals(signum).name

    def requested(self) -> bool:
        """True when a signal arrived or the STOP file exists (this rank's view)."""
        if not self._flag and self.stop_file is not None and self.stop_file.exists():
            self._flag, self.reason = True, f"{self.stop_file} exists"
        return self._flag

    def clear_stale_file(self) -> None:
        """A STOP file left by a previous (requeued) run must not stop the new one at once."""
        if self.stop_file is not None:
            self.stop_file.unlink(missing_ok=True)
