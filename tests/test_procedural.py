"""Tests for the procedural histology tiles (fadscale.data.procedural)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from PIL import Image

from fadscale.data.procedural import (
    CLASS_NAMES,
    FOLDER_NAMES,
    SHEET_GAP,
    ProceduralSpec,
    contact_sheet,
    generate_tiles,
    iter_spec,
    main,
    parse_spec,
)
from fadscale.errors import FadscaleError

LABELS = np.arange(96) % len(CLASS_NAMES)
# sha256 of generate_tiles(np.arange(16) % 8, size=32, seed=7): see test_golden_hash.
GOLDEN_SHA256 = "2b27c6711ba5cc0833087fced50d88921878108ed8bed7ebeeed43ad72d7ccf5"


@pytest.fixture(scope="module")
def reference():
    """96 tiles (12 per class) at 48 px, rendered in one call."""
    return generate_tiles(LABELS, size=48, seed=3)


# --- determinism -------------------------------------------------------------------------------


def test_same_call_twice_is_identical(reference):
    assert np.array_equal(generate_tiles(LABELS, size=48, seed=3), reference)


def test_subsets_and_batch_splits_are_bit_identical(reference):
    part = generate_tiles(LABELS[37:61], size=48, seed=3, start_index=37)
    assert np.array_equal(part, reference[37:61])
    single = generate_tiles(LABELS[50:51], size=48, seed=3, start_index=50)
    assert np.array_equal(single, reference[50:51])
    # Uneven chunks put every tile in a different batch (and with different neighbours).
    chunks = [generate_tiles(LABELS[s : s + 7], size=48, seed=3, start_index=s) for s in range(0, 96, 7)]
    assert np.array_equal(np.concatenate(chunks), reference)


def test_tile_depends_on_index_not_on_position_in_the_call(reference):
    # Tile 10 alone, then inside a call whose other labels differ: same pixels.
    alone = generate_tiles([LABELS[10]], size=48, seed=3, start_index=10)[0]
    mixed = generate_tiles([LABELS[10], 0, 0, 5], size=48, seed=3, start_index=10)[0]
    assert np.array_equal(alone, reference[10])
    assert np.array_equal(mixed, reference[10])


def test_other_seed_or_index_differs(reference):
    other_seed = generate_tiles(LABELS[:16], size=48, seed=4)
    assert all(not np.array_equal(a, b) for a, b in zip(other_seed, reference[:16]))
    shifted = generate_tiles(LABELS[:16], size=48, seed=3, start_index=96)  # same classes, new indices
    assert all(not np.array_equal(a, b) for a, b in zip(shifted, reference[:16]))


def test_golden_hash():
    """Same seed, same tiles, on any machine. If the generator is changed on purpose, every data
    set made from it changes too: update the hash in the same commit."""
    tiles = generate_tiles(np.arange(16) % 8, size=32, seed=7)
    digest = hashlib.sha256(tiles.tobytes()).hexdigest()
    assert digest == GOLDEN_SHA256, f"procedural tiles changed (sha256 {digest})"


# --- shapes, dtypes, values --------------------------------------------------------------------


@pytest.mark.parametrize("size", [16, 64, 150])
def test_shapes_and_dtypes(size):
    labels = np.arange(8)
    rgb = generate_tiles(labels, size=size, seed=1)
    gray = generate_tiles(labels, size=size, seed=1, grayscale=True)
    assert rgb.shape == (8, size, size, 3) and rgb.dtype == np.uint8
    assert gray.shape == (8, size, size) and gray.dtype == np.uint8
    assert all(tile.std() > 1 for tile in rgb)  # textured, not flat colour


def test_grayscale_is_pil_luma_of_rgb(reference):
    gray = generate_tiles(LABELS[:16], size=48, seed=3, grayscale=True)
    pil = np.stack([np.asarray(Image.fromarray(tile).convert("L")) for tile in reference[:16]])
    assert np.array_equal(gray, pil)


def test_extreme_sizes_and_empty_input():
    assert generate_tiles(np.arange(8), size=8).shape == (8, 8, 8, 3)
    assert generate_tiles([0, 6], size=257).shape == (2, 257, 257, 3)
    assert generate_tiles([], size=32).shape == (0, 32, 32, 3)


def test_bad_arguments_raise():
    with pytest.raises(FadscaleError, match="size=7"):
        generate_tiles([0], size=7)
    with pytest.raises(FadscaleError, match="labels"):
        generate_tiles([8], size=16)
    with pytest.raises(FadscaleError, match="seed=-1"):
        generate_tiles([0], size=16, seed=-1)


def test_colours_look_like_h_and_e():
    """Class means sit where H&E puts them: nuclei-rich classes dark and blue-purple, stroma pink
    (green absorbed most), adipose and empty near white."""
    tiles = generate_tiles(np.arange(160) % 8, size=32, seed=0).astype(float)
    mean = np.stack([tiles[c::8].mean(axis=(0, 1, 2)) for c in range(8)])  # [class, RGB]
    tumor, stroma, lympho, adipose, empty = mean[0], mean[1], mean[3], mean[6], mean[7]
    assert lympho.mean() < stroma.mean() and tumor.mean() < stroma.mean()
    assert lympho[2] > lympho[0]  # hematoxylin: blue over red
    assert stroma[1] < stroma[0] - 40 and stroma[1] < stroma[2] - 40  # eosin: pink/magenta
    assert adipose.min() > 200 and empty.min() > 190


# --- learnability -----------------------------------------------------------------------------


def _features(tiles: np.ndarray) -> np.ndarray:
    """Hand features: channel means and spreads, edge strength, orientation, dark/white shares."""
    x = tiles.astype(np.float32) / 255
    luma = x.mean(-1)
    gx = np.abs(np.diff(luma, axis=2)).mean((1, 2))
    gy = np.abs(np.diff(luma, axis=1)).mean((1, 2))
    dark, white = (luma < 0.35).mean((1, 2)), (luma > 0.8).mean((1, 2))
    return np.column_stack([x.mean((1, 2)), x.std((1, 2)), gx + gy, np.abs(gx - gy), dark, white])


def _nearest_centroid(train_x, train_y, test_x, test_y) -> float:
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mu) / sd, (test_x - mu) / sd
    centroids = np.stack([train_x[train_y == c].mean(0) for c in range(len(CLASS_NAMES))])
    predicted = ((test_x[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    return float((predicted == test_y).mean())


def test_classes_are_learnable_but_not_trivial():
    train_y = np.arange(640) % 8  # 80 per class
    test_y = np.arange(640, 960) % 8  # 40 per class, held out (other indices)
    train = _features(generate_tiles(train_y, size=64, seed=11))
    test = _features(generate_tiles(test_y, size=64, seed=11, start_index=640))
    accuracy = _nearest_centroid(train, train_y, test, test_y)
    colour_only = _nearest_centroid(train[:, :3], train_y, test[:, :3], test_y)
    print(f"nearest-centroid accuracy: hand features {accuracy:.3f}, colour means only {colour_only:.3f}"
          " (chance 0.125)")
    assert accuracy > 0.6


# --- specs ------------------------------------------------------------------------------------


def test_parse_spec_accepts_good_specs():
    assert parse_spec("procedural") == ProceduralSpec()
    full = parse_spec("procedural:per_class=200,size=64,seed=3,grayscale=1")
    assert full == ProceduralSpec(per_class=200, size=64, seed=3, grayscale=True)
    spaced = parse_spec(" procedural: size = 32 , grayscale=false ")
    assert spaced == ProceduralSpec(size=32, grayscale=False)
    assert parse_spec("procedural:grayscale=true").grayscale is True
    assert parse_spec("procedural:size=8").size == 8


@pytest.mark.parametrize(
    "text, key",
    [
        ("procedural:per_class=0", "per_class"),
        ("procedural:per_class=abc", "per_class"),
        ("procedural:size=7", "size"),
        ("procedural:size=64.5", "size"),
        ("procedural:seed=-1", "seed"),
        ("procedural:grayscale=2", "grayscale"),
        ("procedural:colour=1", "colour"),
        ("procedural:size", "size"),
        ("procedural:size=32,size=64", "size"),
        ("kather:size=64", "kather"),
        ("procedural:per_class=100000000", "per_class or size"),  # 800M tiles: refused at once, not after hours
    ],
)
def test_parse_spec_rejects_bad_specs(text, key):
    with pytest.raises(FadscaleError, match=key) as error:
        parse_spec(text)
    assert "\n" not in str(error.value)


def test_parse_spec_message_names_value_and_expectation():
    with pytest.raises(FadscaleError) as error:
        parse_spec("procedural:size=4")
    assert "size='4'" in str(error.value) and ">= 8" in str(error.value)


def test_iter_spec_names_labels_and_stability():
    spec = ProceduralSpec(per_class=3, size=16, seed=2)
    items = list(iter_spec(spec, batch=5))
    assert len(items) == 24
    names = [name for name, _, _ in items]
    assert len(set(names)) == 24
    assert names[0] == "01_TUMOR/proc_000000.png" and names[9] == "02_STROMA/proc_000009.png"
    for name, label, image in items:
        assert name.startswith(FOLDER_NAMES[label] + "/proc_") and name.endswith(".png")
        assert image.shape == (16, 16, 3) and image.dtype == np.uint8
    # Batch size does not matter; a smaller per_class is a prefix of a larger one.
    again = list(iter_spec(spec, batch=64))
    assert all(a[0] == b[0] and np.array_equal(a[2], b[2]) for a, b in zip(items, again))
    smaller = list(iter_spec(ProceduralSpec(per_class=2, size=16, seed=2)))
    assert all(a[0] == b[0] and np.array_equal(a[2], b[2]) for a, b in zip(smaller, items))
    gray = next(iter_spec(ProceduralSpec(per_class=1, size=16, seed=2, grayscale=True)))
    assert gray[2].shape == (16, 16)


# --- contact sheet ----------------------------------------------------------------------------


@pytest.mark.parametrize("grayscale", [False, True])
def test_contact_sheet_writes_png_with_the_tiles(tmp_path, grayscale):
    path = tmp_path / "sheet.png"
    per_class, size = 3, 32
    contact_sheet(path, per_class=per_class, size=size, seed=5, grayscale=grayscale)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sheet.png"]  # no temporary left
    with Image.open(path) as image:
        assert image.format == "PNG"
        sheet = np.asarray(image)
    assert sheet.shape[0] == SHEET_GAP + 8 * (size + SHEET_GAP)
    label_width = sheet.shape[1] - per_class * (size + SHEET_GAP)
    assert label_width > 20  # room for the class names
    tiles = generate_tiles(np.arange(per_class * 8) % 8, size=size, seed=5, grayscale=grayscale)
    for c in range(8):
        for j in range(per_class):
            top, left = SHEET_GAP + c * (size + SHEET_GAP), label_width + j * (size + SHEET_GAP)
            assert np.array_equal(sheet[top : top + size, left : left + size], tiles[j * 8 + c])
        label = sheet[SHEET_GAP + c * (size + SHEET_GAP) :][:size, :label_width]
        assert label.min() < 128  # some dark text


def test_module_main_writes_sheet(tmp_path, capsys):
    path = tmp_path / "out" / "sheet.png"
    assert main(["--out", str(path), "--size", "16", "--seed", "1", "--grayscale"]) == 0
    with Image.open(path) as image:
        assert image.mode == "L" and image.size[1] == SHEET_GAP + 8 * (16 + SHEET_GAP)
    assert main(["--out", str(path), "--size", "4"]) == 1
    assert "size=4" in capsys.readouterr().err
