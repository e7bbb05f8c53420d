"""The streaming loader: determinism, views, ranks, workers, resume, eval coverage, subsets, features."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from webdataset.tariterators import tar_file_iterator

from fadscale.data.loader import (
    NUM_VIEWS,
    apply_view,
    apply_view_np,
    batches_per_epoch,
    capped_keys,
    decode_image,
    eval_loader,
    in_subset,
    _tar_members,
    train_loader,
)
from fadscale.data.shard import load_manifest, shard_dataset, shard_urls
from fadscale.errors import FadscaleError
from fadscale.runtime.io import atomic_write_json, sha256_file

from .conftest import run_module

# tiny_shards: 8 classes x 24 grayscale 32x32 tiles; 144 train samples in 2 shards, 48 val in 1.
TRAIN = dict(batch_size=8, image_size=32, channels=1, seed=0)


def raw_samples(shard_dir: Path, split: str) -> dict[str, dict]:
    """key -> raw sample (bytes per extension), read straight from the tar shards."""
    urls = [{"url": url} for url in shard_urls(shard_dir, split)]
    return {s["__key__"]: s for s in wds.tarfile_to_samples()(iter(urls))}


def epoch(shard_dir, **kwargs) -> list[dict]:
    return list(train_loader(shard_dir, **{**TRAIN, **kwargs}))


def fingerprint(batches: list[dict]) -> list[tuple]:
    return [(tuple(b["key"]), tuple(b["view"].tolist()), tuple(b["label"].tolist())) for b in batches]


def same_batches(a: list[dict], b: list[dict]) -> bool:
    return fingerprint(a) == fingerprint(b) and all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b))


def eval_keys(shard_dir, world_size: int, workers: int = 0, **kwargs) -> list[str]:
    return [key for rank in range(world_size)
            for batch in eval_loader(shard_dir, batch_size=5, image_size=32, channels=1, rank=rank,
                                     world_size=world_size, workers=workers, **kwargs)
            for key in batch["key"]]


@pytest.fixture(scope="module")
def train_raw(tiny_shards) -> dict[str, dict]:
    return raw_samples(tiny_shards, "train")


@pytest.fixture(scope="module")
def reference_epoch(tiny_shards) -> list[dict]:
    return epoch(tiny_shards)


# ------------------------------------------------------------------------------------------ views


def test_views_are_the_dihedral_group():
    image = torch.arange(25.0).view(1, 5, 5)  # no symmetry at all
    views = [apply_view(image, v) for v in range(NUM_VIEWS)]
    flat = {tuple(v.flatten().tolist()) for v in views}
    assert len(flat) == NUM_VIEWS
    assert torch.equal(views[0], image)
    # Closed under composition, and every view has an inverse: a group of 8 elements.
    for a in range(NUM_VIEWS):
        for b in range(NUM_VIEWS):
            assert tuple(apply_view(views[a], b).flatten().tolist()) in flat
        assert any(torch.equal(apply_view(views[a], b), image) for b in range(NUM_VIEWS))
    # v % 4 quarter turns, then a mirror for v >= 4; rotations compose additively.
    assert torch.equal(apply_view(apply_view(image, 1), 1), views[2])
    assert torch.equal(views[4], torch.flip(image, dims=(-1,)))
    # The numpy twin (HxW and HxWxC) agrees with the torch version.
    rgb = torch.arange(75.0).view(3, 5, 5)
    for v in range(NUM_VIEWS):
        assert np.array_equal(apply_view_np(image[0].numpy(), v), apply_view(image, v)[0].numpy())
        assert np.array_equal(apply_view_np(rgb.permute(1, 2, 0).numpy(), v),
                              apply_view(rgb, v).permute(1, 2, 0).numpy())


def test_returned_view_matches_the_stored_tile(reference_epoch, train_raw):
    views = Counter(v for b in reference_epoch for v in b["view"].tolist())
    assert set(views) == set(range(NUM_VIEWS))
    checked = 0
    for batch in reference_epoch[:6]:
        for key, image, view, label in zip(batch["key"], batch["image"], batch["view"], batch["label"]):
            raw = train_raw[key]
            plain = decode_image(raw["png"], 1, 32)
            assert torch.equal(apply_view(plain, int(view)), image)
            assert int(label) == int(raw["cls"]) == int(key[:2])
            checked += 1
    assert checked == 48


def test_views_off_gives_view_zero(tiny_shards, train_raw):
    batch = next(iter(train_loader(tiny_shards, **TRAIN, views=False)))
    assert batch["view"].tolist() == [0] * 8
    assert torch.equal(batch["image"][0], decode_image(train_raw[batch["key"][0]]["png"], 1, 32))


# ------------------------------------------------------------------------------------ tensors


@pytest.mark.parametrize("channels,size", [(1, 32), (3, 32), (1, 16), (3, 16)])
def test_shapes_and_range(tiny_shards, channels, size):
    batch = next(iter(train_loader(tiny_shards, batch_size=8, image_size=size, channels=channels, seed=0)))
    image = batch["image"]
    assert image.shape == (8, channels, size, size) and image.dtype == torch.float32
    assert image.min() >= -1.0 and image.max() <= 1.0
    assert image.max() - image.min() > 0.5  # real content, not a constant
    assert batch["label"].dtype == torch.long and batch["view"].dtype == torch.long
    assert len(batch["key"]) == 8
    if channels == 3:  # grayscale shards read as RGB: three equal planes
        assert torch.equal(image[:, 0], image[:, 1]) and torch.equal(image[:, 1], image[:, 2])


def test_decoded_tile_cache_gives_the_batches_of_decoding_every_tile(tiny_shards, monkeypatch):
    from fadscale.data import loader

    kept = loader.DecodedTiles(budget_bytes=1 << 20)
    monkeypatch.setattr(loader, "DECODED_TILES", kept)
    cached = [epoch(tiny_shards, epoch=e) for e in range(3)]
    assert kept.hits > kept.misses > 0  # later epochs are served from memory
    assert kept.used_bytes == kept.misses * 32 * 32  # one uint8 plane per distinct tile
    used = kept.used_bytes
    list(eval_loader(tiny_shards, batch_size=8, image_size=32, channels=1))  # read once: nothing to keep
    assert kept.used_bytes == used
    monkeypatch.setattr(loader, "DECODED_TILES", loader.DecodedTiles(budget_bytes=0))
    decoded = [epoch(tiny_shards, epoch=e) for e in range(3)]
    assert loader.DECODED_TILES.used_bytes == 0
    assert all(same_batches(a, b) for a, b in zip(cached, decoded))


def test_decoded_tile_cache_keys_budget_and_copies(train_raw, monkeypatch):
    from fadscale.data import loader

    pngs = [raw["png"] for raw in list(train_raw.values())[:3]]
    fresh = {(i, c, n): decode_image(png, c, n) for i, png in enumerate(pngs) for c, n in ((1, 32), (1, 16), (3, 32))}
    kept = loader.DecodedTiles(budget_bytes=2 * 32 * 32 + 16 * 16 + 3 * 32 * 32)
    monkeypatch.setattr(loader, "DECODED_TILES", kept)
    assert torch.equal(decode_image(pngs[0], 1, 32), fresh[0, 1, 32])
    assert kept.used_bytes == 0 and kept.misses == 1  # keep=False looks, and keeps nothing
    first = [decode_image(png, 1, 32, keep=True) for png in pngs[:2]]
    assert kept.used_bytes == 2 * 32 * 32 and kept.misses == 3
    # Another size or channel count is another tile, kept beside the first.
    assert torch.equal(decode_image(pngs[0], 1, 16, keep=True), fresh[0, 1, 16])
    assert torch.equal(decode_image(pngs[0], 3, 32, keep=True), fresh[0, 3, 32])
    assert kept.misses == 5 and kept.used_bytes == kept.budget_bytes
    first[0].fill_(0.5)  # a caller writing into its tensor does not change the kept tile
    again = [decode_image(pngs[0], c, n) for c, n in ((1, 32), (1, 16), (3, 32))]  # keep=False reads them too
    assert kept.hits == 3 and kept.misses == 5
    assert all(torch.equal(a, fresh[0, c, n]) for a, (c, n) in zip(again, ((1, 32), (1, 16), (3, 32))))
    # The budget is spent: a new tile is decoded, not kept, every time.
    for _ in range(2):
        assert torch.equal(decode_image(pngs[2], 1, 32, keep=True), fresh[2, 1, 32])
    assert kept.misses == 7 and kept.used_bytes == kept.budget_bytes


def test_decode_exact_values_and_centre_crop():
    values = np.array([[0, 255], [255, 0]], dtype=np.uint8).repeat(4, 0).repeat(4, 1)  # 8x8
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, format="PNG")
    tensor = decode_image(buffer.getvalue(), 1, 8)
    assert set(tensor.unique().tolist()) == {-1.0, 1.0}
    # A 12x8 (w x h) image: the middle 8x8 is kept, the 2-pixel bands on each side are dropped.
    wide = np.full((8, 12), 255, dtype=np.uint8)
    wide[:, 2:10] = 0
    buffer = io.BytesIO()
    Image.fromarray(wide).save(buffer, format="PNG")
    tensor = decode_image(buffer.getvalue(), 1, 8)
    assert tensor.shape == (1, 8, 8) and torch.all(tensor == -1.0)


# ------------------------------------------------------------------------------- determinism


def test_same_arguments_same_batches(tiny_shards, reference_epoch):
    assert len(reference_epoch) == 144 // 8
    assert same_batches(epoch(tiny_shards), reference_epoch)
    for other in (epoch(tiny_shards, epoch=1), epoch(tiny_shards, seed=1)):
        assert len(other) == len(reference_epoch)
        assert fingerprint(other) != fingerprint(reference_epoch)


def test_workers_do_not_change_the_batches(tiny_shards, reference_epoch):
    two = epoch(tiny_shards, workers=2)
    assert same_batches(two, reference_epoch)  # batch for batch, not only the same set of keys
    assert same_batches(epoch(tiny_shards, workers=2), two)
    assert same_batches(epoch(tiny_shards, workers=1), reference_epoch)


@pytest.mark.parametrize("workers", [0, 2])
def test_start_batch_resumes_exactly(tiny_shards, reference_epoch, workers):
    for start in (1, 5, 17):
        resumed = epoch(tiny_shards, workers=workers, start_batch=start)
        assert same_batches(resumed, reference_epoch[start:]), start
    assert epoch(tiny_shards, workers=workers, start_batch=len(reference_epoch)) == []


# ------------------------------------------------------------------------------------- ranks


def test_batches_per_epoch_arithmetic():
    assert batches_per_epoch(144, 8, 1) == 18
    assert batches_per_epoch(144, 8, 2) == 9
    assert batches_per_epoch(150, 8, 2) == 9  # the remainder is dropped on every rank alike
    assert batches_per_epoch(10, 8, 4) == 1  # never zero
    assert batches_per_epoch(1000, 64, 3) == 5


@pytest.mark.parametrize("samples,subset", [(None, "all"), (150, "all"), (None, "A"), (7, "all")])
def test_every_rank_gets_the_same_number_of_batches(tiny_shards, samples, subset):
    counts, streams = [], []
    for rank in range(2):
        batches = epoch(tiny_shards, rank=rank, world_size=2, samples_per_epoch=samples, subset=subset)
        counts.append(len(batches))
        streams.append(fingerprint(batches))
        assert all(len(b["key"]) == 8 for b in batches)
        assert all(in_subset(k, subset, 0) for b in batches for k in b["key"])
    total = samples if samples is not None else (144 if subset == "all" else 72)
    assert counts == [batches_per_epoch(total, 8, 2)] * 2
    assert streams[0] != streams[1]  # each rank draws its own shards and order


RANK_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch, torch.distributed as dist
    from fadscale.data.loader import train_loader
    from fadscale.runtime.distributed import shutdown

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    loader = train_loader(sys.argv[1], batch_size=8, image_size=32, channels=1, seed=0, rank=rank,
                          world_size=world, workers=1, samples_per_epoch=int(sys.argv[2]))
    batches = 0
    for batch in loader:  # a collective per batch, as DDP does: a short rank would hang here
        total = torch.tensor([batch["image"].shape[0]], dtype=torch.long)
        dist.all_reduce(total)
        batches += 1
    counts = [None] * world
    dist.all_gather_object(counts, batches)
    if rank == 0:
        with open(sys.argv[3], "w") as handle:
            json.dump({"counts": counts, "world": world}, handle)
    shutdown(0)
""")


