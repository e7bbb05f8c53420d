"""One writer per run folder: an exclusive lock on `<run>/run.lock`, held while a trainer runs; and one
writer per output folder (`.<name>.lock` beside it, held while the output is built).

The lock is an advisory `flock` on the file, so the operating system releases it when its holder dies,
however it dies (kill -9 included): a lock file whose lock is free is stale, and the next run takes it
over with a message naming the process that left it. The file records who holds it (host, pid, start
time), so a refused run can say which process to stop. flock on NFSv4 is mapped to POSIX byte-range
locks, which the server arbitrates across hosts.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from fadscale.errors import FadscaleError

LOCK_FILE = "run.lock"


class RunLock:
    def __init__(self, run_dir: str | Path, lock_file: str = LOCK_FILE, guards: str | Path | None = None,
                 remove: bool = False):
        """A lock on `run_dir / lock_file`, for the folder `guards` (default: `run_dir`), named in messages.
        `remove`: delete the lock file on release (a lock beside an output leaves nothing behind)."""
        self.path = Path(run_dir) / lock_file
        self.guards = Path(guards) if guards is not None else Path(run_dir)
        self.remove = remove
        self._fd: int | None = None
        self.took_over: dict | None = None  # the stale holder's record, when one was found

    def acquire(self, wait: bool = False) -> "RunLock":
        """Take the lock; when another process holds it, a one-line error, or (`wait`) wait for it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read(fd)
                if wait:
                    print(f"{self.guards}: pid {holder.get('pid', '?')} on host {holder.get('host', '?')} is writing "
                          "it; waiting for it to finish", file=sys.stderr, flush=True)
                    fcntl.flock(fd, fcntl.LOCK_EX)
                else:
                    os.close(fd)
                    raise FadscaleError(
                        f"{self.guards}: in use by pid {holder.get('pid', '?')} on host {holder.get('host', '?')} "
                        f"(since {holder.get('started', '?')}; lock {self.path}); stop that run first, or choose "
                        f"another output folder") from None
            # A holder that removes its lock file on release may have done so between our open and flock:
            # then this lock is on a file nobody else will open; start again on the current one.
            try:
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        previous = _read(fd)
        if previous:
            self.took_over = previous
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            if self.remove:  # removed while still held: no other writer can lock this file meanwhile
                self.path.unlink(missing_ok=True)
            os.ftruncate(self._fd, 0)  # an empty lock file: released cleanly, nothing stale to report
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _read(fd: int) -> dict:
    data = os.pread(fd, 4096, 0)
    try:
        record = json.loads(data.decode()) if data.strip() else {}
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {"pid": "?", "host": "? (unreadable lock file)"}
    return record if isinstance(record, dict) else {}
