"""The inputs of an evaluation: a sample set (checked), the real tiles, the evaluator's outputs, and the
record of how independent the evaluator is of the alignment expert."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch import nn

from fadscale.artifacts import SAMPLE_MANIFEST
from fadscale.data.loader import eval_loader
from fadscale.data.shard import load_manifest
from fadscale.core.models.expert import expert_input, read_card, shared_training_tiles
from fadscale.errors import FadscaleError
from fadscale.runtime.io import atomic_output_dir
from fadscale.artifacts.sample_set import FORMAT_VERSION as SAMPLES_VERSION, MANIFEST, SAMPLES_DIR, class_dir_name, class_folder, \
    png_bytes, read_sample_manifest
from fadscale.core.sampling import to_uint8

if TYPE_CHECKING:
    from fadscale.config import EvaluateConfig

NOT_CLASS_DIRS = {"grids", "shards", "images"}


def resolve_samples(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise FadscaleError(f"samples {path}: folder not found")
    if not (path / MANIFEST).is_file() and (path / SAMPLES_DIR / MANIFEST).is_file():
        return path / SAMPLES_DIR
    return path


def _read_png(path: Path, mode: str | None) -> torch.Tensor:
    try:
        with Image.open(path) as img:
            img.load()
            if mode is None:
                mode = "L" if img.mode in ("1", "L", "LA", "I", "I;16", "F") else "RGB"
            array = np.asarray(img.convert(mode), dtype=np.uint8)
    except (OSError, ValueError) as exc:
        raise FadscaleError(f"{path}: not a readable image ({exc})") from None
    tensor = torch.from_numpy(array.copy())
    return tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1).contiguous()


def _index_of(path: Path) -> tuple:
    return (0, int(path.stem), "") if path.stem.isdigit() else (1, 0, path.stem)


def load_sample_set(path: str | Path, classes: list[str]) -> tuple[Path, dict | None, dict[str, torch.Tensor]]:
    """(folder, manifest or None, {class: uint8 [N, C, H, W]}) after checking the folder: every class
    present and non-empty, no unknown class folder, one image size and mode throughout, and the counts
    its manifest promises."""
    folder = resolve_samples(path)
    manifest = read_sample_manifest(folder) if (folder / MANIFEST).is_file() else None
    folders = {name: class_dir_name(name) for name in classes}
    if manifest is not None:
        folders.update({k: v for k, v in (manifest.get("class_folders") or {}).items() if k in folders})
    pngs = {name: sorted((folder / sub).glob("*.png"), key=_index_of) if (folder / sub).is_dir() else []
            for name, sub in folders.items()}
    if not any(pngs.values()):
        raise FadscaleError(f"samples {folder}: no generated tiles (expected <CLASS>/<index>.png for classes "
                            f"{', '.join(classes)})")
    known = {Path(sub) for sub in folders.values()}
    places = {sub.parent for sub in known} | {Path(".")}  # images/ (a sample set) and the top (a plain folder)
    strangers = sorted((place / p.name).as_posix() for place in places if (folder / place).is_dir()
                       for p in (folder / place).iterdir()
                       if p.is_dir() and place / p.name not in known and p.name not in NOT_CLASS_DIRS
                       and not p.name.startswith(".") and any(p.glob("*.png")))
    if strangers:
        raise FadscaleError(f"samples {folder}: folder(s) {', '.join(strangers)} are not classes of the evaluator "
                            f"({', '.join(classes)})")
    missing = [name for name in classes if not pngs[name]]
    if missing:
        raise FadscaleError(f"samples {folder}: class(es) {', '.join(missing)} missing (no tiles in "
                            f"{', '.join(str(folder / folders[m]) for m in missing)})")
    if manifest is not None:
        expected = manifest.get("per_class") or {}
        short = [f"{name} ({len(pngs[name])} of {expected[name]})" for name in classes
                 if name in expected and len(pngs[name]) != expected[name]]
        if short:
            raise FadscaleError(f"samples {folder}: tile counts differ from its manifest: {', '.join(short)}")
    mode = None
    if manifest is not None and manifest.get("image", {}).get("mode") in ("L", "RGB"):
        mode = manifest["image"]["mode"]
    images: dict[str, torch.Tensor] = {}
    first: tuple[Path, tuple] | None = None
    for name in classes:
        tiles = []
        for file in pngs[name]:
            tile = _read_png(file, mode)
            if first is None:
                first = (file, tuple(tile.shape))
                mode = "L" if tile.shape[0] == 1 else "RGB"
            elif tuple(tile.shape) != first[1]:
                raise FadscaleError(
                    f"samples {folder}: mismatched image sizes: {file.relative_to(folder)} is "
                    f"{tile.shape[2]}x{tile.shape[1]}, {first[0].relative_to(folder)} is {first[1][2]}x{first[1][1]}")
            tiles.append(tile)
        images[name] = torch.stack(tiles)
    if manifest is not None and manifest.get("image", {}).get("size") not in (None, first[1][1]):
        raise FadscaleError(f"samples {folder}: tiles are {first[1][1]} px, its manifest says {manifest['image']['size']}")
    return folder, manifest, images


def load_real_tiles(shards: str | Path, classes: list[str], *, split: str, image_size: int, channels: int,
                    subset: str = "all", subset_seed: int = 0, max_per_class: int | None = None,
                    batch_size: int = 64) -> dict[str, torch.Tensor]:
    """{class: uint8 [N, C, S, S]}: the real tiles of a split, in key order, decoded and resized exactly as
    the training loader does."""
    manifest = load_manifest(shards)
    names = [c["name"] for c in manifest["classes"]]
    if names != classes:
        raise FadscaleError(f"{shards}: its classes {names} differ from the evaluator's {classes}")
    per_class: dict[str, list[torch.Tensor]] = {name: [] for name in classes}
    for batch in eval_loader(shards, split=split, batch_size=batch_size, image_size=image_size, channels=channels,
                             subset=subset, subset_seed=subset_seed):
        tiles = to_uint8(batch["image"])
        for tile, label in zip(tiles, batch["label"].tolist()):
            bucket = per_class[classes[label]]
            if max_per_class is None or len(bucket) < max_per_class:
                bucket.append(tile)
    empty = [name for name, tiles in per_class.items() if not tiles]
    if empty:
        raise FadscaleError(f"{shards}: the {split} split (subset {subset}) has no tiles of {', '.join(empty)}")
    return {name: torch.stack(tiles) for name, tiles in per_class.items()}


def export_real_tiles(shards: str | Path, out: str | Path, *, split: str = "val", subset: str = "all",
                      subset_seed: int = 0, image_size: int | None = None, channels: int | None = None,
                      max_per_class: int | None = None, overwrite: bool = False) -> Path:
    """Write real tiles as a sample set (<CLASS>/<index>.png + manifest): a reference to evaluate, and
    the check that an evaluator scores real tiles as its card says."""
    manifest = load_manifest(shards)
    classes = [c["name"] for c in manifest["classes"]]
    if image_size is None:
        sizes = list(manifest["image"]["sizes"])
        width, _, height = sizes[0].partition("x") if len(sizes) == 1 else ("", "", "")
        if len(sizes) != 1 or width != height:
            raise FadscaleError(f"{shards}: tiles of several sizes ({', '.join(sizes)}); give image_size")
        image_size = int(width)
    channels = channels or manifest["image"]["channels"]
    tiles = load_real_tiles(shards, classes, split=split, image_size=image_size, channels=channels, subset=subset,
                            subset_seed=subset_seed, max_per_class=max_per_class)
    with atomic_output_dir(out, overwrite=overwrite, made_by=SAMPLE_MANIFEST.filename) as folder:
        for i, name in enumerate(classes):
            stack = tiles[name]
            (folder / class_folder(i, name)).mkdir(parents=True)
            for j, tile in enumerate(stack):
                array = tile[0].numpy() if channels == 1 else tile.permute(1, 2, 0).numpy()
                (folder / class_folder(i, name) / f"{j:05d}.png").write_bytes(png_bytes(np.ascontiguousarray(array)))
        SAMPLE_MANIFEST.write(folder, {
            "format_version": SAMPLES_VERSION, "kind": "real",
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source": {"shards": str(Path(shards).resolve()), "split": split, "subset": subset},
            "run": None, "classes": classes, "class_folders": {n: class_folder(i, n) for i, n in enumerate(classes)},
            "image": {"size": image_size, "channels": channels, "mode": "L" if channels == 1 else "RGB"},
            "per_class": {name: len(stack) for name, stack in tiles.items()},
            "count": sum(len(stack) for stack in tiles.values()),
        })
    return Path(out)


def evaluator_selection(card: dict, cfg: EvaluateConfig, split: str) -> str:
    """How the evaluator's weights were chosen, and whether that used tiles this evaluation scores."""
    data = card.get("data") or {}
    subset = data.get("subset", "all")
    epoch = card.get("best_epoch")
    picked = f"epoch {epoch + 1} of {card.get('epochs_trained', '?')}" if isinstance(epoch, int) else "the best epoch"
    same_tiles = split == "val" and (cfg.real.subset == "all" or cfg.real.subset == subset or subset == "all")
    text = f"{picked} by accuracy on the val tiles of subset {subset}"
    if same_tiles:
        text += (f"; those tiles are among the real {split} tiles scored here, so the evaluator's accuracy "
                 "on real tiles is optimistic (the generated tiles had no say in the choice)")
    return text


