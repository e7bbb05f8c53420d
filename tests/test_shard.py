"""Sharding: procedural, real (Kather sample) and hostile inputs -> reproducible WebDataset shards."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fadscale import __version__
from fadscale.data.procedural import CLASS_NAMES, FOLDER_NAMES
from fadscale.data.shard import (
    class_name,
    class_table,
    load_manifest,
    shard_dataset,
    shard_urls,
    split_items,
    summary_line,
    val_count,
)
from fadscale.data.sources import SourceItem
from fadscale.errors import FadscaleError
from fadscale.runtime.io import sha256_file

KATHER = Path(__file__).resolve().parents[1].parent / "shared/data/kather16-sample"
KATHER_COUNTS = {"TUMOR": 17, "STROMA": 13, "COMPLEX": 22, "LYMPHO": 11, "DEBRIS": 14, "MUCOSA": 15,
                 "ADIPOSE": 24, "EMPTY": 11}
PROCEDURAL = "procedural:per_class=6,size=32"
needs_kather = pytest.mark.skipif(not KATHER.is_dir(), reason=f"real tiles not found at {KATHER}")


# ---------------------------------------------------------------------------------------- helpers


def shard(src, out, **kwargs) -> dict:
    return shard_dataset(src, out, progress=False, **kwargs)


def read_samples(out: Path) -> dict[str, dict]:
    """key -> {"split", "cls", "json", "png"}, read with tarfile rather than our own code."""
    manifest = json.loads((out / "manifest.json").read_text())
    samples: dict[str, dict] = {}
    for split, info in manifest["splits"].items():
        for entry in info["shards"]:
            with tarfile.open(out / entry["name"]) as tar:
                for member in tar.getmembers():
                    key, ext = member.name.split(".", 1)
                    samples.setdefault(key, {"split": split})[ext] = tar.extractfile(member).read()
    return samples


def by_source(out: Path) -> dict[str, dict]:
    """Relative source path -> sample, with the sample's JSON decoded."""
    samples = {}
    for key, sample in read_samples(out).items():
        meta = json.loads(sample["json"])
        samples[meta["source"]] = {**sample, "key": key, "meta": meta}
    return samples


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


def shard_digests(out: Path) -> dict[str, str]:
    return {path.name: sha256_file(path) for path in sorted(out.glob("*.tar"))}