@pytest.mark.slow
def test_two_real_processes_run_the_same_number_of_batches(tiny_shards, tmp_path):
    (tmp_path / "loader_ranks.py").write_text(RANK_SCRIPT)
    result_path = tmp_path / "counts.json"
    result = run_module("loader_ranks", str(tiny_shards), "100", str(result_path), nproc=2, cwd=tmp_path,
                        timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result_path.read_text()) == {"counts": [6, 6], "world": 2}  # 100 // (8 * 2)


# -------------------------------------------------------------------------------------- eval


@pytest.mark.parametrize("world_size,workers", [(1, 0), (2, 0), (3, 0), (2, 2), (3, 2)])
def test_eval_gives_every_sample_exactly_once(tiny_shards, world_size, workers):
    expected = sorted(raw_samples(tiny_shards, "val"))
    assert len(expected) == 48
    assert sorted(eval_keys(tiny_shards, world_size, workers)) == expected


def test_eval_tensors_are_the_plain_tiles(tiny_shards):
    raw = raw_samples(tiny_shards, "val")
    batches = list(eval_loader(tiny_shards, batch_size=16, image_size=32, channels=1))
    assert [len(b["key"]) for b in batches] == [16, 16, 16]
    for batch in batches:
        assert batch["view"].tolist() == [0] * len(batch["key"])
        for key, image, label in zip(batch["key"], batch["image"], batch["label"]):
            assert torch.equal(image, decode_image(raw[key]["png"], 1, 32))
            assert int(label) == int(raw[key]["cls"])


