"""Sharding: any tile source -> WebDataset tar shards, with a stratified train/val/test split and a manifest.

Three parts, fixed by a hash of each file's path: train (generators and experts learn from it), val
(anything may be chosen on it: epochs, settings) and test (only scored; empty unless asked for, as the
real-tile recipe does).

Every image is decoded, normalised to 8-bit RGB (or L) at its own pixel size and stored as a lossless
PNG; files that cannot be used are skipped and listed with a reason. The output is reproducible:
the split and the keys depend only on the relative paths and the seed, samples are written in key
order, and tar members carry fixed metadata, so the same source gives byte-identical shards, with any
number of workers. The output folder appears only when complete (manifest written last).

Each sample holds `{key}.png`, `{key}.cls` (the class index, ASCII) and `{key}.json` (where the tile
came from), where key = f"{class_index:02d}_{sha1(relative_path)[:16]}": no dots, because WebDataset
splits key and extension at the first dot.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import multiprocessing
import re
import signal
import sys
import tarfile
import warnings
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from fadscale import __version__
from fadscale.data.sources import SourceItem, Unreadable, open_source
from fadscale.errors import FadscaleError
from fadscale.runtime.io import atomic_output_dir, atomic_write_json, read_json, sha256_file

FORMAT = "fadscale-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")

# Images above this many pixels are refused before decoding. Tiles are well under a megapixel; the
# limit sits below Pillow's own warning threshold, so Pillow's bomb warning is redundant and muted.
MAX_PIXELS = 64_000_000

_HIGH_DEPTH_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")
# Fixed, so the PNG bytes do not depend on Pillow's default. On Kather tiles level 3 encodes in
# 6 ms at 58 KiB, level 6 in 15 ms at 54 KiB: sharding time is mostly PNG encoding.
_PNG_LEVEL = 3


def class_name(folder: str) -> str:
    """'01_TUMOR' -> 'TUMOR': Kather's numeric prefix orders the folders, it is not part of the name."""
    return re.sub(r"^\d+_", "", folder) or folder


def tile_key(class_index: int, relative_path: str) -> str:
    return f"{class_index:02d}_{hashlib.sha1(relative_path.encode('utf-8')).hexdigest()[:16]}"


def val_count(n: int, val_fraction: float) -> int:
    """Tiles of an n-tile class that go to val: round(fraction * n), at least one when n >= 2 and the
    fraction is positive, and never the whole class (training needs every class)."""
    count = round(val_fraction * n)
    if val_fraction > 0 and n >= 2:
        count = max(count, 1)
    return min(count, n - 1)


def split_items(items, class_folders, val_fraction: float, seed: int,
                test_fraction: float = 0.0) -> dict[str, list[tuple[str, SourceItem]]]:
    """Stratified split: {"train": [(key, item), ...], "val": [...], "test": [...]}, each in a fixed mixed order.

    Per class the items are permuted by sha256(seed, relative path): a seeded permutation that
    depends on no random-number library, so the split stays the same across Python and NumPy
    versions. It never looks at pixels: a file that fails to decode leaves the others in place.
    """
    index = {folder: i for i, folder in enumerate(class_folders)}
    plan: dict[str, list[tuple[str, SourceItem]]] = {split: [] for split in SPLITS}
    for folder in class_folders:
        members = [item for item in items if item.class_folder == folder]
        members.sort(key=lambda item: hashlib.sha256(f"{seed}:{item.relative_path}".encode("utf-8")).digest())
        n_val = val_count(len(members), val_fraction)
        # Test tiles come after the val ones in the permutation, so adding a test part leaves an
        # existing val split as it was; train keeps at least one tile of every class.
        n_test = min(val_count(len(members), test_fraction), max(0, len(members) - n_val - 1))
        for position, item in enumerate(members):
            split = "val" if position < n_val else "test" if position < n_val + n_test else "train"
            plan[split].append((tile_key(index[folder], item.relative_path), item))
    # Keys start with the class index, so key order would write whole shards of one class and a
    # streaming shuffle buffer could not mix them; order by a seeded hash of the key instead (still
    # deterministic: the same source and seed give the same shards).
    for pairs in plan.values():
        pairs.sort(key=lambda pair: hashlib.sha256(f"order:{seed}:{pair[0]}".encode("utf-8")).digest())
    return plan