def encode(image: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but whose data is a few bytes: a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = chunk(b"IDAT", zlib.compress(b"\0" * 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + data + chunk(b"IEND", b"")


def noise_png(size: int = 64, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    return encode(Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)))


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for relative, data in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def zip_tree(folder: Path, zip_path: Path, top: str = "", extra: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(zip_path, "w") as archive:
        for path in sorted(folder.rglob("*")):  # folders too, as zip tools write them
            archive.write(path, f"{top}{path.relative_to(folder).as_posix()}{'/' if path.is_dir() else ''}")
        for name, data in (extra or {}).items():
            archive.writestr(zipfile.ZipInfo(name), data)
    return zip_path


# ----------------------------------------------------------------------------------- procedural


@pytest.fixture(scope="module")
def procedural(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("procedural") / "shards"
    shard(PROCEDURAL, out)
    return out


def test_procedural_end_to_end(procedural, tmp_path):
    manifest = load_manifest(procedural)
    assert manifest["format"] == "fadscale-shards" and manifest["format_version"] == 1
    assert manifest["tool_version"] == __version__
    assert manifest["source"]["kind"] == "procedural"
    assert manifest["source"]["spec"] == {"per_class": 6, "size": 32, "seed": 0, "grayscale": False}
    assert manifest["image"] == {"mode": "RGB", "channels": 3, "sizes": {"32x32": 48}}
    assert [c["name"] for c in manifest["classes"]] == list(CLASS_NAMES)
    assert [c["folder"] for c in manifest["classes"]] == list(FOLDER_NAMES)
    assert [c["index"] for c in manifest["classes"]] == list(range(8))
    # 6 per class: round(0.6) = 1 to val, 5 to train.
    assert manifest["splits"]["train"]["per_class"] == {name: 5 for name in CLASS_NAMES}
    assert manifest["splits"]["val"]["per_class"] == {name: 1 for name in CLASS_NAMES}
    assert (manifest["splits"]["train"]["count"], manifest["splits"]["val"]["count"]) == (40, 8)
    assert manifest["skipped"] == [] and manifest["seed"] == 0 and manifest["val_fraction"] == 0.1
    assert sorted(p.name for p in procedural.iterdir()) == ["manifest.json", "train-000000.tar", "val-000000.tar"]
    for split in ("train", "val"):
        for entry in manifest["splits"][split]["shards"]:
            path = procedural / entry["name"]
            assert entry["sha256"] == sha256_file(path) and entry["bytes"] == path.stat().st_size
        names = [entry["name"] for entry in manifest["splits"][split]["shards"]]
        assert shard_urls(procedural, split) == [str(procedural / name) for name in names]

    samples = read_samples(procedural)
    assert len(samples) == 48
    for key, sample in samples.items():
        meta = json.loads(sample["json"])
        assert re.fullmatch(r"\d{2}_[0-9a-f]{16}", key)
        assert int(key[:2]) == int(sample["cls"]) == FOLDER_NAMES.index(meta["class_folder"])
        assert meta["class_name"] == class_name(meta["class_folder"])
        assert meta["source"].startswith(meta["class_folder"] + "/")
        assert pixels(sample["png"]).shape == (32, 32, 3)

    again = tmp_path / "again"
    shard(PROCEDURAL, again)
    assert shard_digests(again) == shard_digests(procedural)
    assert read_samples(again).keys() == samples.keys()
    assert summary_line(load_manifest(again), again) == (
        f"wrote 48 tiles (40 train / 8 val, 8 classes) in 2 shards to {again}; skipped 0")


def test_shards_readable_by_other_readers(procedural):
    import webdataset as wds

    urls = shard_urls(procedural, "train")
    decoded = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
    assert len(decoded) == 40
    keys = [s["__key__"] for s in decoded]
    assert len(set(keys)) == len(keys)
    # Written in a seeded mixed order, not by key (whose class prefix would group the classes).
    assert keys != sorted(keys)
    first = decoded[0]
    assert first["png"].mode == "RGB" and first["png"].size == (32, 32)
    assert isinstance(first["cls"], int) and first["json"]["class_folder"] in FOLDER_NAMES

    with tarfile.open(urls[0]) as tar:
        members = tar.getmembers()
    assert {(m.mtime, m.uname, m.gname, m.mode, m.uid) for m in members} == {(0, "fadscale", "fadscale", 0o444, 0)}
    if shutil.which("tar"):
        listing = subprocess.run(["tar", "tf", urls[0]], check=True, capture_output=True, text=True).stdout.split()
        assert listing == [m.name for m in members] and len(listing) == 3 * 40


def test_shard_limits(tmp_path):
    by_count = shard(PROCEDURAL, tmp_path / "count", max_samples_per_shard=7)
    assert [s["samples"] for s in by_count["splits"]["train"]["shards"]] == [7, 7, 7, 7, 7, 5]
    assert by_count["splits"]["train"]["shards"][-1]["name"] == "train-000005.tar"

    limit = 30 * 1024  # a 32x32 sample takes 4-5 KiB in the tar
    by_bytes = shard(PROCEDURAL, tmp_path / "bytes", max_shard_bytes=limit)
    train = by_bytes["splits"]["train"]["shards"]
    assert len(train) > 1 and sum(s["samples"] for s in train) == 40
    assert all(s["bytes"] <= limit for s in train + by_bytes["splits"]["val"]["shards"])
    # Different packing, same samples.
    assert read_samples(tmp_path / "bytes").keys() == read_samples(tmp_path / "count").keys()


# ----------------------------------------------------------------------------------- real tiles


@pytest.fixture(scope="module")
def kather(tmp_path_factory) -> Path:
    if not KATHER.is_dir():
        pytest.skip(f"real tiles not found at {KATHER}")
    out = tmp_path_factory.mktemp("kather") / "shards"
    shard(KATHER, out)
    return out


@needs_kather
def test_kather_folder(kather):
    manifest = load_manifest(kather)
    splits = manifest["splits"]
    assert {name: splits["train"]["per_class"][name] + splits["val"]["per_class"][name]
            for name in KATHER_COUNTS} == KATHER_COUNTS
    assert splits["val"]["per_class"] == {name: max(1, round(0.1 * n)) for name, n in KATHER_COUNTS.items()}
    assert [c["folder"] for c in manifest["classes"]] == list(FOLDER_NAMES)
    assert manifest["image"]["sizes"] == {"150x150": 51, "224x224": 76}
    assert manifest["skipped"] == [] and manifest["source"]["kind"] == "folder"
    samples = by_source(kather)
    assert len(samples) == 127
    formats = {}
    for sample in samples.values():
        formats[sample["meta"]["orig_format"]] = formats.get(sample["meta"]["orig_format"], 0) + 1
        assert pixels(sample["png"]).shape[2] == 3
    assert formats == {"PNG": 84, "JPEG": 24, "TIFF": 19}


@needs_kather
def test_kather_grayscale(kather, tmp_path):
    manifest = shard(KATHER, tmp_path / "gray", grayscale=True)
    assert manifest["image"]["mode"] == "L" and manifest["image"]["channels"] == 1
    samples = read_samples(tmp_path / "gray")
    assert samples.keys() == read_samples(kather).keys()
    assert all(Image.open(io.BytesIO(s["png"])).mode == "L" for s in samples.values())


@needs_kather
def test_kather_zip_matches_folder_with_workers(kather, tmp_path):
    # As the Zenodo zip comes: one top-level folder; plus Mac clutter and a loose README at the top.
    archive = zip_tree(KATHER, tmp_path / "kather.zip", top="Kather_texture_2016_image_tiles_5000/",
                       extra={"__MACOSX/Kather_texture_2016_image_tiles_5000/._01_TUMOR": b"junk",
                              "README.txt": b"tiles"})
    manifest = shard(archive, tmp_path / "zip", workers=2)
    assert manifest["source"]["kind"] == "zip"
    assert manifest["source"]["root"] == "Kather_texture_2016_image_tiles_5000"
    assert manifest["skipped"] == [{"path": "README.txt", "reason": "not inside a class folder"}]
    # Same keys, and byte-identical shards, as the folder read with one worker.
    assert shard_digests(tmp_path / "zip") == shard_digests(kather)


# A host process that turned SIGTERM into a flag (a trainer's stop request, as the demo runs it in-process
# before sharding) used to leave forked pool workers deaf to terminate(): the pool, and CI, hung for good.
POOL_UNDER_A_FLAG_HANDLER = """
import signal, time
from fadscale.data.shard import _mapper

signal.signal(signal.SIGTERM, lambda *_: None)
for _ in range(5):
    with _mapper(2) as mapper:
        assert list(mapper(abs, range(-40, 0))) == list(range(40, 0, -1))
# An error while one worker is still busy (a chunk of 8 x 2 s) takes the terminate() path.
try:
    with _mapper(2) as mapper:
        for _ in mapper(time.sleep, [0.0] * 8 + [2.0] * 8):
            raise KeyError("the first result")
except KeyError:
    print("pool shut down")
"""


def test_worker_pool_shuts_down_when_the_host_ignores_sigterm(tmp_path):
    log = tmp_path / "log.txt"
    with log.open("w") as sink:  # a file, not a pipe: a hung worker would hold a pipe open
        proc = subprocess.Popen([sys.executable, "-c", POOL_UNDER_A_FLAG_HANDLER], stdout=sink,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=60)  # seconds when it works; forever when it does not
        except subprocess.TimeoutExpired:
            rc = "hung"
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the pool's workers too
    assert rc == 0, log.read_text()
    assert "pool shut down" in log.read_text()


# -------------------------------------------------------------------------------- hostile inputs


def mode_images() -> dict[str, bytes]:
    """One small image per awkward mode, with the pixels they must become (see test_normalisation)."""
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 255, 0])
    palette.putdata([0, 1])
    rgba = Image.new("RGBA", (2, 1))
    rgba.putdata([(255, 0, 0, 0), (0, 0, 255, 255)])
    cmyk = Image.new("CMYK", (2, 1))
    cmyk.putdata([(0, 0, 0, 0), (0, 255, 255, 0)])
    bilevel = Image.new("1", (2, 1))
    bilevel.putpixel((1, 0), 1)
    la = Image.new("LA", (2, 1))
    la.putdata([(0, 0), (100, 255)])
    keyed = Image.new("RGB", (2, 1))
    keyed.putdata([(255, 0, 0), (0, 0, 255)])
    return {
        "B/i16.png": encode(Image.fromarray(np.array([[0, 32768, 65535, 257]], dtype=np.uint16))),
        "B/palette.png": encode(palette, transparency=0),
        "B/rgba.png": encode(rgba),
        "B/cmyk.tif": encode(cmyk, "TIFF"),
        "B/bilevel.png": encode(bilevel),
        "B/float.tif": encode(Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)), "TIFF"),
        "B/la.png": encode(la),
        "B/keyed.png": encode(keyed, transparency=(255, 0, 0)),
        "B/gray.png": encode(Image.new("L", (1, 1), 77)),
    }