# ----------------------------------------------------------------------------------- subsets


def test_subsets_are_disjoint_and_cover(tiny_shards, train_raw):
    keys = sorted(train_raw) + sorted(raw_samples(tiny_shards, "val"))
    a = {k for k in keys if in_subset(k, "A", 0)}
    b = {k for k in keys if in_subset(k, "B", 0)}
    assert not a & b and a | b == set(keys)
    assert 0.3 < len(a) / len(keys) < 0.7
    assert {k for k in keys if in_subset(k, "A", 1)} != a  # the seed picks another split
    val_a = eval_keys(tiny_shards, 2, subset="A")
    val_b = eval_keys(tiny_shards, 3, workers=2, subset="B")
    assert set(val_a).isdisjoint(val_b)
    assert sorted(val_a + val_b) == sorted(raw_samples(tiny_shards, "val"))
    trained = {k for batch in epoch(tiny_shards, subset="B") for k in batch["key"]}
    assert trained <= b and len(trained) > 10


def test_max_per_class_keeps_a_seeded_few_tiles_of_each_class_of_the_subset(tiny_shards, train_raw):
    urls = shard_urls(tiny_shards, "train")
    label = {k: int(s["cls"]) for k, s in train_raw.items()}
    capped = capped_keys(urls, (), subset="A", subset_seed=3, max_per_class=2)
    per_class = Counter(label[k] for k in capped)
    assert set(per_class.values()) == {2} and len(per_class) == 8  # 2 of each class, from half A of seed 3
    assert all(in_subset(k, "A", 3) for k in capped)
    assert capped_keys(urls, (), subset="A", subset_seed=3, max_per_class=2) == capped  # the same seed: the same
    assert capped_keys(urls, (), subset="A", subset_seed=4, max_per_class=2) != capped  # another seed: others
    assert capped_keys(urls, (), subset="A", subset_seed=3, max_per_class=1) < capped  # nested caps
    trained = {k for batch in epoch(tiny_shards, subset="A", subset_seed=3, max_per_class=2, samples_per_epoch=64)
               for k in batch["key"]}
    assert trained == capped  # 64 draws from 16 tiles: every one of them, and nothing else
    assert len(epoch(tiny_shards, max_per_class=2)) == batches_per_epoch(16, TRAIN["batch_size"], 1)  # an epoch: 16 tiles