def check_independence(evaluator_card: dict, manifest: dict | None, alignment_card: str | None,
                       allow: bool) -> dict:
    """Refuse an evaluator that shares training tiles with the alignment expert (the same weights, the same
    half, or "all", decided from the two cards; see `shared_training_tiles`) unless allowed; returns the
    report's record of the check, with its basis."""
    candidates = []  # (how it is named, card path, sha256, card or None)
    run = (manifest or {}).get("run") or {}
    if isinstance(run.get("expert"), dict) and run["expert"].get("sha256"):
        where = run["expert"].get("card")
        card = read_card(where) if where and Path(where).exists() else None
        candidates.append((f"named by the run card {run.get('path')}", where, run["expert"]["sha256"], card))
    if alignment_card:
        card = read_card(alignment_card)
        candidates.append(("named by evaluator.alignment_expert", card["_path"], card["sha256"], card))
    checks = []
    for what, where, sha, card in candidates:
        shared, basis = shared_training_tiles(evaluator_card, card or {"sha256": sha})
        if card is None and shared is None:
            basis = f"unknown: the alignment expert's card {where} is not readable here"
        checks.append((what, where, sha, shared, basis))
    same = [c for c in checks if c[2] == evaluator_card["sha256"]]
    shared = [c for c in checks if c[3]]
    if shared and not allow:
        what, where, sha, _, basis = (same or shared)[0]
        who = "is the alignment expert" if same else "shares training tiles with the alignment expert"
        raise FadscaleError(
            f"evaluator {evaluator_card['_path']} {who} {what} ({where}, sha256 {sha[:12]}...; {basis}): its "
            "verdict on tiles generated to match that expert's features is not independent; use an expert "
            "trained on the other half (data.subset B) or set evaluator.allow_alignment_expert=true")
    return {"alignment_expert_sha256": sorted({c[2] for c in checks}),
            "alignment_expert_known": bool(checks),
            "is_alignment_expert": bool(same), "shares_training_tiles": bool(shared),
            "allowed_anyway": bool(shared) and allow, "independence_basis": "; ".join(sorted({c[4] for c in checks}))}


@torch.no_grad()
def evaluator_outputs(model: nn.Module, card: dict, tiles: torch.Tensor, device: torch.device,
                      batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled features [N, D] float64, predicted class [N]) for uint8 tiles."""
    features, predicted = [], []
    for start in range(0, len(tiles), batch_size):
        x = tiles[start:start + batch_size].to(device).float().div(127.5).sub(1.0)
        feat = model.features(expert_input(x, card))
        features.append(feat.double().cpu())
        predicted.append(model.head(feat).argmax(1).cpu())
    return torch.cat(features), torch.cat(predicted)




def stack_tiles(tiles: dict[str, torch.Tensor], classes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.cat([tiles[name] for name in classes])
    labels = torch.cat([torch.full((len(tiles[name]),), i, dtype=torch.long) for i, name in enumerate(classes)])
    return images, labels
