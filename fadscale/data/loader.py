"""The streaming loader every stage reads tiles with: WebDataset tar shards -> batches of tensors.

Training mode (`train_loader`): each rank draws shards with replacement from the split, shuffles
through a buffer, decodes, applies one of the 8 square views (flips and 90-degree rotations) and
yields a fixed number of batches per epoch, the same on every rank, so DDP never waits on a rank that
ran out of data.

Determinism: the raw stream of a rank (shard draws, shuffle, views) comes from one random generator
seeded by (seed, epoch, rank) alone. Every DataLoader worker reads that same stream without decoding
it and decodes only the batches the DataLoader takes from it (batch `start_batch + j` comes from
worker j % workers). So batch b of an epoch is the same whatever the number of workers, and
`start_batch` (resume mid-epoch) gives exactly the batches an uninterrupted epoch gives from there.
The price is that each worker reads the rank's tar bytes (cheap); decoding, the expensive part, is
split between them.

Decoding: a training stream in the main process decodes and resizes each tile once and keeps it
(`DECODED_TILES`, up to 1 GiB, keyed by the bytes' digest); other reads in the main process use what is kept
and add nothing; DataLoader workers decode every time.

Evaluation mode (`eval_loader`): every sample of the split exactly once across all ranks and workers,
with no view applied: the split's samples, numbered in shard order, are cut into one contiguous
range per (rank, worker), so each reads only the shards its range touches.

A batch is a dict: image [B, C, H, W] float in [-1, 1], label [B] long, view [B] long, key list[str],
plus one tensor per requested cached feature (the row of that sample's view), named by the part of
the extension before the first dot ("pooled.npy" -> batch["pooled"]), and `skipped` (damaged records
left out of it).

Damaged data: each shard's sha256 is checked against its manifest once per process, before it is first
read; every record is checked as it is decoded (the image decodes, the features are finite). What
happens to damage is `on_corrupt`: "error" stops with one line naming the shard (and the key); "skip"
leaves the damaged records out, each named on stderr and counted in the batch's `skipped`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import base_plus_ext, group_by_keys

from fadscale.data.shard import load_manifest, shard_urls
from fadscale.errors import FadscaleError
from fadscale.runtime.io import sha256_file
from fadscale.runtime.logging import log_line

NUM_VIEWS = 8
SUBSETS = ("all", "A", "B")
ON_CORRUPT = ("error", "skip")


def apply_view(image: torch.Tensor, view: int) -> torch.Tensor:
    """View v of a square image [..., H, W]: rotate by 90 * (v % 4) degrees, then mirror when v >= 4."""
    out = torch.rot90(image, k=view % 4, dims=(-2, -1))
    return torch.flip(out, dims=(-1,)) if view >= 4 else out


def apply_view_np(image: np.ndarray, view: int) -> np.ndarray:
    """`apply_view` for an HxW or HxWxC numpy image (the cache builder works on these)."""
    out = np.rot90(image, k=view % 4, axes=(0, 1))
    return np.ascontiguousarray(out[:, ::-1] if view >= 4 else out)


def in_subset(key: str, subset: str, subset_seed: int) -> bool:
    """Split tiles into two fixed, disjoint halves A and B by a hash of their key."""
    if subset == "all":
        return True
    bit = hashlib.sha1(f"{subset_seed}:{key}".encode()).digest()[0] & 1
    return (bit == 0) == (subset == "A")


def capped_keys(urls: list[str], digests: tuple[str | None, ...], *, subset: str, subset_seed: int,
                max_per_class: int, on_corrupt: str = "error") -> frozenset[str]:
    """The keys of at most `max_per_class` tiles per class of the split's subset: per class, the first in an
    order drawn by `subset_seed` (a hash of seed and key), so the same seed keeps the same tiles whatever the
    shard order, and a smaller cap keeps a subset of a larger one's. Reads only the shards' labels, once per
    process (the training loader is rebuilt every epoch; the shards do not change under a run)."""
    return _capped_keys(tuple(urls), tuple(digests), subset, subset_seed, max_per_class, on_corrupt)


@functools.lru_cache(maxsize=8)
def _capped_keys(urls: tuple[str, ...], digests: tuple[str | None, ...], subset: str, subset_seed: int,
                 max_per_class: int, on_corrupt: str) -> frozenset[str]:
    by_class: dict[str, list[str]] = {}
    for url, digest in zip(urls, digests or (None,) * len(urls)):
        for raw in _shard_samples(url, lambda name: name.endswith(".cls"), digest, on_corrupt):
            if "cls" in raw and in_subset(raw["__key__"], subset, subset_seed):
                by_class.setdefault(raw["cls"].decode().strip(), []).append(raw["__key__"])

    def order(key: str) -> bytes:
        return hashlib.sha1(f"cap:{subset_seed}:{key}".encode()).digest()

    return frozenset(key for keys in by_class.values() for key in sorted(keys, key=order)[:max_per_class])


def _kept(key: str, spec: "StreamSpec") -> bool:
    return in_subset(key, spec.subset, spec.subset_seed) and (spec.keys is None or key in spec.keys)


class DecodedTiles:
    """Decoded, resized tiles kept in memory, by a digest of their bytes, up to a budget of pixel bytes.

    A training stream reads a small data set many times (the demo's 2,800 real tiles about 14 times in 2,500
    steps; an expert's 1,400 tiles 16 times), and decoding a 150 px PNG and resizing it costs far more than
    hashing its bytes: this is what the reference's decode-everything-first loader gets, without giving up
    streaming. Keyed by content, so rewritten or damaged bytes are never served from it. Only training
    streams in the main process fill it (`StreamSpec.keep_decoded`, `data.workers: 0`, the CPU recipes):
    DataLoader workers are started again every epoch, so a cache of theirs would never be read again. Each
    process (each DDP rank) keeps its own, up to the budget. When the budget is reached, the tiles already
    kept stay (a loop over a data set larger than the cache would miss every time under LRU).
    """

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self.used_bytes = 0
        self.hits = self.misses = 0
        self._tiles: dict[tuple, np.ndarray] = {}

    def get(self, key: tuple) -> np.ndarray | None:
        tile = self._tiles.get(key)
        if tile is None:
            self.misses += 1
        else:
            self.hits += 1
        return tile

    def put(self, key: tuple, tile: np.ndarray) -> None:
        if self.used_bytes + tile.nbytes <= self.budget_bytes:
            self._tiles[key] = tile  # read only by decode_image, which copies it into a new tensor
            self.used_bytes += tile.nbytes

    def clear(self) -> None:
        self._tiles.clear()
        self.used_bytes = self.hits = self.misses = 0


DECODED_TILES = DecodedTiles(budget_bytes=1 << 30)  # 1 GiB: 350,000 tiles at 32 px RGB, 87,000 at 64 px


def decode_image(png: bytes, channels: int, image_size: int, keep: bool = False) -> torch.Tensor:
    """Image bytes -> float tensor [C, S, S] in [-1, 1].

    A non-square image is centre-cropped to a square first (the views are only defined for
    squares, and a resize alone would distort the tissue); then it is resized (Lanczos) when its
    size differs from `image_size`. In the main process a tile already in `DECODED_TILES` is not decoded
    again (evaluation reads the training tiles a run has just trained on); with `keep`, a new one is kept.
    """
    if get_worker_info() is not None:
        return _to_tensor(_decode_pixels(png, channels, image_size), channels)
    key = (hashlib.blake2b(png, digest_size=16).digest(), channels, image_size)
    pixels = DECODED_TILES.get(key)
    if pixels is None:
        pixels = _decode_pixels(png, channels, image_size)
        if keep:
            DECODED_TILES.put(key, pixels)
    return _to_tensor(pixels, channels)


def _to_tensor(pixels: np.ndarray, channels: int) -> torch.Tensor:
    # A copy (copy=True, whatever the dtype): the pixels may be the kept ones, which must never change.
    tensor = torch.from_numpy(pixels).to(torch.float32, copy=True).div_(127.5).sub_(1.0)
    return tensor.unsqueeze(0) if channels == 1 else tensor.permute(2, 0, 1).contiguous()


def _decode_pixels(png: bytes, channels: int, image_size: int) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as img:
        img = img.convert("L" if channels == 1 else "RGB")
        width, height = img.size
        if width != height:
            side = min(width, height)
            left, top = (width - side) // 2, (height - side) // 2
            img = img.crop((left, top, left + side, top + side))
        if img.size != (image_size, image_size):
            img = img.resize((image_size, image_size), Image.Resampling.LANCZOS)
        return np.array(img, dtype=np.uint8)


def decode_npy(data: bytes) -> np.ndarray:
    # allow_pickle=False: a feature shard from elsewhere must never run code when loaded.
    return np.load(io.BytesIO(data), allow_pickle=False)


@dataclass
class StreamSpec:
    """What to read and how: shared by the train and eval streams."""

    urls: list[str]
    image_size: int
    channels: int
    batch_size: int
    features: tuple[str, ...] = ()  # extensions of cached arrays, e.g. ("pooled.npy",)
    subset: str = "all"
    subset_seed: int = 0
    rank: int = 0
    world_size: int = 1
    counts: tuple[int, ...] = ()  # samples per shard (from the manifest); the eval stream needs them
    digests: tuple[str | None, ...] = ()  # sha256 per shard (from the manifest); checked before first use
    on_corrupt: str = "error"  # "error" | "skip": what a damaged shard or record does
    keys: frozenset[str] | None = None  # when set, only these keys are read (data.max_per_class)
    keep_decoded: bool = False  # keep decoded tiles in DECODED_TILES (a training stream reads them every epoch)


class DamagedRecord(Exception):
    """A record that does not decode, or decodes to non-finite values (message: what is wrong)."""


DECODE_ERRORS = (OSError, ValueError, SyntaxError)  # what PIL and int() raise on damaged bytes


def damaged(where: str, reason: str, on_corrupt: str) -> None:
    """The damaged-record policy, for every reader of shards: "error" raises one line naming the record,
    "skip" names it on stderr (the caller leaves it out)."""
    if on_corrupt == "error":
        raise FadscaleError(f"{where}: damaged record ({reason}); write the shard again, or set "
                            "data.on_corrupt=skip to leave damaged records out")
    log_line(f"warning: {where}: damaged record skipped ({reason})")


_CHECKED: dict[str, str] = {}  # shard path -> the sha256 it had when this process checked it


def check_shard(url: str, expected: str | None, on_corrupt: str) -> None:
    """Compare a shard's sha256 with its manifest's, once per process and shard. A mismatch is an error
    under on_corrupt "error"; under "skip" a warning (its damaged records are then skipped as they are read)."""
    if not expected or _CHECKED.get(url) == expected:
        return
    try:
        actual = sha256_file(url)
    except OSError as exc:
        raise FadscaleError(f"{url}: cannot read the shard ({exc.strerror or exc})") from None
    _CHECKED[url] = expected  # checked: warned about or fine; not hashed again in this process
    if actual == expected:
        return
    if on_corrupt == "error":
        raise FadscaleError(f"{url}: damaged: its sha256 differs from the one in {Path(url).parent / 'manifest.json'}; "
                            "write it again (shard-data --overwrite; a feature cache: delete it and it is rebuilt), "
                            "or set data.on_corrupt=skip to leave its damaged records out")
    log_line(f"warning: {url}: damaged (sha256 differs from the manifest): its records are checked one by one "
             "and damaged ones skipped (data.on_corrupt=skip)")


def _to_sample(raw: dict, spec: StreamSpec, view: int) -> dict | None:
    """The decoded sample, or None when it is damaged and spec.on_corrupt is "skip"."""
    where = f"{raw.get('__url__', '?')}: sample {raw['__key__']}"
    try:
        return _decode(raw, spec, view, where)
    except DamagedRecord as exc:
        damaged(where, str(exc), spec.on_corrupt)
        return None


def _decode(raw: dict, spec: StreamSpec, view: int, where: str) -> dict:
    if "png" not in raw or "cls" not in raw:
        raise FadscaleError(f"{where} has no .png or no .cls member (not a fadscale shard?)")
    try:
        image = decode_image(raw["png"], spec.channels, spec.image_size, keep=spec.keep_decoded)
        label = int(raw["cls"])
    except DECODE_ERRORS as exc:
        raise DamagedRecord(f"{type(exc).__name__}: {' '.join(str(exc).split())[:120]}") from None
    sample = {
        "image": apply_view(image, view) if view else image,
        "label": label,
        "view": view,
        "key": raw["__key__"],
    }
    for ext in spec.features:
        if ext not in raw:
            raise FadscaleError(f"{where} has no {ext!r} (is this a feature cache built with that array?)")
        try:
            array = decode_npy(raw[ext])
        except (OSError, ValueError, EOFError) as exc:
            raise DamagedRecord(f"{ext}: {type(exc).__name__}: {' '.join(str(exc).split())[:120]}") from None
        if array.ndim < 1 or array.shape[0] != NUM_VIEWS:
            raise FadscaleError(f"{where}: {ext} has shape {array.shape}; expected one row per view "
                                f"({NUM_VIEWS}, ...)")
        if not np.isfinite(array).all():  # every view's row: damage anywhere means a damaged record
            raise DamagedRecord(f"{ext} holds non-finite values")
        sample[ext.split(".")[0]] = torch.from_numpy(array[view].astype(np.float32))
    return sample


def _collate(samples: list[dict | None], where: str = "") -> dict:
    """A batch of the decoded samples; None (skipped, damaged) ones are counted in `skipped`."""
    kept = [s for s in samples if s is not None]
    if not kept:
        raise FadscaleError(f"{where}: every record of a batch is damaged; write the data again")
    batch = _stack(kept)
    batch["skipped"] = len(samples) - len(kept)
    return batch


def _stack(samples: list[dict]) -> dict:
    batch = {"key": [s["key"] for s in samples]}
    batch["label"] = torch.tensor([s["label"] for s in samples], dtype=torch.long)
    batch["view"] = torch.tensor([s["view"] for s in samples], dtype=torch.long)
    for name in samples[0]:
        if name not in batch:
            batch[name] = torch.stack([s[name] for s in samples])
    return batch


def _member_filter(features: tuple[str, ...]) -> Callable[[str], bool]:
    """Read only the members a batch needs (the .json record and unrequested arrays are skipped)."""
    wanted = {"png", "cls", *features}

    def select(name: str) -> bool:
        ext = base_plus_ext(name)[1]
        return ext is not None and ext.lower() in wanted

    return select


_BLOCK = 512
_REGULAR = (b"0", b"\0", b"7")


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 (sizes of 8 GiB and more)
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _pax_records(data: bytes) -> dict[str, str]:
    records, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] != b"\0":
        length = int(data[pos:data.index(b" ", pos)])
        key, _, value = data[data.index(b" ", pos) + 1:pos + length - 1].partition(b"=")
        records[key.decode("utf-8")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def _tar_members(stream, url: str, select: Callable[[str], bool]) -> Iterator[dict]:
    """Regular members of a tar stream as WebDataset's {"fname", "data", "__url__"} dicts.

    The same job as webdataset's tar_file_iterator, about 10x faster: Python's tarfile parses each
    header field by field, which cost as much as decoding the PNG; here a header is a few slices.
    Every worker reads the whole stream of its rank, so this matters. Handles ustar, GNU long
    names and PAX headers (what tarfile writes); checks each header's checksum. Members that
    `select` refuses are skipped (seeked over when the stream can seek) without being read.
    """
    seekable = stream.seekable() if hasattr(stream, "seekable") else False
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        header = stream.read(_BLOCK)
        if not header or header == bytes(_BLOCK):
            return  # end of archive (tar ends with zero blocks; a missing end marker is tolerated)
        if len(header) < _BLOCK:
            raise FadscaleError(f"{url}: truncated tar shard (a header is cut short)")
        checksum = sum(header) - sum(header[148:156]) + 8 * 32  # the checksum field counts as 8 spaces
        try:
            stored = _octal(header[148:156])
        except ValueError:
            stored = -1
        if checksum != stored and checksum - 256 * sum(b >= 128 for b in header[:148] + header[156:]) != stored:
            raise FadscaleError(f"{url}: corrupt tar shard (bad header checksum)")
        kind = header[156:157]
        size = int(pax["size"]) if "size" in pax else _octal(header[124:136])
        padded = (size + _BLOCK - 1) // _BLOCK * _BLOCK
        if kind in (b"L", b"x", b"g"):  # metadata about the next member (or, for g, all of them)
            data = stream.read(padded)
            if len(data) < padded:
                raise FadscaleError(f"{url}: truncated tar shard")
            if kind == b"L":
                long_name = data[:size].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            elif kind == b"x":
                pax = _pax_records(data[:size])
            continue
        name = pax.get("path") or long_name
        if name is None:
            name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            prefix = header[345:500].split(b"\0", 1)[0]
            if prefix and header[257:262] == b"ustar":
                name = prefix.decode("utf-8", "surrogateescape") + "/" + name
        long_name, pax = None, {}
        if kind in _REGULAR and select(name):
            data = stream.read(padded)
            if len(data) < size:
                raise FadscaleError(f"{url}: truncated tar shard (member {name} is cut short)")
            yield {"fname": name, "data": data[:size], "__url__": url}
        elif seekable:
            stream.seek(padded, 1)
        else:
            while padded > 0:
                chunk = stream.read(min(padded, 1 << 20))
                if not chunk:
                    raise FadscaleError(f"{url}: truncated tar shard")
                padded -= len(chunk)


def _shard_samples(url: str, select: Callable[[str], bool], digest: str | None, on_corrupt: str) -> Iterator[dict]:
    """The samples of one shard, its checksum checked first: tar members grouped by key with WebDataset's
    group_by_keys. The file is closed when the generator ends or is closed (WebDataset's url_opener leaves
    that to the GC)."""
    check_shard(url, digest, on_corrupt)
    with contextlib.closing(wds.gopen(url)) as stream:
        yield from group_by_keys(_tar_members(stream, url, select))


def _resampled(spec: StreamSpec, rng: random.Random) -> Iterator[dict]:
    """Endless stream of samples from shards drawn with replacement, filtered to the subset."""
    select = _member_filter(spec.features)
    digests = dict(zip(spec.urls, spec.digests))
    empty: set[str] = set()
    while True:
        url = rng.choice(spec.urls)
        kept = 0
        shard = _shard_samples(url, select, digests.get(url), spec.on_corrupt)
        try:
            for sample in shard:
                if _kept(sample["__key__"], spec):
                    kept += 1
                    yield sample
        finally:
            shard.close()
        if kept == 0:
            empty.add(url)
            if len(empty) == len(set(spec.urls)):
                raise FadscaleError(f"{Path(url).parent}: no sample of the split is in subset {spec.subset!r} "
                                    f"(subset_seed {spec.subset_seed})")


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def stream_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of a rank's raw stream in an epoch (a hash: any ints, negative ones included)."""
    return int.from_bytes(hashlib.sha256(f"fadscale-train:{seed}:{epoch}:{rank}".encode()).digest()[:8], "big")


class TrainStream(IterableDataset):
    """Resampled, shuffled, augmented stream of exactly `batches` batches per epoch for this rank."""

    def __init__(self, spec: StreamSpec, *, seed: int, epoch: int, batches: int, shuffle_buffer: int,
                 views: bool, start_batch: int = 0):
        super().__init__()
        self.spec, self.seed, self.epoch = spec, seed, epoch
        self.batches, self.shuffle_buffer, self.views = batches, shuffle_buffer, views
        self.start_batch = start_batch

    def __iter__(self) -> Iterator[dict]:
        worker, workers = _worker()
        spec = self.spec
        rng = random.Random(stream_seed(self.seed, self.epoch, spec.rank))
        raw = _resampled(spec, rng)
        shuffled = wds.filters._shuffle(raw, bufsize=self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)
        try:
            for index in range(self.batches):
                picked = [next(shuffled) for _ in range(spec.batch_size)]
                # Every worker draws every batch's views, so the random stream is the same in all of them.
                views = [rng.randrange(NUM_VIEWS) if self.views else 0 for _ in picked]
                # The DataLoader takes batch start_batch + j from worker j % workers.
                if index < self.start_batch or (index - self.start_batch) % workers != worker:
                    continue
                yield _collate([_to_sample(s, spec, v) for s, v in zip(picked, views)],
                               str(Path(spec.urls[0]).parent))
        finally:
            shuffled.close()
            raw.close()


class EvalStream(IterableDataset):
    """Every sample exactly once across ranks and workers: the samples, numbered in shard order, are cut
    into world_size * workers contiguous ranges; (rank, worker) reads range rank * workers + worker."""

    def __init__(self, spec: StreamSpec):
        super().__init__()
        self.spec = spec

    def __iter__(self) -> Iterator[dict]:
        worker, workers = _worker()
        spec = self.spec
        slot, slots = spec.rank * workers + worker, spec.world_size * workers
        total = sum(spec.counts)
        start, end = slot * total // slots, (slot + 1) * total // slots
        select = _member_filter(spec.features)
        chunk: list[dict] = []
        offset = 0
        for url, count, digest in zip(spec.urls, spec.counts, spec.digests or (None,) * len(spec.urls)):
            first, offset = offset, offset + count
            if offset <= start or first >= end:
                continue
            index = first
            shard = _shard_samples(url, select, digest, spec.on_corrupt)
            try:
                for raw in shard:
                    if index >= end:
                        break
                    if index >= start and _kept(raw["__key__"], spec):
                        chunk.append(_to_sample(raw, spec, 0))
                        if len(chunk) == spec.batch_size:
                            if any(sample is not None for sample in chunk):
                                yield _collate(chunk)
                            chunk = []
                    index += 1
                else:
                    if index != offset:  # the ranges rely on the manifest's counts
                        raise FadscaleError(f"{url}: {index - first} samples, but the manifest says {count}")
            finally:
                shard.close()
        if any(sample is not None for sample in chunk):
            yield _collate(chunk)


def batches_per_epoch(samples_per_epoch: int, batch_size: int, world_size: int) -> int:
    """The same number of batches on every rank: samples split evenly, at least one batch."""
    return max(1, samples_per_epoch // (batch_size * world_size))


class _Loader(DataLoader):
    """A DataLoader whose worker-side FadscaleError arrives as the original one-line message (the
    DataLoader re-raises it with the worker's whole traceback in the message), and whose workers are
    stopped at once on an error (left to the garbage collector, they took 5 s each to go)."""

    def __iter__(self) -> Iterator[dict]:
        batches = super().__iter__()
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except BaseException as exc:
                stop = getattr(batches, "_shutdown_workers", None)
                if stop is not None:
                    stop()
                lines = [line for line in str(exc).splitlines() if line.strip()]
                if isinstance(exc, FadscaleError) and len(lines) > 1 and "FadscaleError: " in lines[-1]:
                    raise FadscaleError(lines[-1].split("FadscaleError: ", 1)[1]) from None
                raise
            yield batch


def _loader(dataset: IterableDataset, workers: int) -> DataLoader:
    return _Loader(dataset, batch_size=None, num_workers=workers, persistent_workers=False,
                   prefetch_factor=4 if workers else None)


def _check(*, batch_size: int, image_size: int, channels: int, rank: int, world_size: int, workers: int,
           subset: str, on_corrupt: str) -> None:
    if batch_size < 1 or image_size < 1:
        raise FadscaleError(f"batch_size and image_size must be positive, got {batch_size} and {image_size}")
    if channels not in (1, 3):
        raise FadscaleError(f"channels must be 1 or 3, got {channels}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise FadscaleError(f"rank {rank} is not in [0, world_size={world_size})")
    if workers < 0:
        raise FadscaleError(f"workers must be >= 0, got {workers}")
    if subset not in SUBSETS:
        raise FadscaleError(f"subset must be one of {', '.join(SUBSETS)}, got {subset!r}")
    if on_corrupt not in ON_CORRUPT:
        raise FadscaleError(f"on_corrupt must be one of {', '.join(ON_CORRUPT)}, got {on_corrupt!r}")


def _split_shards(shard_dir, split: str) -> tuple[list[str], tuple[int, ...], tuple[str | None, ...]]:
    """(urls, samples per shard, sha256 per shard) of a split; a FadscaleError when it has no samples."""
    urls = shard_urls(shard_dir, split)
    shards = load_manifest(shard_dir)["splits"][split]["shards"]
    try:
        counts = tuple(int(shard["samples"]) for shard in shards)
    except (KeyError, TypeError, ValueError):
        raise FadscaleError(f"{shard_dir}: the manifest lists a {split} shard without its sample count") from None
    digests = tuple(shard.get("sha256") if isinstance(shard.get("sha256"), str) else None for shard in shards)
    if not urls or sum(counts) == 0:
        hint = {"val": " (shard with --val-fraction > 0)", "test": " (shard with --test-fraction > 0)"}.get(split, "")
        raise FadscaleError(f"{shard_dir}: the {split} split has no samples{hint}")
    return urls, counts, digests


def train_loader(shard_dir, *, batch_size: int, image_size: int, channels: int, seed: int, epoch: int = 0,
                 rank: int = 0, world_size: int = 1, workers: int = 0, shuffle_buffer: int = 512,
                 samples_per_epoch: int | None = None, views: bool = True, subset: str = "all",
                 subset_seed: int = 0, features: tuple[str, ...] = (), split: str = "train",
                 start_batch: int = 0, on_corrupt: str = "error", max_per_class: int | None = None) -> DataLoader:
    """A DataLoader over one epoch of the training stream (build a new one per epoch).

    It yields batches_per_epoch(samples_per_epoch, batch_size, world_size) - start_batch batches, the
    same number on every rank; batch b depends only on (seed, epoch, rank, b), not on `workers`.
    `max_per_class` keeps at most that many tiles per class of the subset (`capped_keys`).
    """
    _check(batch_size=batch_size, image_size=image_size, channels=channels, rank=rank, world_size=world_size,
           workers=workers, subset=subset, on_corrupt=on_corrupt)
    if start_batch < 0 or shuffle_buffer < 1:
        raise FadscaleError(f"start_batch must be >= 0 and shuffle_buffer >= 1, got {start_batch} and {shuffle_buffer}")
    urls, counts, digests = _split_shards(shard_dir, split)
    keys = None
    if max_per_class is not None:
        keys = capped_keys(urls, digests, subset=subset, subset_seed=subset_seed, max_per_class=max_per_class,
                           on_corrupt=on_corrupt)
    if samples_per_epoch is None:
        samples_per_epoch = len(keys) if keys is not None else split_count(shard_dir, split, subset)
    spec = StreamSpec(urls, image_size, channels, batch_size, tuple(features), subset, subset_seed, rank,
                      world_size, counts, digests, on_corrupt, keys, keep_decoded=True)
    batches = batches_per_epoch(samples_per_epoch, batch_size, world_size)
    stream = TrainStream(spec, seed=seed, epoch=epoch, batches=batches, shuffle_buffer=shuffle_buffer,
                         views=views, start_batch=start_batch)
    # Never more workers than batches left to produce (an idle worker would still read the stream).
    return _loader(stream, max(0, min(workers, batches - start_batch)))


def loader_from_config(cfg, source, *, epoch: int, rank: int, world_size: int, features: tuple[str, ...] = (),
                       start_batch: int = 0, samples_per_epoch: int | None = None, seed: int | None = None) -> DataLoader:
    """`train_loader` over `source` (shards or a feature cache) with a config's `data` and `run.seed`."""
    data = cfg.data
    return train_loader(source, batch_size=data.batch_size, image_size=data.image_size, channels=data.channels,
                        seed=cfg.run.seed if seed is None else seed, epoch=epoch, rank=rank, world_size=world_size,
                        workers=data.workers, shuffle_buffer=data.shuffle_buffer,
                        samples_per_epoch=samples_per_epoch or data.samples_per_epoch, views=data.views,
                        subset=data.subset, subset_seed=data.subset_seed, features=features, start_batch=start_batch,
                        on_corrupt=data.on_corrupt, max_per_class=data.max_per_class)


def eval_loader(shard_dir, *, split: str = "val", batch_size: int, image_size: int, channels: int,
                rank: int = 0, world_size: int = 1, workers: int = 0, subset: str = "all",
                subset_seed: int = 0, features: tuple[str, ...] = (), on_corrupt: str = "error") -> DataLoader:
    """A DataLoader over every sample of `split` exactly once across ranks and workers (view 0, in
    shard order within each rank's range; the last batch of a worker may be short)."""
    _check(batch_size=batch_size, image_size=image_size, channels=channels, rank=rank, world_size=world_size,
           workers=workers, subset=subset, on_corrupt=on_corrupt)
    urls, counts, digests = _split_shards(shard_dir, split)
    spec = StreamSpec(urls, image_size, channels, batch_size, tuple(features), subset, subset_seed, rank,
                      world_size, counts, digests, on_corrupt)
    return _loader(EvalStream(spec), workers)


def split_count(shard_dir, split: str, subset: str = "all", max_per_class: int | None = None) -> int:
    """Samples in a split (an estimate of half for an A/B subset; at most `max_per_class` per class)."""
    manifest = load_manifest(shard_dir)["splits"][split]
    if max_per_class is not None and manifest.get("per_class"):
        share = 1 if subset == "all" else 2
        return sum(min(max_per_class, math.ceil(n / share)) for n in manifest["per_class"].values())
    count = manifest["count"]
    return count if subset == "all" else math.ceil(count / 2)
