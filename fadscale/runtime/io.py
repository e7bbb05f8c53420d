"""Atomic writes, hashing and the small JSON helpers every stage uses.

Every artifact fadscale writes appears complete or not at all: files are written under a temporary
name in the same folder and renamed (rename is atomic on POSIX within one filesystem); folders are
built under a temporary name and renamed at the end.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator


class FadscaleError(Exception):
    """An error a user can act on: printed as one line, without a traceback, with a non-zero exit."""


def file_error(exc: OSError) -> str:
    """One line for a file-system error: the path(s) and what went wrong, e.g. "out/x: Read-only file system"."""
    where = f"{exc.filename} -> {exc.filename2}" if getattr(exc, "filename2", None) else f"{exc.filename}"
    if isinstance(exc, FileExistsError):  # mkdir(parents=True) met a file where a folder must go
        return f"{where}: exists and is not a folder"
    return f"{where}: {exc.strerror or exc}"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def usual_mode(directory: bool = False) -> int:
    """The mode `open`/`mkdir` would give under the current umask. mkstemp and mkdtemp make private
    (0600/0700) files and folders; the outputs are for teammates on a shared cluster too."""
    return (0o777 if directory else 0o666) & ~_umask()


def share_tree(root: str | os.PathLike) -> None:
    """Give the files and folders under `root` that a library made private (safetensors writes 0600) the
    umask's usual mode."""
    for path in [Path(root), *Path(root).rglob("*")]:
        if path.is_symlink():
            continue
        private = 0o700 if path.is_dir() else 0o600
        if path.stat().st_mode & 0o777 == private:
            path.chmod(usual_mode(directory=path.is_dir()))


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> None:
    """safetensors `save_file`, atomically (temporary name, then rename) and readable by the group."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        tmp.chmod(usual_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, usual_mode())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise FadscaleError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FadscaleError(f"{path}: not valid JSON ({exc})") from None


@contextlib.contextmanager
def atomic_output_dir(final: str | os.PathLike, overwrite: bool = False, made_by: str | None = None) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; rename it to `final` only if the block succeeds.

    An existing `final` is refused unless `overwrite`; with `overwrite` the old folder is replaced
    only after the new one is complete, so a failed run never destroys the previous output. `made_by`
    (the file every such output holds, e.g. its manifest): `overwrite` replaces only a folder that
    holds it (or an empty one), never one fadscale did not make.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(final.parent, os.W_OK):
        raise FadscaleError(f"{final.parent}: output folder is not writable")
    from fadscale.runtime.lock import RunLock

    lock = RunLock(final.parent, f".{final.name}.lock", guards=final, remove=True).acquire()  # one writer
    try:
        if final.exists() and not overwrite:
            raise FadscaleError(f"{final}: output already exists (pass --overwrite to replace it)")
        if final.exists() and made_by is not None and (
                not final.is_dir() or (any(final.iterdir()) and not (final / made_by).is_file())):
            raise FadscaleError(f"{final}: not replaced: it holds no {made_by}, so fadscale did not make it "
                                f"(move it away or choose another output)")
        _clean_leftovers(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{os.getpid()}.", suffix=".partial", dir=final.parent))
        try:
            yield tmp
            share_tree(tmp)
            if final.exists():
                old = final.with_name(f".{final.name}.old-{os.getpid()}")
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        lock.release()


def _clean_leftovers(final: Path) -> None:
    """Remove the staging folders of `final` left by writers that died (their pid is in the name and no
    longer runs); report any other."""
    prefix = f".{final.name}."
    for left in final.parent.glob(f"{glob.escape(prefix)}*.partial"):
        pid = left.name[len(prefix):].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(left, ignore_errors=True)
            print(f"removed {left}: left by an earlier run that stopped before finishing", file=sys.stderr)
        else:
            print(f"note: {left} is another writer's staging folder (or an old leftover; remove it if no "
                  f"other run writes {final})", file=sys.stderr)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def git_commit(default: str = "unknown") -> str:
    """The commit of the fadscale source tree, when it is a git checkout; `default` otherwise."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return default
    return out.stdout.strip() if out.returncode == 0 else default