def normalise_tile(data: bytes, grayscale: bool) -> tuple[bytes, dict]:
    """Decode any image Pillow reads (by content, not extension) into 8-bit RGB or L PNG bytes.

    Returns the PNG and what the file held ({"orig_size", "orig_mode", "orig_format"}); raises
    Unreadable with the reason for empty, truncated, non-image and oversized files.
    """
    if not data:
        raise Unreadable("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise Unreadable(f"decompression bomb: {exc}") from None
    except Exception:  # UnidentifiedImageError, or a header so broken that a format plugin fails on it
        raise Unreadable("not a recognised image format") from None
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise Unreadable(f"decompression bomb: {width}x{height} is over the {MAX_PIXELS}-pixel limit")
    try:
        image.load()  # all of it, so a truncated file fails here and not in a training job
        png = _png_bytes(_normalise(image, grayscale))
    except Exception as exc:  # untrusted content: whatever the decoder raises, the tile is skipped
        raise Unreadable(f"cannot decode {image.format} image: {exc}") from None
    return png, {"orig_size": [width, height], "orig_mode": image.mode, "orig_format": image.format}


def _normalise(image: Image.Image, grayscale: bool) -> Image.Image:
    """8-bit RGB or L whatever the mode; transparency is composited on white (the slide background)."""
    if image.mode in _HIGH_DEPTH_MODES:
        image = _high_depth_to_l(image)
    if image.has_transparency_data:  # RGBA, LA, PA, premultiplied modes, P or L/RGB with a tRNS colour
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image.convert("RGBA"))
    return image.convert("L" if grayscale else "RGB")  # also CMYK, YCbCr, 1-bit, palette without alpha


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        # Float images have no fixed range: [0, 1] is the usual convention, anything else is read as 0-255.
        values = np.nan_to_num(values)
        scale = 255.0 if values.max(initial=0.0) <= 1.0 else 1.0
    else:
        # "I;16*" is 16-bit; Pillow also opens 16-bit PNG and TIFF as 32-bit "I", so "I" is read as 16-bit.
        scale = 255.0 / 65535.0
    return Image.fromarray(np.clip(np.rint(values * scale), 0, 255).astype(np.uint8))


def _png_bytes(image: Image.Image) -> bytes:
    # Drop what the source carried (ICC profile, dpi, transparency key): the PNG holds pixels only.
    image.info = {}
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=_PNG_LEVEL)
    return buffer.getvalue()


def _process(task: tuple[SourceItem, bool]) -> tuple[bytes, dict] | str:
    """Worker entry point: (png, info) for a usable tile, or the reason it is skipped."""
    item, grayscale = task
    try:
        return normalise_tile(item.read(), grayscale)
    except Unreadable as exc:
        return str(exc)


def _tar_member_bytes(size: int) -> int:
    return tarfile.BLOCKSIZE + -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE  # header + padded data


