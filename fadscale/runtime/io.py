"""Atomic writes, hashing and the small JSON helpers every stage uses.

Every artifact fadscale writes appears complete or not at all: files are written under a temporary
name in the same folder and renamed (rename is atomic on POSIX within one filesystem); folders are
built under a temporary name and renamed at the end.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

from fadscale.errors import FadscaleError




def file_error(exc: OSError) -> str:
    """One line for a file-system error: the path(s) and what went wrong, e.g. "out/x: Read-only file system"."""
    where = f"{exc.filename} -> {exc.filename2}" if getattr(exc, "filename2", None) else f"{exc.filename}"
    if isinstance(exc, FileExistsError):  # mkdir(parents=True) met a file where a folder must go
        return f"{where}: exists and is not a folder"
    return f"{where}: {exc.strerror or exc}"


_DISK_FULL_TEXT = ("no space left on device", "storagefull", "disk quota exceeded", "errno 28", "file write failed",
                   "os error 28")


def _human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def free_space(path: str | os.PathLike) -> str:
    """'12 MiB free' on the file system of `path` (or of its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return f"{_human(shutil.disk_usage(path).free)} free"
    except OSError:
        return "free space unknown"


def disk_full_message(exc: BaseException, where: str | os.PathLike) -> str | None:
    """One line for a write that failed because the disk (or quota) is full, naming the path and the free
    space; None for any other error. Libraries report a full disk in their own words (safetensors:
    "StorageFull", torch.save: "file write failed"), so the exception chain's text is read too."""
    seen: set[int] = set()
    chain, current = [], exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append(current)
        current = current.__cause__ or current.__context__
    path = None
    for item in chain:
        if isinstance(item, OSError) and item.errno in (errno.ENOSPC, errno.EDQUOT):
            path = item.filename or where
            break
    else:
        if not any(text in str(item).lower() for item in chain for text in _DISK_FULL_TEXT):
            return None
        path = where
    return (f"{path}: no space left on the device ({free_space(path)}); free some space or choose another "
            "output folder, then run again (a training run resumes from its last checkpoint)")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


CHECKSUMS = "checksums.json"


def write_checksums(folder: str | os.PathLike, names: list[str] | None = None, **extra: Any) -> None:
    """`folder/checksums.json`: the sha256 of `names` (default: every file under `folder`), written last
    and atomically, so a folder with it is complete. `extra` keys are stored beside the list."""
    folder = Path(folder)
    if names is None:
        names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                       if p.is_file() and p.name != CHECKSUMS)
    atomic_write_json(folder / CHECKSUMS, {**extra, "files": {n: sha256_file(folder / n) for n in names}})


def _listed(folder: Path) -> dict[str, str]:
    """{file: sha256} from a folder's checksums.json (raises on a missing or malformed list)."""
    files = json.loads((folder / CHECKSUMS).read_text(encoding="utf-8"))["files"]
    return dict(files.items())


def checksum_problems(folder: str | os.PathLike, only: tuple[str, ...] | None = None) -> list[str] | None:
    """What is wrong with a folder's files against its checksums.json: [] when intact, None when it has no
    list (written by an older fadscale). `only`: check just the files under these names (a file or folder)."""
    folder = Path(folder)
    if not (folder / CHECKSUMS).is_file():
        return None
    try:
        sums = _listed(folder)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return [f"{CHECKSUMS} unreadable ({type(exc).__name__})"]
    found = []
    for name, digest in sorted(sums.items()):
        if only is not None and not any(name == o or name.startswith(o.rstrip("/") + "/") for o in only):
            continue
        path = folder / name
        if not path.is_file():
            found.append(f"{name} missing")
        elif sha256_file(path) != digest:
            found.append(f"{name} damaged (checksum mismatch)")
    return found


def foreign_entries(folder: str | os.PathLike) -> list[str]:
    """Top-level entries of a folder with a checksums.json that the list does not cover (a user's files put
    inside an output fadscale replaces as a whole); [] for a folder without the list."""
    folder = Path(folder)
    try:
        files = _listed(folder)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []
    ours = {name.split("/", 1)[0] for name in files} | {CHECKSUMS}
    return sorted(p.name for p in folder.iterdir() if p.name not in ours)


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
        if final.is_dir() and (foreign := foreign_entries(final)):
            raise FadscaleError(f"{final}: not replaced: it holds {', '.join(foreign[:3])}, which fadscale did not "
                                "write there; move it out of the folder first")
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