# ---------------------------------------------------------------------------------- features


def _feature_rows(key: str) -> np.ndarray:
    """[8, 4] float16: row v = (v, class, key-dependent, -v), so a test can tell which row it got."""
    tag = int(key[3:7], 16) % 1000
    return np.array([[v, int(key[:2]), tag, -v] for v in range(NUM_VIEWS)], dtype=np.float16)


@pytest.fixture(scope="module")
def feature_shards(tiny_shards, tmp_path_factory) -> Path:
    """The train shards with a `pooled.npy` member per sample, laid out like a feature cache."""
    out = tmp_path_factory.mktemp("features")
    manifest = load_manifest(tiny_shards)
    for shard in manifest["splits"]["train"]["shards"]:
        with open(out / shard["name"], "wb") as stream:
            writer = wds.TarWriter(stream)
            for sample in wds.tarfile_to_samples()([{"url": str(tiny_shards / shard["name"])}]):
                buffer = io.BytesIO()
                np.save(buffer, _feature_rows(sample["__key__"]), allow_pickle=False)
                writer.write({"__key__": sample["__key__"], "png": sample["png"], "cls": sample["cls"],
                              "pooled.npy": buffer.getvalue()})
            writer.close()
        shard["bytes"] = (out / shard["name"]).stat().st_size
        shard["sha256"] = sha256_file(out / shard["name"])
    manifest["splits"]["val"] = {"count": 0, "per_class": {}, "shards": []}
    atomic_write_json(out / "manifest.json", manifest)
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_feature_row_of_the_drawn_view(feature_shards, workers):
    batches = epoch(feature_shards, features=("pooled.npy",), workers=workers)
    assert len(batches) == 18
    for batch in batches:
        assert batch["pooled"].shape == (8, 4) and batch["pooled"].dtype == torch.float32
        for key, view, row in zip(batch["key"], batch["view"], batch["pooled"]):
            assert torch.equal(row, torch.from_numpy(_feature_rows(key)[int(view)].astype(np.float32)))
    # The same epoch without the feature: the same keys and views (reading a cache changes nothing else).
    assert fingerprint(epoch(feature_shards)) == fingerprint(batches)


