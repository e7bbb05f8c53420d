"""Readers of tile sources, behind one interface: a list of items plus the entries skipped, with reasons.

Three kinds of source:

* a class-per-folder tree (Kather 2016's `01_TUMOR ... 08_EMPTY`, NCT-CRC-HE-100K's `ADI BACK ...`,
  any torchvision ImageFolder): every immediate sub-folder of the tree root is a class, sorted by
  name, and every file found recursively inside a class folder is a candidate tile;
* a zip of such a tree, read in place (nothing is extracted);
* the procedural generator, named by a spec string: `procedural` or `procedural:per_class=200,...`
  (a `str`; pass a `Path` to read a folder that happens to be called `procedural`).

The tree root is found the same way for folders and zips: starting at the top, descend while the
level holds exactly one sub-folder and that sub-folder has sub-folders of its own. So the Kather zip
(`Kather_texture_2016_image_tiles_5000/01_TUMOR/...`), its extracted folder and the folder above it
all give the same relative paths, and hence the same keys downstream. (A single-class tree whose
class folder has sub-folders is read as the classes of those sub-folders: give the folder above.)

Whether a file is an image is decided later, by decoding its content; here every file counts except
system clutter (dotfiles, `__MACOSX/`, `Thumbs.db`, `desktop.ini`), which is ignored silently.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from fadscale.errors import FadscaleError

# A tile is a few hundred KB at most; anything far larger is a whole-slide image or a zip bomb
# member, and is refused before it is read into memory.
MAX_FILE_BYTES = 256 * 2**20

_CLUTTER = {"thumbs.db", "desktop.ini", "__macosx"}

# A source's files before the tree root is known: (path parts from the top, reader).
_Listing = list[tuple[tuple[str, ...], Callable[[], bytes]]]


class Unreadable(Exception):
    """A source entry that cannot be used; the message is the reason recorded in `skipped`."""


@dataclass(frozen=True)
class SourceItem:
    """One candidate tile. `read` is a picklable callable, so items can be sent to worker processes."""

    relative_path: str  # POSIX path relative to the tree root, class folder first: "01_TUMOR/a.tif"
    class_folder: str
    read: Callable[[], bytes]


@dataclass(frozen=True)
class TileSource:
    kind: str  # "folder", "zip" or "procedural"
    path: str  # the folder or zip (resolved), or the procedural spec string as given
    spec: dict | None  # the parsed procedural spec; None for folders and zips
    root: str  # the tree root inside the folder or zip ("" when it is the top)
    class_folders: tuple[str, ...]  # sorted; a class index is a position in this tuple
    items: tuple[SourceItem, ...]  # sorted by relative_path
    # Entries refused while listing: {"path": relative to the folder or zip top, "reason": ...}
    skipped: tuple[dict, ...]


def open_source(src: str | os.PathLike) -> TileSource:
    """List a source: a procedural spec string, a class-per-folder tree, or a zip of one."""
    if isinstance(src, str) and (src == "procedural" or src.startswith("procedural:")):
        return _procedural_source(src)
    path = Path(src)
    if path.is_dir():
        files, skipped, folders = _walk_folder(path)
        return _tree_source("folder", path, files, skipped, folders)
    if path.is_file():
        files, skipped, folders = _list_zip(path)
        return _tree_source("zip", path, files, skipped, folders)
    raise FadscaleError(f"{path}: source not found (expected a folder, a .zip or 'procedural[:...]')")


def _is_clutter(name: str) -> bool:
    return name.startswith(".") or name.lower() in _CLUTTER


def _walk_folder(top: Path) -> tuple[_Listing, list[dict], set[tuple[str, ...]]]:
    """(files, skipped entries, every folder), paths as tuples of parts relative to `top`."""
    files, skipped, folders = [], [], set()

    def report(rel: Path, reason: str) -> None:
        skipped.append({"path": printable(rel.as_posix()), "reason": reason})

    def list_error(exc: OSError) -> None:
        report(Path(exc.filename).relative_to(top), f"cannot list folder: {exc.strerror}")

    # Symlinked folders are followed (datasets are often assembled from links), but each real folder
    # is entered once, so a link back up the tree cannot make the walk loop forever.
    visited = {os.path.realpath(top)}
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True, onerror=list_error):
        rel_dir = Path(dirpath).relative_to(top)
        kept = []
        for name in sorted(dirnames):
            if _is_clutter(name):
                continue
            if not _decodable(name):
                report(rel_dir / name, "folder name is not valid UTF-8; not read (rename it)")
                continue
            real = os.path.realpath(os.path.join(dirpath, name))
            if real in visited:
                report(rel_dir / name, "folder already read through another path (a link loop or duplicate)")
                continue
            visited.add(real)
            kept.append(name)
            folders.add((rel_dir / name).parts)
        dirnames[:] = kept
        for name in filenames:
            if _is_clutter(name):
                continue
            if not _decodable(name):
                report(rel_dir / name, "file name is not valid UTF-8; not read (rename it)")
                continue
            files.append(((rel_dir / name).parts, _FileReader(os.path.join(dirpath, name))))
    return files, skipped, folders


def _decodable(name: str) -> bool:
    """False for a name whose bytes are not UTF-8 (Python keeps them as lone surrogates): keys, the manifest
    and messages are UTF-8 text."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(path: str) -> str:
    """A path with its undecodable bytes written as \\xNN escapes (for the manifest and messages)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _list_zip(path: Path) -> tuple[_Listing, list[dict], set[tuple[str, ...]]]:
    zip_path = str(path.resolve())
    stat = os.stat(zip_path)
    stamp = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
    try:
        infos = _open_zip(zip_path, stamp, os.getpid()).infolist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise FadscaleError(f"{path}: not a readable zip file ({exc})") from None
    files, skipped, folders = [], [], set()
    for index, info in enumerate(infos):
        # Zips made on Windows sometimes use backslashes as separators.
        name = info.filename.replace("\\", "/")
        parts = tuple(part for part in name.split("/") if part not in ("", "."))
        if name.startswith("/") or re.match(r"[A-Za-z]:", name) or ".." in parts:
            skipped.append({"path": info.filename, "reason": "unsafe path in zip (absolute or '..'); not read"})
        elif parts and not any(_is_clutter(part) for part in parts):
            folder_parts = parts if info.is_dir() else parts[:-1]
            folders.update(folder_parts[:n] for n in range(1, len(folder_parts) + 1))
            if not info.is_dir():
                files.append((parts, _ZipMember(zip_path, stamp, index)))
    return files, skipped, folders


def _tree_source(kind: str, path: Path, files: _Listing, skipped: list[dict],
                 folders: set[tuple[str, ...]]) -> TileSource:
    """Find the tree root in a listing and assign its files to class folders. A class folder without
    files is an error: dropping it would silently renumber every class after it."""
    depth = _root_depth([parts for parts, _ in files])
    items: dict[str, SourceItem] = {}
    for parts, read in files:
        if len(parts) < depth + 2:
            skipped.append({"path": "/".join(parts), "reason": "not inside a class folder"})
            continue
        relative = "/".join(parts[depth:])
        if relative in items:  # only a zip can hold the same name twice
            skipped.append({"path": "/".join(parts), "reason": "duplicate entry; the first one is used"})
            continue
        items[relative] = SourceItem(relative, parts[depth], read)
    if not items:
        raise FadscaleError(f"{path}: no class folders with files found (expected one sub-folder per class)")
    root_parts = next(parts for parts, _ in files if len(parts) > depth + 1)[:depth]
    root = "/".join(root_parts)
    with_files = {item.class_folder for item in items.values()}
    empty = sorted(f[depth] for f in folders if len(f) == depth + 1 and f[:depth] == root_parts
                   and f[depth] not in with_files)
    if empty:
        where = "/".join(p for p in (str(path), root) if p)
        raise FadscaleError(f"{where}: class folder(s) {', '.join(empty)} hold no files; the class indices after "
                            f"them would shift. Add their tiles or remove the folder(s)")
    return TileSource(
        kind=kind,
        path=str(path.resolve()),
        spec=None,
        root=root,
        class_folders=tuple(sorted({item.class_folder for item in items.values()})),
        items=tuple(items[key] for key in sorted(items)),
        skipped=tuple(skipped),
    )


def _root_depth(paths: list[tuple[str, ...]]) -> int:
    """How many single wrapping folders sit above the class folders (see the module docstring).

    Loose files beside a wrapping folder (a README at the top of a zip) do not stop the descent;
    they are reported as outside any class folder.
    """
    depth = 0
    while True:
        below = [parts for parts in paths if len(parts) > depth + 1]
        if len({parts[depth] for parts in below}) != 1 or not any(len(parts) > depth + 2 for parts in below):
            return depth
        depth += 1


def _procedural_source(text: str) -> TileSource:
    # Imported here so that reading folders and zips does not depend on the generator.
    from PIL import Image

    from fadscale.data.procedural import FOLDER_NAMES, iter_spec, parse_spec

    from tqdm import tqdm

    spec = parse_spec(text)
    items = []
    for relative, class_index, array in tqdm(iter_spec(spec), total=spec.total, desc="generating", unit="tile",
                                             disable=spec.total < 5000, dynamic_ncols=True):
        # Generated tiles go through the same decode path as files: keep them as PNG bytes (level 1:
        # fast, and lossless like any level).
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
        items.append(SourceItem(relative, FOLDER_NAMES[class_index], _InlineBytes(buffer.getvalue())))
    return TileSource(
        kind="procedural",
        path=text,
        spec=dataclasses.asdict(spec),
        root="",
        class_folders=tuple(FOLDER_NAMES),
        items=tuple(sorted(items, key=lambda item: item.relative_path)),
        skipped=(),
    )


@dataclass(frozen=True)
class _FileReader:
    path: str

    def __call__(self) -> bytes:
        try:
            size = os.stat(self.path).st_size
            if size > MAX_FILE_BYTES:
                raise Unreadable(f"file of {size} bytes is larger than the {MAX_FILE_BYTES}-byte limit")
            with open(self.path, "rb") as handle:
                return handle.read()
        except OSError as exc:
            raise Unreadable(f"cannot read file: {exc.strerror or exc}") from None


@functools.lru_cache(maxsize=8)
def _open_zip(path: str, stamp: tuple[int, int, int], pid: int) -> zipfile.ZipFile:
    """One open handle per zip and process, shared by the listing and every read.

    `stamp` (inode, size, mtime) keys the handle to one version of the file, so a zip replaced under
    the same name is opened afresh. `pid` makes a forked worker open its own handle: sharing the
    parent's would share its file offset, and concurrent reads would race.
    """
    return zipfile.ZipFile(path)


@dataclass(frozen=True)
class _ZipMember:
    zip_path: str
    stamp: tuple[int, int, int]
    index: int  # position in infolist(): exact even when a name occurs twice

    def __call__(self) -> bytes:
        archive = _open_zip(self.zip_path, self.stamp, os.getpid())
        info = archive.infolist()[self.index]
        if info.file_size > MAX_FILE_BYTES:
            raise Unreadable(f"zip member of {info.file_size} bytes is over the {MAX_FILE_BYTES}-byte limit")
        try:
            return archive.read(info)
        except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, RuntimeError) as exc:
            # BadZipFile: CRC mismatch; NotImplementedError: unsupported compression; RuntimeError:
            # encrypted member.
            raise Unreadable(f"cannot read zip member: {exc}") from None


@dataclass(frozen=True)
class _InlineBytes:
    data: bytes = dataclasses.field(repr=False)

    def __call__(self) -> bytes:
        return self.data


def holds_colour(src: str | os.PathLike, sample: int = 16) -> bool:
    """Whether a source's tiles are in colour: decodes up to `sample` of them, spread over the classes, and
    looks for a pixel whose R, G and B differ (a grey tile saved as RGB has all three equal)."""
    import numpy as np
    from PIL import Image

    items = open_source(src).items
    step = max(1, len(items) // sample)
    for item in items[::step][:sample]:
        try:
            with Image.open(io.BytesIO(item.read())) as image:
                if image.mode in ("1", "L", "LA", "I", "I;16", "F"):
                    continue
                array = np.asarray(image.convert("RGB"), dtype=np.int16)
        except Exception:  # an unreadable file says nothing about colour; sharding lists it as skipped
            continue
        if np.abs(array[..., 0] - array[..., 1]).max() > 8 or np.abs(array[..., 1] - array[..., 2]).max() > 8:
            return True
    return False
