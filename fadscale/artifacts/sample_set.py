"""The sample-set format `fadscale sample` writes and the evaluation, export and tools read: a folder with
`manifest.json` (the SAMPLE_MANIFEST card), `classes.txt`, `images/<NN>_<CLASS>/*.png` and grids.
Everything that names a path inside a sample set or reads its manifest does it through this module."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fadscale.artifacts import SAMPLE_MANIFEST
from fadscale.core.sampling import grid

SAMPLES_DIR = "samples"  # the sample stage's output folder holds the set here
MANIFEST = SAMPLE_MANIFEST.filename
IMAGES_DIR = "images"
CLASS_INDEX = "classes.txt"
FORMAT_VERSION = 1


def png_bytes(image: np.ndarray) -> bytes:
    """[H, W] or [H, W, 3] uint8 -> PNG bytes (fixed settings: the same pixels give the same bytes)."""
    buffer = io.BytesIO()
    Image.fromarray(image, mode="L" if image.ndim == 2 else "RGB").save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def class_dir_name(name: str) -> str:
    """A class name as a folder name (Kather's names are already safe)."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name) or "_"


def class_folder(index: int, name: str) -> str:
    """Where a sample set keeps class `index`'s tiles: `images/01_TUMOR`. `images/` holds nothing but class
    folders, numbered so that their sorted order is the project's class order: ImageFolder and Hugging Face
    `imagefolder` pointed at it give every tile the project's label."""
    return f"{IMAGES_DIR}/{index + 1:02d}_{class_dir_name(name)}"


def read_png(path: Path) -> torch.Tensor:
    with Image.open(path) as img:
        array = np.asarray(img, dtype=np.uint8)
    tensor = torch.from_numpy(array.copy())
    return tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1).contiguous()


def write_grid(images: list[torch.Tensor], path: Path, rows: int | None = None) -> None:
    stack = torch.stack(images)
    if rows is None:
        rows = max(1, int(math.floor(math.sqrt(len(images)))))
    picture = grid(stack, rows)
    array = picture[0].numpy() if picture.shape[0] == 1 else picture.permute(1, 2, 0).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(np.ascontiguousarray(array)))


def read_sample_manifest(folder: str | Path) -> dict:
    return SAMPLE_MANIFEST.read(Path(folder))