def _tar_file_bytes(member_bytes: int) -> int:
    # tarfile ends an archive with two zero blocks and pads it to a whole record.
    end = member_bytes + 2 * tarfile.BLOCKSIZE
    return -(-end // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


class ShardWriter:
    """Writes one split into `{split}-000000.tar`, ... and starts the next shard before one would pass
    `max_samples` or `max_bytes` (a single sample larger than `max_bytes` gets a shard of its own)."""

    def __init__(self, folder: Path, split: str, max_samples: int, max_bytes: int):
        self.folder, self.split, self.max_samples, self.max_bytes = folder, split, max_samples, max_bytes
        self.shards: list[dict] = []
        self._file = self._tar = None
        self._samples = self._member_bytes = 0

    def write(self, key: str, members: dict[str, bytes]) -> None:
        size = sum(_tar_member_bytes(len(data)) for data in members.values())
        if self._tar is not None and (
            self._samples >= self.max_samples or _tar_file_bytes(self._member_bytes + size) > self.max_bytes
        ):
            self._finish()
        if self._tar is None:
            self._start()
        self._tar.write({"__key__": key, **members})
        self._samples += 1
        self._member_bytes += size

    def close(self) -> list[dict]:
        if self._tar is not None:
            self._finish()
        return self.shards

    def abort(self) -> None:
        """Close the open shard unrecorded (the caller discards the staging folder)."""
        if self._tar is not None:
            self._tar.close()
            self._file.close()
            self._file = self._tar = None

    def _start(self) -> None:
        import webdataset  # here, not at the top: it imports torch, which worker processes do not need

        self._name = f"{self.split}-{len(self.shards):06d}.tar"
        self._file = open(self.folder / self._name, "wb")
        # Fixed owner, mode and mtime make the archive bytes reproducible. An integer mtime also keeps
        # tarfile from adding a PAX header per member (it does so for float times).
        self._tar = webdataset.TarWriter(self._file, encoder=False, user="fadscale", group="fadscale",
                                         mode=0o444, mtime=0)
        self._samples = self._member_bytes = 0

    def _finish(self) -> None:
        self._tar.close()
        self._file.close()
        path = self.folder / self._name
        self.shards.append({"name": self._name, "samples": self._samples, "bytes": path.stat().st_size,
                            "sha256": sha256_file(path)})
        self._file = self._tar = None


@contextlib.contextmanager
def _mapper(workers: int):
    """An ordered map over worker processes (items and readers are picklable; a zip is reopened in
    each worker), or the plain built-in map for one worker."""
    if workers == 1:
        yield map
        return
    pool = multiprocessing.Pool(workers, initializer=_worker_signals)
    try:
        yield functools.partial(pool.imap, chunksize=8)
    except BaseException:
        pool.terminate()  # SIGTERM to every worker
        raise
    else:
        pool.close()  # workers leave on their own once the queue is drained
    finally:
        pool.join()


def _worker_signals() -> None:
    """Forked workers inherit the parent's Python signal handlers; a host that turned SIGTERM into a flag
    (a trainer's stop request, a server) would make `terminate()` wait forever for them. Ctrl-C is
    the parent's to handle: it terminates the pool."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _listed(skipped, first: int = 3) -> str:
    """The first few skipped entries, for an error message."""
    listed = "; ".join(f"{entry['path']}: {entry['reason']}" for entry in skipped[:first])
    return listed + (f" (and {len(skipped) - first} more)" if len(skipped) > first else "")


def _refuse_skips(strict: bool, skipped) -> None:
    if strict and skipped:
        raise FadscaleError(f"strict mode: {len(skipped)} entries would be skipped: {_listed(skipped)}")


def _check_arguments(src, out, val_fraction, max_samples_per_shard, max_shard_bytes, workers,
                     test_fraction: float = 0.0) -> None:
    if not 0 <= val_fraction < 1:
        raise FadscaleError(f"val fraction must be in [0, 1), got {val_fraction}")
    if not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise FadscaleError(f"test fraction must be in [0, 1) and leave tiles for training beside the val "
                            f"fraction {val_fraction}, got {test_fraction}")
    if max_samples_per_shard < 1 or max_shard_bytes < 1:
        raise FadscaleError("shard limits (samples per shard, bytes per shard) must be positive")
    if workers < 1:
        raise FadscaleError(f"workers must be at least 1, got {workers}")
    source_dir = Path(src)
    # Output inside the source folder would be read back as a class on the next run; replacing a folder
    # that holds the source (--overwrite) would delete the tiles.
    if source_dir.exists() and Path(out).resolve().is_relative_to(source_dir.resolve()):
        raise FadscaleError(f"{out}: the output folder must not be inside the source {src}")
    if source_dir.exists() and source_dir.resolve().is_relative_to(Path(out).resolve()):
        raise FadscaleError(f"{out}: the output folder must not contain the source {src}")


def class_table(class_folders) -> list[dict]:
    """[{"index", "name", "folder"}] in class-index order."""
    names = [class_name(folder) for folder in class_folders]
    if len(set(names)) < len(names):  # "1_A" and "2_A": only the prefix tells them apart
        names = list(class_folders)
    return [{"index": i, "name": name, "folder": folder}
            for i, (name, folder) in enumerate(zip(names, class_folders))]


@dataclass
class _Written:
    shards: dict[str, list[dict]]  # split -> shard records
    per_class: dict[str, Counter]  # split -> class name -> samples
    sizes: Counter  # "WxH" -> samples
    skipped: list[dict]  # entries that failed to decode


def _write_splits(staging: Path, plan, classes: list[dict], *, grayscale: bool, workers: int, progress: bool,
                  max_samples: int, max_bytes: int) -> _Written:
    """Decode every planned item (in write order, over `workers` processes) and write the shards."""
    by_folder = {entry["folder"]: entry for entry in classes}
    order = [(split, key, item) for split in SPLITS for key, item in plan[split]]
    writers = {split: ShardWriter(staging, split, max_samples, max_bytes) for split in SPLITS}
    written = _Written({}, {split: Counter() for split in SPLITS}, Counter(), [])
    try:
        with _mapper(workers) as mapper:
            results = mapper(_process, ((item, grayscale) for _, _, item in order))
            bar = tqdm(results, total=len(order), desc="shard", unit="tile", file=sys.stderr, disable=not progress)
            for (split, key, item), result in zip(order, bar):
                if isinstance(result, str):
                    written.skipped.append({"path": item.relative_path, "reason": result})
                    continue
                png, info = result
                entry = by_folder[item.class_folder]
                meta = {"source": item.relative_path, "class_name": entry["name"],
                        "class_folder": entry["folder"], **info}
                writers[split].write(key, {"cls": str(entry["index"]).encode("ascii"), "png": png,
                                           "json": json.dumps(meta, sort_keys=True).encode("utf-8")})
                written.per_class[split][entry["name"]] += 1
                written.sizes["{}x{}".format(*info["orig_size"])] += 1
            bar.close()  # zip stops on `order`, before the bar's own last refresh: draw the final count
        written.shards = {split: writer.close() for split, writer in writers.items()}
    except BaseException:  # the staging folder is discarded; close its files now, not in the garbage collector
        for writer in writers.values():
            writer.abort()
        raise
    return written


def shard_dataset(src: str | Path, out: str | Path, *, val_fraction: float = 0.1, test_fraction: float = 0.0,
                  seed: int = 0, grayscale: bool = False, max_samples_per_shard: int = 1000,
                  max_shard_bytes: int = 256 * 2**20, workers: int = 1, strict: bool = False,
                  overwrite: bool = False, progress: bool = True) -> dict:
    """Write the tiles of `src` (folder, zip or procedural spec) as shards in `out`; return the manifest.

    `strict` turns any skipped entry into a FadscaleError (and no output). `out` must not exist
    unless `overwrite`; the previous output is replaced only once the new one is complete.
    """
    _check_arguments(src, out, val_fraction, max_samples_per_shard, max_shard_bytes, workers, test_fraction)
    with atomic_output_dir(out, overwrite=overwrite, made_by=MANIFEST) as staging:
        source = open_source(src)
        _refuse_skips(strict, source.skipped)
        classes = class_table(source.class_folders)
        plan = split_items(source.items, source.class_folders, val_fraction, seed, test_fraction)
        written = _write_splits(staging, plan, classes, grayscale=grayscale, workers=workers, progress=progress,
                                max_samples=max_samples_per_shard, max_bytes=max_shard_bytes)
        skipped = sorted([*source.skipped, *written.skipped], key=lambda entry: entry["path"])
        _refuse_skips(strict, skipped)
        if not written.sizes:
            raise FadscaleError(f"{src}: no usable image among {len(source.items)} files ({_listed(skipped)})")
        manifest = shard_manifest(
            source={"path": source.path, "kind": source.kind, "spec": source.spec, "root": source.root},
            channels=1 if grayscale else 3, sizes=written.sizes, classes=classes, seed=seed,
            val_fraction=val_fraction, test_fraction=test_fraction, per_class=written.per_class,
            shards=written.shards, skipped=skipped)
        atomic_write_json(staging / MANIFEST, manifest)
    return manifest


def shard_manifest(*, source: dict, channels: int, sizes: dict[str, int], classes: list[dict], seed: int | None,
                   val_fraction: float, test_fraction: float = 0.0, per_class: dict[str, dict[str, int]], shards: dict[str, list[dict]],
                   skipped: list) -> dict:
    """The manifest of a shard folder (`per_class` and `shards` by split), as `load_manifest` reads it."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tool_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": source,
        "image": {"mode": "L" if channels == 1 else "RGB", "channels": channels, "sizes": dict(sorted(sizes.items()))},
        "classes": classes,
        "seed": seed,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "splits": {split: {"count": sum(per_class.get(split, {}).values()),
                           "per_class": {entry["name"]: per_class.get(split, {}).get(entry["name"], 0)
                                         for entry in classes},
                           "shards": shards.get(split, [])}
                   for split in SPLITS},
        "skipped": skipped,
    }