EXPECTED_PIXELS = {  # RGB rows; transparency becomes white
    "B/i16.png": [(0,) * 3, (128,) * 3, (255,) * 3, (1,) * 3],
    "B/palette.png": [(255, 255, 255), (0, 255, 0)],
    "B/rgba.png": [(255, 255, 255), (0, 0, 255)],
    "B/cmyk.tif": [(255, 255, 255), (255, 0, 0)],
    "B/bilevel.png": [(0, 0, 0), (255, 255, 255)],
    "B/float.tif": [(0,) * 3, (128,) * 3, (255,) * 3],
    "B/la.png": [(255, 255, 255), (100, 100, 100)],
    "B/keyed.png": [(255, 255, 255), (0, 0, 255)],
    "B/gray.png": [(77, 77, 77)],
}


def test_normalisation(tmp_path):
    src = write_tree(tmp_path / "src", mode_images())
    shard(src, tmp_path / "out", val_fraction=0)
    samples = by_source(tmp_path / "out")
    assert sorted(samples) == sorted(EXPECTED_PIXELS)
    for source, expected in EXPECTED_PIXELS.items():
        assert pixels(samples[source]["png"]).tolist() == [list(map(list, expected))], source
    modes = {source: s["meta"]["orig_mode"] for source, s in samples.items()}
    assert modes["B/i16.png"] in ("I;16", "I") and modes["B/palette.png"] == "P"
    assert (modes["B/cmyk.tif"], modes["B/bilevel.png"], modes["B/float.tif"]) == ("CMYK", "1", "F")

    shard(src, tmp_path / "gray", val_fraction=0, grayscale=True)
    assert pixels(by_source(tmp_path / "gray")["B/rgba.png"]["png"]).tolist() == [[255, 29]]  # luma of blue