@pytest.mark.parametrize("workers", [0, 2])
def test_missing_feature_is_a_clear_error(tiny_shards, workers):
    with pytest.raises(FadscaleError, match=r"train-00000\d.tar: sample \w+ has no 'pooled.npy'") as info:
        next(iter(train_loader(tiny_shards, **TRAIN, features=("pooled.npy",), workers=workers)))
    assert "\n" not in str(info.value)  # also when raised in a worker process


# ------------------------------------------------------------------------------------ errors


@pytest.fixture(scope="module")
def no_val_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("noval") / "shards"
    shard_dataset("procedural:per_class=1,size=16,seed=0", out, val_fraction=0.0, grayscale=True, progress=False)
    return out


def test_empty_split_is_an_error(no_val_shards):
    with pytest.raises(FadscaleError, match="val split has no samples"):
        eval_loader(no_val_shards, batch_size=4, image_size=16, channels=1)
    with pytest.raises(FadscaleError, match="val split has no samples"):
        train_loader(no_val_shards, batch_size=4, image_size=16, channels=1, seed=0, split="val")


def test_empty_subset_is_an_error(no_val_shards):
    keys = list(raw_samples(no_val_shards, "train"))
    assert len(keys) == 8
    # A subset seed that puts all 8 keys in B (found by search: about 1 seed in 128).
    seed = next(s for s in range(100_000) if not any(in_subset(k, "A", s) for k in keys))
    with pytest.raises(FadscaleError, match="no sample of the split is in subset 'A'"):
        next(iter(train_loader(no_val_shards, batch_size=4, image_size=16, channels=1, seed=0, subset="A",
                               subset_seed=seed)))