def load_manifest(shard_dir: str | Path) -> dict:
    """The manifest of a shard folder, after checking that it is one and that its shards are all there."""
    folder = Path(shard_dir)
    path = folder / MANIFEST
    manifest = read_json(path, "shard manifest (is this a folder written by `fadscale shard`?)")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise FadscaleError(f"{path}: not a fadscale shard manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise FadscaleError(f"{path}: shard format version {manifest.get('format_version')} is not the "
                            f"version {FORMAT_VERSION} this fadscale reads; shard the source again")
    if isinstance(manifest.get("splits"), dict):  # written before the test part existed: it is empty
        manifest["splits"].setdefault("test", {"count": 0, "per_class": {}, "shards": []})
    try:
        listed = [shard for split in SPLITS for shard in manifest["splits"][split]["shards"]]
        for shard in listed:
            shard_path = folder / shard["name"]
            if not shard_path.is_file():
                raise FadscaleError(f"{shard_path}: shard listed in {path} is missing")
            # A cheap check that catches a truncated copy; the sha256 in the manifest is the full one.
            if shard_path.stat().st_size != shard["bytes"]:
                raise FadscaleError(f"{shard_path}: size differs from {path} (truncated or replaced?)")
    except (KeyError, TypeError) as exc:
        raise FadscaleError(f"{path}: malformed shard manifest (missing {exc})") from None
    return manifest


def shard_urls(shard_dir: str | Path, split: str) -> list[str]:
    """Paths of a split's shards, in order (empty for a split with no samples, e.g. val_fraction=0)."""
    manifest = load_manifest(shard_dir)
    if split not in manifest["splits"]:
        raise FadscaleError(f"{shard_dir}: no split {split!r} (have: {', '.join(manifest['splits'])})")
    return [str(Path(shard_dir) / shard["name"]) for shard in manifest["splits"][split]["shards"]]


def summary_line(manifest: dict, out: str | Path | None = None) -> str:
    """One line for the user: 'wrote 127 tiles (114 train / 13 val, 8 classes) in 2 shards to OUT; skipped 0'
    (with ' / N test' when there is a test part)."""
    splits = manifest["splits"]
    train, val = splits["train"]["count"], splits["val"]["count"]
    test = splits.get("test", {}).get("count", 0)
    shards = sum(len(split["shards"]) for split in splits.values())
    where = f" to {out}" if out is not None else ""
    parts = f"{train} train / {val} val" + (f" / {test} test" if test else "")
    return (f"wrote {train + val + test} tiles ({parts}, {len(manifest['classes'])} classes) "
            f"in {shards} shards{where}; skipped {len(manifest['skipped'])}")