def test_bad_files_skipped_with_reasons(tmp_path):
    good = noise_png()
    jpeg = encode(Image.new("RGB", (16, 16), (200, 30, 30)), "JPEG")
    src = write_tree(tmp_path / "src", {
        "A/good.png": good,
        "A/nested/deeper/good.png": good,
        "A/jpeg_named.png": jpeg,
        "A/empty.png": b"",
        "A/truncated.png": good[: len(good) // 2],
        "A/text.png": b"not an image at all\n",
        "A/bomb.png": png_claiming(10_000, 10_000),  # over our limit, under Pillow's error threshold
        "A/huge_bomb.png": png_claiming(100_000, 100_000),  # over Pillow's own error threshold
        "A/.DS_Store": b"\0\0\0\1Bud1",
        "A/Thumbs.db": b"junk",
        "A/.hidden.png": good,
        ".git/config": b"junk",
        "B/good.png": good,
    })
    os.symlink("..", src / "A" / "loop")  # A/loop -> the source root: a walk that follows it never ends
    manifest = shard(src, tmp_path / "out")
    reasons = {entry["path"]: entry["reason"] for entry in manifest["skipped"]}
    assert sorted(reasons) == ["A/bomb.png", "A/empty.png", "A/huge_bomb.png", "A/loop", "A/text.png",
                               "A/truncated.png"]
    assert reasons["A/empty.png"] == "empty file"
    assert reasons["A/text.png"] == "not a recognised image format"
    assert reasons["A/bomb.png"].startswith("decompression bomb") and "10000x10000" in reasons["A/bomb.png"]
    assert reasons["A/huge_bomb.png"].startswith("decompression bomb")
    assert reasons["A/truncated.png"].startswith("cannot decode PNG image")
    assert "already read" in reasons["A/loop"]

    samples = by_source(tmp_path / "out")
    assert sorted(samples) == ["A/good.png", "A/jpeg_named.png", "A/nested/deeper/good.png", "B/good.png"]
    assert samples["A/jpeg_named.png"]["meta"]["orig_format"] == "JPEG"  # by content, not extension
    assert [c["name"] for c in manifest["classes"]] == ["A", "B"]


def test_strict_mode_fails_without_output(tmp_path):
    src = write_tree(tmp_path / "src", {"A/good.png": noise_png(), "B/good.png": noise_png(seed=1),
                                        "B/broken.png": b"garbage"})
    with pytest.raises(FadscaleError, match=r"strict mode: 1 entries would be skipped: B/broken.png"):
        shard(src, tmp_path / "out", strict=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no output, no leftover temp folder


def test_existing_output_refused_unless_overwrite(tmp_path):
    src = write_tree(tmp_path / "src", {"A/good.png": noise_png()})
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep")
    with pytest.raises(FadscaleError, match="already exists"):
        shard(src, out)
    # --overwrite replaces only what fadscale made: not a folder of the user's files...
    with pytest.raises(FadscaleError, match="holds no manifest.json, so fadscale did not make it"):
        shard(src, out, overwrite=True)
    assert (out / "precious.txt").read_text() == "keep"
    (out / "precious.txt").unlink()
    shard(src, out, overwrite=True)  # (an empty folder is fine)
    shard(src, out, overwrite=True)  # ...and a shard set is replaced
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "train-000000.tar"]
    with pytest.raises(FadscaleError, match="inside the source"):
        shard(src, src / "shards")
    # ...nor the folder that holds the source, even when it looks like a shard set.
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(FadscaleError, match="must not contain the source"):
        shard(src, tmp_path, overwrite=True)
    assert (src / "A/good.png").is_file()


def test_a_dead_writers_staging_folder_is_removed_and_a_live_ones_kept(tmp_path, capsys):
    src = write_tree(tmp_path / "src", {"A/good.png": noise_png()})
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = tmp_path / f".out.{int(dead.stdout)}.x1y2.partial"  # a killed shard-data's half-written output
    (leftover / "train-000000.tar").parent.mkdir()
    (leftover / "train-000000.tar").write_bytes(b"half")
    live = tmp_path / f".out.{os.getpid()}.z9.partial"
    live.mkdir()
    shard(src, tmp_path / "out")
    assert not leftover.exists() and live.is_dir()
    err = capsys.readouterr().err
    assert f"removed {leftover}: left by an earlier run" in err and f"note: {live} is another writer's" in err


def test_one_writer_per_output_folder(tmp_path):
    from fadscale.runtime.lock import RunLock

    src = write_tree(tmp_path / "src", {"A/good.png": noise_png()})
    held = RunLock(tmp_path, ".out.lock", guards=tmp_path / "out").acquire()  # another shard-data writes "out"
    with pytest.raises(FadscaleError, match=rf"{tmp_path / 'out'}: in use by pid {os.getpid()}"):
        shard(src, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*.partial"))
    held.release()
    shard(src, tmp_path / "out")
    assert (tmp_path / "out/manifest.json").is_file()


def test_an_output_path_under_a_file_is_one_line_error(tmp_path):
    (tmp_path / "a-file").write_text("x")
    proc = subprocess.run([sys.executable, "-m", "fadscale.cli", "shard-data", "procedural:per_class=2,size=16",
                           "--out", str(tmp_path / "a-file" / "shards")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {tmp_path / 'a-file'}: exists and is not a folder"


def test_unsafe_zip_entries_refused_and_never_read(tmp_path, monkeypatch):
    good = noise_png()
    archive = zip_tree(write_tree(tmp_path / "src", {"C/ok.png": good}), tmp_path / "a.zip",
                       extra={"../evil.png": good, "/abs.png": good, "C/../../evil2.png": good,
                              "C:/windows.png": good})
    read = []
    original = zipfile.ZipFile.read

    def spy(self, member, *args):
        read.append(getattr(member, "filename", member))
        return original(self, member, *args)

    monkeypatch.setattr(zipfile.ZipFile, "read", spy)
    manifest = shard(archive, tmp_path / "out")
    assert sorted(e["path"] for e in manifest["skipped"]) == ["../evil.png", "/abs.png", "C/../../evil2.png",
                                                              "C:/windows.png"]
    assert all(e["reason"].startswith("unsafe path in zip") for e in manifest["skipped"])
    assert read == ["C/ok.png"]
    assert list(by_source(tmp_path / "out")) == ["C/ok.png"]


def test_corrupt_and_empty_sources(tmp_path):
    (tmp_path / "fake.zip").write_text("this is not a zip")
    with pytest.raises(FadscaleError, match=r"fake\.zip: not a readable zip"):
        shard(tmp_path / "fake.zip", tmp_path / "o1")
    real = zip_tree(write_tree(tmp_path / "src", {"A/x.png": noise_png()}), tmp_path / "real.zip")
    (tmp_path / "cut.zip").write_bytes(real.read_bytes()[:-30])  # central directory damaged
    with pytest.raises(FadscaleError, match=r"cut\.zip: not a readable zip"):
        shard(tmp_path / "cut.zip", tmp_path / "o2")

    (tmp_path / "empty").mkdir()
    with pytest.raises(FadscaleError, match="no class folders"):
        shard(tmp_path / "empty", tmp_path / "o3")
    write_tree(tmp_path / "flat", {"a.png": noise_png()})  # images but no class folders
    with pytest.raises(FadscaleError, match="no class folders"):
        shard(tmp_path / "flat", tmp_path / "o4")
    # An empty class folder (here the second of three) would renumber the classes after it: refused, named.
    write_tree(tmp_path / "gap", {"01_TUMOR/a.png": noise_png(), "04_LYMPHO/b.png": noise_png()})
    (tmp_path / "gap/03_COMPLEX").mkdir()
    for gap in (tmp_path / "gap", zip_tree(tmp_path / "gap", tmp_path / "gap.zip")):
        with pytest.raises(FadscaleError, match="class folder.s. 03_COMPLEX hold no files"):
            shard(gap, tmp_path / "o7")
    write_tree(tmp_path / "junk", {"A/a.png": b"junk", "B/b.png": b""})
    with pytest.raises(FadscaleError, match="no usable image among 2 files"):
        shard(tmp_path / "junk", tmp_path / "o5")
    with pytest.raises(FadscaleError, match="source not found"):
        shard(tmp_path / "missing", tmp_path / "o6")
    # No output and no leftover temp folder for any of them.
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["cut.zip", "empty", "fake.zip", "flat", "gap", "gap.zip", "junk", "real.zip", "src"]


def test_load_manifest_validates(procedural, tmp_path):
    with pytest.raises(FadscaleError, match="manifest.json"):
        load_manifest(tmp_path)
    copy = Path(shutil.copytree(procedural, tmp_path / "copy"))
    with pytest.raises(FadscaleError, match="no split 'holdout'"):
        shard_urls(copy, "holdout")
    assert shard_urls(copy, "test") == []  # shards without a test part: an empty one
    (copy / "val-000000.tar").write_bytes((copy / "val-000000.tar").read_bytes()[:1024])
    with pytest.raises(FadscaleError, match="val-000000.tar: size differs"):
        load_manifest(copy)
    (copy / "val-000000.tar").unlink()
    with pytest.raises(FadscaleError, match="val-000000.tar: shard listed in .* is missing"):
        load_manifest(copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "format": "other"}))
    with pytest.raises(FadscaleError, match="not a fadscale shard manifest"):
        load_manifest(copy)


# ------------------------------------------------------------------------------------ the split


def test_split_is_stratified_and_stable():
    folders = ("A", "B", "C")
    sizes = {"A": 1, "B": 2, "C": 25}
    items = [SourceItem(f"{f}/{i:03d}.png", f, bytes) for f in folders for i in range(sizes[f])]
    plan = split_items(items, folders, 0.1, seed=0)
    val = [item.class_folder for _, item in plan["val"]]
    assert {f: val.count(f) for f in folders} == {"A": 0, "B": 1, "C": 2}  # round(2.5) = 2
    assert len(plan["train"]) + len(plan["val"]) == 28
    train_classes = [key[:2] for key, _ in plan["train"]]
    assert train_classes != sorted(train_classes)  # classes interleaved, so a shuffle buffer can mix them
    assert split_items(list(reversed(items)), folders, 0.1, seed=0) == plan  # listing order is irrelevant
    assert split_items(items, folders, 0.1, seed=1)["val"] != plan["val"]


def test_a_test_part_leaves_val_as_it_was_and_every_class_a_training_tile(tmp_path):
    folders = ("A", "B", "C")
    sizes = {"A": 2, "B": 10, "C": 50}
    items = [SourceItem(f"{f}/{i:03d}.png", f, bytes) for f in folders for i in range(sizes[f])]
    plain = split_items(items, folders, 0.1, seed=0)
    held = split_items(items, folders, 0.1, seed=0, test_fraction=0.2)
    assert held["val"] == plain["val"]  # adding a test part moves no val tile
    counts = {split: {f: [item.class_folder for _, item in held[split]].count(f) for f in folders}
              for split in ("train", "val", "test")}
    assert counts == {"train": {"A": 1, "B": 7, "C": 35}, "val": {"A": 1, "B": 1, "C": 5},
                      "test": {"A": 0, "B": 2, "C": 10}}
    keys = [key for split in held.values() for key, _ in split]
    assert len(keys) == len(set(keys)) == 62
    # Through shard_dataset: the manifest, the summary line, and a manifest from before the test part.
    out = tmp_path / "shards"
    manifest = shard_dataset("procedural:per_class=10,size=16,seed=0", out, val_fraction=0.1, test_fraction=0.2,
                             progress=False)
    assert manifest["splits"]["test"]["count"] == 16 and manifest["test_fraction"] == 0.2
    assert "(56 train / 8 val / 16 test, 8 classes)" in summary_line(manifest)
    assert len(shard_urls(out, "test")) == 1
    old = json.loads((out / "manifest.json").read_text())
    del old["splits"]["test"], old["test_fraction"]
    old["splits"]["train"]["shards"] = manifest["splits"]["train"]["shards"]
    (out / "manifest.json").write_text(json.dumps(old))
    assert load_manifest(out)["splits"]["test"]["count"] == 0
    with pytest.raises(FadscaleError, match="test fraction"):
        shard_dataset("procedural:per_class=10,size=16,seed=0", tmp_path / "x", val_fraction=0.5, test_fraction=0.5)


def test_holds_colour_tells_stained_tiles_from_grey_ones(tmp_path):
    from fadscale.data.sources import holds_colour

    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (16, 16), dtype=np.uint8)
    for kind, image in (("L", Image.fromarray(grey)), ("grey-rgb", Image.fromarray(grey).convert("RGB")),
                        ("stained", Image.fromarray(np.stack([grey, grey // 2, 255 - grey], axis=-1)))):
        for cls in ("A", "B"):
            (tmp_path / kind / cls).mkdir(parents=True)
            image.save(tmp_path / kind / cls / "t.png")
    assert [holds_colour(tmp_path / kind) for kind in ("L", "grey-rgb", "stained")] == [False, False, True]


def test_val_count_and_class_names():
    assert [val_count(n, 0.1) for n in (1, 2, 9, 15, 20)] == [0, 1, 1, 2, 2]
    assert val_count(10, 0.0) == 0 and val_count(2, 0.9) == 1  # every class keeps a training tile
    assert [class_name(f) for f in ("01_TUMOR", "ADI", "8_EMPTY", "1_", "TUMOR_1")] == [
        "TUMOR", "ADI", "EMPTY", "1_", "TUMOR_1"]
    assert [c["name"] for c in class_table(("1_A", "2_A", "3_B"))] == ["1_A", "2_A", "3_B"]  # kept distinct