def test_bad_arguments(tiny_shards, tmp_path):
    with pytest.raises(FadscaleError, match="rank 2 is not in"):
        train_loader(tiny_shards, **TRAIN, rank=2, world_size=2)
    with pytest.raises(FadscaleError, match="channels must be 1 or 3"):
        eval_loader(tiny_shards, batch_size=4, image_size=32, channels=2)
    with pytest.raises(FadscaleError, match="subset must be one of"):
        train_loader(tiny_shards, **TRAIN, subset="C")
    with pytest.raises(FadscaleError, match="no split 'holdout'"):
        train_loader(tiny_shards, **TRAIN, split="holdout")
    with pytest.raises(FadscaleError, match=r"the test split has no samples \(shard with --test-fraction > 0\)"):
        train_loader(tiny_shards, **TRAIN, split="test")
    with pytest.raises(FadscaleError, match="not found"):
        train_loader(tmp_path / "nowhere", **TRAIN)
    broken = tmp_path / "broken"
    shutil.copytree(tiny_shards, broken)
    (broken / "train-000001.tar").unlink()
    with pytest.raises(FadscaleError, match="missing"):
        train_loader(broken, **TRAIN)


def _members_ours(path: Path, seekable: bool = True) -> list[tuple[str, bytes]]:
    with open(path, "rb") as handle:
        stream = handle if seekable else io.BufferedReader(_Unseekable(handle))
        return [(m["fname"], m["data"]) for m in _tar_members(stream, str(path), lambda name: True)]


class _Unseekable(io.RawIOBase):
    """A file seen as a pipe (as a remote shard is): members must be skipped by reading."""

    def __init__(self, handle):
        self.handle = handle

    def readable(self):
        return True

    def readinto(self, buffer):
        data = self.handle.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)


def test_tar_reader_agrees_with_webdataset(tiny_shards, tmp_path):
    """The loader's fast tar reader against WebDataset's, on fadscale shards and on PAX / GNU / ustar tars."""
    rng = np.random.default_rng(0)
    pax = tmp_path / "pax.tar"  # TarWriter's default float mtime makes tarfile write a PAX header per member
    with open(pax, "wb") as stream:
        writer = wds.TarWriter(stream)
        for i in range(4):
            writer.write({"__key__": f"k{i}", "png": rng.bytes(700 + i), "pooled.npy": rng.bytes(1030)})
        writer.close()
    tars = [pax, tiny_shards / "train-000000.tar"]
    for fmt, name in ((tarfile.GNU_FORMAT, "gnu.tar"), (tarfile.USTAR_FORMAT, "ustar.tar")):
        tars.append(tmp_path / name)
        with tarfile.open(tars[-1], "w", format=fmt) as tar:
            for i in range(3):
                data = rng.bytes(511 * i)
                info = tarfile.TarInfo("d" * 120 + f"/k{i}.png")  # a long path: GNU long name or ustar prefix
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    for path in tars:
        with open(path, "rb") as handle:
            expected = [(m["fname"], m["data"]) for m in tar_file_iterator(handle)]
        assert expected and _members_ours(path) == expected == _members_ours(path, seekable=False), path


def test_damaged_shards_are_errors(tiny_shards, tmp_path):
    data = (tiny_shards / "train-000000.tar").read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[:5000])
    with pytest.raises(FadscaleError, match="truncated tar shard"):
        _members_ours(cut)
    flipped = bytearray(data)
    flipped[1024 + 10] ^= 0xFF  # inside the second member's header (members: .cls at 0, .json at 1024)
    bad = tmp_path / "bad.tar"
    bad.write_bytes(bytes(flipped))
    with pytest.raises(FadscaleError, match="bad header checksum"):
        _members_ours(bad)


def test_shards_are_what_the_loader_assumes(tiny_shards):
    """The layout the loader relies on: .png/.cls per key, train shards listed with sample counts."""
    manifest = load_manifest(tiny_shards)
    shards = manifest["splits"]["train"]["shards"]
    assert [s["samples"] for s in shards] == [80, 64]
    with tarfile.open(tiny_shards / shards[0]["name"]) as tar:
        names = tar.getnames()[:3]
    assert {Path(n).suffix for n in names} == {".png", ".cls", ".json"}
