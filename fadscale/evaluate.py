"""`fadscale evaluate`: score a sample set against the real validation tiles with an independent evaluator.

    python -m fadscale.evaluate --config configs/tiny/evaluate.yaml

- generation accuracy: the evaluator's top-1 on the generated tiles, per class and overall (plus its
  accuracy on the real tiles, the reference point). The evaluator must not be the alignment expert
  (the run was trained to please it): refused when their sha256 match, unless
  `evaluator.allow_alignment_expert`, and then the report says so.
- SSIM diversity per class (1 - mean SSIM over random pairs), for the generated and the real tiles.
- Frechet distance, KID and k-NN precision/recall in the evaluator's pooled feature space, overall and
  per class; Inception FID only with local Inception weights (`metrics.inception_weights`).
- utility: a small classifier trained on synthetic tiles, on real + synthetic, and on real tiles only,
  each tested on the real validation tiles (train on synthetic, test on real).

Output (`run.out_dir`, written atomically): report.json, report.md, confusion.png, grids/<CLASS>.png
(real tiles on top, generated below), config.yaml. `evaluate_samples(...)` is the same as a library call.
"""

from __future__ import annotations

import math
import random
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import Field
from torch import nn

from fadscale import __version__
from fadscale.config import Section, build_config, save_config, with_settings
from fadscale.data.loader import apply_view, eval_loader
from fadscale.data.shard import load_manifest
from fadscale.metrics import (accuracy_from_confusion, confusion_matrix, frechet_distance, kernel_distance,
                              precision_recall, ssim_diversity)
from fadscale.models.expert import expert_input, load_expert, read_card
from fadscale.runtime.entry import run_entry
from fadscale.runtime.io import FadscaleError, atomic_output_dir, atomic_write_json, atomic_write_text, git_commit
from fadscale.runtime.logging import log_line
from fadscale.sample import (FORMAT as SAMPLES_FORMAT, FORMAT_VERSION as SAMPLES_VERSION, MANIFEST, SAMPLES_DIR,
                             class_dir_name, png_bytes, read_sample_manifest, write_grid)
from fadscale.sampling import to_uint8

REPORT_FORMAT = "fadscale-evaluation"
NOT_CLASS_DIRS = {"grids", "shards"}


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


class EvalRunSection(Section):
    out_dir: str = Field("runs/evaluate", description="report folder (written atomically)")
    seed: int = Field(0, ge=0, description="seeds the SSIM pairs, KID subsets and the utility classifiers")
    overwrite: bool = Field(False, description="replace an existing report folder")


class RealSection(Section):
    shards: str | None = Field(None, description="real shards; None: those the sampled run was trained on")
    split: Literal["val", "train"] = "val"
    subset: Literal["all", "A", "B"] = "all"
    subset_seed: int = 0
    max_per_class: int | None = Field(None, ge=2, description="cap the real tiles per class (first by key)")


class EvaluatorSection(Section):
    card: str = Field("runs/expert_b/expert.json", description="the evaluator expert's card (not the alignment expert)")
    alignment_expert: str | None = Field(None, description="the alignment expert's card; default: the run card's")
    allow_alignment_expert: bool = Field(False, description="evaluate with the alignment expert anyway (reported)")
    batch_size: int = Field(64, ge=1)


class MetricsSection(Section):
    ssim_pairs: int = Field(100, ge=1, description="random pairs per class for SSIM diversity")
    kid_subsets: int = Field(50, ge=1)
    kid_subset_size: int = Field(1000, ge=2, description="capped by the smaller set")
    pr_k: int = Field(3, ge=1, description="k of the k-NN manifolds (precision/recall)")
    per_class: bool = Field(True, description="also per-class Frechet distance, KID, precision/recall")
    inception_weights: str | None = Field(None, description="local Inception weights for FID (needs torch-fidelity)")


class UtilitySection(Section):
    enabled: bool = Field(True, description="train-on-synthetic, test-on-real classifiers")
    arch: str = Field("tiny-cnn", description="tiny-cnn, or a timm model name (trained from scratch)")
    steps: int | None = Field(300, ge=1, description="optimizer steps per classifier, the same for every "
                              "training set (so a smaller set is not also trained less); None: `epochs` passes")
    epochs: int = Field(5, ge=1, description="passes over the training set when steps is None")
    batch_size: int = Field(32, ge=1)
    lr: float = Field(2e-3, gt=0)
    max_real_per_class: int | None = Field(None, ge=1, description="cap the real train tiles per class")


class ReportSection(Section):
    grid: int = Field(8, ge=1, description="real and generated tiles per class in the grids")


class EvaluateConfig(Section):
    run: EvalRunSection = EvalRunSection()
    samples: str = Field("runs/samples", description="a sample set (or the sample stage folder holding samples/)")
    real: RealSection = RealSection()
    evaluator: EvaluatorSection = EvaluatorSection()
    metrics: MetricsSection = MetricsSection()
    utility: UtilitySection = UtilitySection()
    report: ReportSection = ReportSection()


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------


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
    known = set(folders.values()) | NOT_CLASS_DIRS
    strangers = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name not in known
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
    with atomic_output_dir(out, overwrite=overwrite) as folder:
        for name, stack in tiles.items():
            (folder / class_dir_name(name)).mkdir()
            for j, tile in enumerate(stack):
                array = tile[0].numpy() if channels == 1 else tile.permute(1, 2, 0).numpy()
                (folder / class_dir_name(name) / f"{j:05d}.png").write_bytes(png_bytes(np.ascontiguousarray(array)))
        atomic_write_json(folder / MANIFEST, {
            "format": SAMPLES_FORMAT, "format_version": SAMPLES_VERSION, "kind": "real",
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source": {"shards": str(Path(shards).resolve()), "split": split, "subset": subset},
            "run": None, "classes": classes, "class_folders": {n: class_dir_name(n) for n in classes},
            "image": {"size": image_size, "channels": channels, "mode": "L" if channels == 1 else "RGB"},
            "per_class": {name: len(stack) for name, stack in tiles.items()},
            "count": sum(len(stack) for stack in tiles.values()),
        })
    return Path(out)


# --------------------------------------------------------------------------------------------------
# Evaluator
# --------------------------------------------------------------------------------------------------


def evaluator_selection(card: dict, cfg: EvaluateConfig) -> str:
    """How the evaluator's weights were chosen, and whether that used tiles this evaluation scores."""
    data = card.get("data") or {}
    subset = data.get("subset", "all")
    epoch = card.get("best_epoch")
    picked = f"epoch {epoch + 1} of {card.get('epochs_trained', '?')}" if isinstance(epoch, int) else "the best epoch"
    same_tiles = cfg.real.split == "val" and (cfg.real.subset == "all" or cfg.real.subset == subset or subset == "all")
    text = f"{picked} by accuracy on the val tiles of subset {subset}"
    if same_tiles:
        text += (f"; those tiles are among the real {cfg.real.split} tiles scored here, so the evaluator's accuracy "
                 "on real tiles is optimistic (the generated tiles had no say in the choice)")
    return text


def check_independence(evaluator_card: dict, manifest: dict | None, alignment_card: str | None,
                       allow: bool) -> dict:
    """Refuse the alignment expert as evaluator (same weights sha256) unless allowed; returns the
    report's record of the check."""
    candidates = []
    run = (manifest or {}).get("run") or {}
    if isinstance(run.get("expert"), dict) and run["expert"].get("sha256"):
        candidates.append((f"named by the run card {run.get('path')}", run["expert"].get("card"),
                           run["expert"]["sha256"]))
    if alignment_card:
        card = read_card(alignment_card)
        candidates.append(("named by evaluator.alignment_expert", card["_path"], card["sha256"]))
    same = [c for c in candidates if c[2] == evaluator_card["sha256"]]
    if same and not allow:
        what, where, sha = same[0]
        raise FadscaleError(
            f"evaluator {evaluator_card['_path']} is the alignment expert {what} ({where}, sha256 {sha[:12]}...): "
            "its verdict on tiles "
            "generated to match its own features is not independent; use an expert trained on the other half "
            "(data.subset B) or set evaluator.allow_alignment_expert=true")
    return {"alignment_expert_sha256": sorted({c[2] for c in candidates}),
            "alignment_expert_known": bool(candidates),
            "is_alignment_expert": bool(same), "allowed_anyway": bool(same) and allow}


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


# --------------------------------------------------------------------------------------------------
# Utility: train on synthetic, test on real
# --------------------------------------------------------------------------------------------------


class TinyCNN(nn.Module):
    def __init__(self, in_chans: int, classes: int, width: int = 16):
        super().__init__()
        layers, channels = [], in_chans
        for out in (width, width * 2, width * 4):
            layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
            channels = out
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _classifier(arch: str, in_chans: int, classes: int, size: int) -> nn.Module:
    if arch == "tiny-cnn":
        return TinyCNN(in_chans, classes)
    from fadscale.models.expert import Expert

    return Expert(arch, classes, in_chans, size, head="linear")


def train_classifier(tiles: torch.Tensor, labels: torch.Tensor, classes: int, *, arch: str, epochs: int,
                     batch_size: int, lr: float, seed: int, device: torch.device, steps: int | None = None) -> nn.Module:
    """A classifier from scratch on uint8 tiles (random flips/rotations), seeded: the same data give the
    same weights. `steps` optimizer steps (shuffled passes, the last one cut short), else `epochs` passes."""
    torch.manual_seed(seed)
    model = _classifier(arch, tiles.shape[1], classes, tiles.shape[-1]).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    batch_size = min(batch_size, len(tiles))
    total = steps or max(1, epochs * math.ceil(len(tiles) / batch_size))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    done = 0
    while done < total:
        order = torch.randperm(len(tiles), generator=gen)
        for start in range(0, len(tiles), batch_size):
            index = order[start:start + batch_size]
            if len(index) < 2:  # BatchNorm needs two samples
                continue
            views = torch.randint(0, 8, (len(index),), generator=gen).tolist()
            x = torch.stack([apply_view(tiles[i], v) for i, v in zip(index.tolist(), views)])
            x = x.to(device).float().div(127.5).sub(1.0)
            loss = F.cross_entropy(model(x), labels[index].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            done += 1
            if done == total:
                break
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, tiles: torch.Tensor, device: torch.device, batch_size: int = 128) -> torch.Tensor:
    out = []
    for start in range(0, len(tiles), batch_size):
        x = tiles[start:start + batch_size].to(device).float().div(127.5).sub(1.0)
        out.append(model(x).argmax(1).cpu())
    return torch.cat(out)


def _stack(tiles: dict[str, torch.Tensor], classes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.cat([tiles[name] for name in classes])
    labels = torch.cat([torch.full((len(tiles[name]),), i, dtype=torch.long) for i, name in enumerate(classes)])
    return images, labels


def utility_scores(cfg: EvaluateConfig, classes: list[str], generated: dict[str, torch.Tensor],
                   real_val: dict[str, torch.Tensor], shards: Path, device: torch.device) -> dict:
    u = cfg.utility
    size, channels = next(iter(generated.values())).shape[-1], next(iter(generated.values())).shape[1]
    real_train = load_real_tiles(shards, classes, split="train", image_size=size, channels=channels,
                                 max_per_class=u.max_real_per_class)
    syn_x, syn_y = _stack(generated, classes)
    real_x, real_y = _stack(real_train, classes)
    test_x, test_y = _stack(real_val, classes)
    setups = {"real": (real_x, real_y), "synthetic": (syn_x, syn_y),
              "real+synthetic": (torch.cat([real_x, syn_x]), torch.cat([real_y, syn_y]))}
    results = {}
    for name, (x, y) in setups.items():
        model = train_classifier(x, y, len(classes), arch=u.arch, epochs=u.epochs, batch_size=u.batch_size, lr=u.lr,
                                 seed=cfg.run.seed, device=device, steps=u.steps)
        confusion = confusion_matrix(test_y, predict(model, test_x, device), len(classes))
        results[name] = {"train_tiles": len(x), **accuracy_from_confusion(confusion, classes)}
    return {"computed": True, "classifier": u.arch, "steps": u.steps, "epochs": None if u.steps else u.epochs,
            "batch_size": u.batch_size, "lr": u.lr,
            "seed": cfg.run.seed, "test": {"split": cfg.real.split, "tiles": len(test_x)},
            "real_train_tiles": len(real_x), "setups": results}


# --------------------------------------------------------------------------------------------------
# Distances
# --------------------------------------------------------------------------------------------------


def _distances(fake: torch.Tensor, real: torch.Tensor, m: MetricsSection, seed: int) -> dict:
    out: dict = {"generated": len(fake), "real": len(real)}
    if len(fake) < 2 or len(real) < 2:
        return {**out, "frechet": None, "kid": None, "kid_std": None, "precision": None, "recall": None}
    kid, kid_std = kernel_distance(fake, real, subsets=m.kid_subsets, subset_size=m.kid_subset_size, seed=seed)
    pr = precision_recall(real, fake, k=m.pr_k)
    return {**out, "frechet": frechet_distance(fake, real), "kid": kid, "kid_std": kid_std,
            "precision": pr["precision"], "recall": pr["recall"], "k": pr["k"]}


def reference_distances(model: nn.Module, card: dict, shards: Path, classes: list[str],
                        generated: dict[str, torch.Tensor], real_feat: torch.Tensor, m: MetricsSection, seed: int,
                        device: torch.device, batch_size: int) -> dict:
    """The same distances for real train tiles against the real val tiles: what a generator that drew
    from the real distribution would score. As many train tiles per class as there are generated ones
    (the first by key), so both rows carry the same small-sample bias."""
    size, channels = next(iter(generated.values())).shape[-1], next(iter(generated.values())).shape[1]
    wanted = max(len(tiles) for tiles in generated.values())
    train = load_real_tiles(shards, classes, split="train", image_size=size, channels=channels, max_per_class=wanted)
    train_x, _ = _stack(train, classes)
    train_feat, _ = evaluator_outputs(model, card, train_x, device, batch_size)
    return {"what": "real train tiles (as many per class as generated, first by key) vs the real val tiles",
            **_distances(train_feat, real_feat, m, seed)}


def intensity_by_class(generated: dict[str, torch.Tensor], real_val: dict[str, torch.Tensor], shards: Path,
                       classes: list[str], size: int, channels: int) -> dict:
    """Mean pixel intensity (0..1) per class of the generated tiles and of all real tiles (train + val,
    the closest estimate of the class's own), and the gap; the val-only mean beside it."""
    train = load_real_tiles(shards, classes, split="train", image_size=size, channels=channels)
    per_class = {}
    for name in classes:
        real_all = torch.cat([train[name], real_val[name]])
        gen = float(generated[name].float().mean() / 255.0)
        real = float(real_all.float().mean() / 255.0)
        per_class[name] = {"generated": gen, "real": real, "real_val": float(real_val[name].float().mean() / 255.0),
                           "gap": gen - real, "real_tiles": len(real_all)}
    return {"what": "mean pixel intensity (0..1); real: all real tiles of the class (train + val)",
            "per_class": per_class, "max_abs_gap": max(abs(v["gap"]) for v in per_class.values())}


def inception_fid(weights: str | None, generated: torch.Tensor, real: torch.Tensor) -> dict:
    if not weights:
        return {"computed": False, "reason": "no local Inception weights given (metrics.inception_weights)"}
    if not Path(weights).is_file():
        raise FadscaleError(f"metrics.inception_weights {weights}: file not found")
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance

        fid = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(weights))
    except ModuleNotFoundError as exc:
        return {"computed": False, "reason": f"torch-fidelity is not installed ({exc})"}
    for tiles, is_real in ((real, True), (generated, False)):
        for start in range(0, len(tiles), 64):
            batch = tiles[start:start + 64]
            fid.update(batch.expand(-1, 3, -1, -1) if batch.shape[1] == 1 else batch, real=is_real)
    return {"computed": True, "fid": float(fid.compute()), "weights": str(weights)}


# --------------------------------------------------------------------------------------------------
# The evaluation
# --------------------------------------------------------------------------------------------------


def _clean(value):
    """JSON-safe: NaN/inf -> None, tensors -> lists."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _clean(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def evaluate(cfg: EvaluateConfig, write: bool = True) -> dict:
    """Score the sample set of `cfg`; write the report folder when `write`; return the report."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.run.seed)
    random.seed(cfg.run.seed)
    out = Path(cfg.run.out_dir)
    if write and out.exists() and not cfg.run.overwrite:
        raise FadscaleError(f"{out}: report folder already exists (set run.overwrite=true to replace it)")
    card = read_card(cfg.evaluator.card)
    classes = list(card["classes"])
    folder, manifest, generated = load_sample_set(cfg.samples, classes)
    independence = check_independence(card, manifest, cfg.evaluator.alignment_expert,
                                      cfg.evaluator.allow_alignment_expert)
    if manifest is not None and manifest.get("classes") not in (None, classes):
        raise FadscaleError(f"samples {folder}: classes {manifest['classes']} differ from the evaluator's {classes}")
    shards = cfg.real.shards
    if shards is None:
        source = (manifest or {}).get("run") or {}
        listed = source.get("shards_manifest") or ((manifest or {}).get("source") or {}).get("shards")
        if not listed:
            raise FadscaleError(f"samples {folder}: no run card names the real shards; set real.shards")
        shards = str(Path(listed).parent) if str(listed).endswith(".json") else str(listed)
    shards = Path(shards)
    size, channels = next(iter(generated.values())).shape[-1], next(iter(generated.values())).shape[1]
    real = load_real_tiles(shards, classes, split=cfg.real.split, image_size=size, channels=channels,
                           subset=cfg.real.subset, subset_seed=cfg.real.subset_seed,
                           max_per_class=cfg.real.max_per_class)
    model, card = load_expert(cfg.evaluator.card, device)
    log_line(f"evaluating {sum(len(t) for t in generated.values())} generated tiles from {folder} against "
             f"{sum(len(t) for t in real.values())} real {cfg.real.split} tiles with {card['arch']} "
             f"({card['_path']})", True)

    gen_x, gen_y = _stack(generated, classes)
    real_x, real_y = _stack(real, classes)
    gen_feat, gen_pred = evaluator_outputs(model, card, gen_x, device, cfg.evaluator.batch_size)
    real_feat, real_pred = evaluator_outputs(model, card, real_x, device, cfg.evaluator.batch_size)
    confusion = confusion_matrix(gen_y, gen_pred, len(classes))
    real_confusion = confusion_matrix(real_y, real_pred, len(classes))

    m = cfg.metrics
    diversity = {}
    for i, name in enumerate(classes):
        entry = {}
        for kind, tiles in (("generated", generated[name]), ("real", real[name])):
            entry[kind] = ssim_diversity(tiles, pairs=m.ssim_pairs, seed=cfg.run.seed * 1009 + i)["diversity"] \
                if len(tiles) >= 2 else None
        entry["pairs"] = m.ssim_pairs
        diversity[name] = entry
    mean_div = {kind: _mean([d[kind] for d in diversity.values()]) for kind in ("generated", "real")}

    distances = {"space": f"evaluator features ({card['arch']}, {card['feature_dim']}-d pooled)",
                 "overall": _distances(gen_feat, real_feat, m, cfg.run.seed),
                 "reference": reference_distances(model, card, shards, classes, generated, real_feat, m,
                                                  cfg.run.seed, device, cfg.evaluator.batch_size)}
    ref_frechet = distances["reference"].get("frechet")
    distances["frechet_ratio"] = distances["overall"]["frechet"] / ref_frechet \
        if ref_frechet and distances["overall"]["frechet"] is not None else None
    intensity = intensity_by_class(generated, real, shards, classes, size, channels)
    if m.per_class:
        distances["per_class"] = {name: _distances(gen_feat[gen_y == i], real_feat[real_y == i], m, cfg.run.seed + i)
                                  for i, name in enumerate(classes)}
    utility = {"computed": False, "reason": "utility.enabled is false"}
    if cfg.utility.enabled:
        budget = f"{cfg.utility.steps} steps" if cfg.utility.steps else f"{cfg.utility.epochs} epochs"
        log_line(f"utility: training 3 {cfg.utility.arch} classifiers ({budget} each)", True)
        utility = utility_scores(cfg, classes, generated, real, shards, device)

    warnings = []
    if independence["is_alignment_expert"]:
        warnings.append("the evaluator IS the alignment expert (evaluator.allow_alignment_expert): generation "
                        "accuracy is not an independent measure")
    elif not independence["alignment_expert_known"]:
        warnings.append("the alignment expert is unknown (no run card in the sample manifest, no "
                        "evaluator.alignment_expert): independence of the evaluator was not checked")
    report = {
        "format": REPORT_FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tool_version": __version__,
        "git_commit": git_commit(),
        "samples": {"path": str(folder.resolve()), "count": len(gen_x),
                    "per_class": {n: len(generated[n]) for n in classes},
                    "image": {"size": size, "channels": channels},
                    "run": (manifest or {}).get("run"), "sampler": (manifest or {}).get("sampler"),
                    "weights": (manifest or {}).get("weights"), "filter": (manifest or {}).get("filter")},
        "real": {"shards": str(shards.resolve()), "split": cfg.real.split, "subset": cfg.real.subset,
                 "count": len(real_x), "per_class": {n: len(real[n]) for n in classes}},
        "evaluator": {"card": card["_path"], "arch": card["arch"], "sha256": card["sha256"],
                      "card_val_accuracy": card.get("val_accuracy"), "selection": evaluator_selection(card, cfg),
                      **independence},
        "classes": classes,
        "generation_accuracy": {**accuracy_from_confusion(confusion, classes), "confusion": confusion.tolist()},
        "real_accuracy": {**accuracy_from_confusion(real_confusion, classes), "confusion": real_confusion.tolist()},
        "diversity": {"metric": "1 - mean SSIM over random pairs (torchmetrics SSIM, data_range 1)",
                      "pairs_per_class": m.ssim_pairs, "per_class": diversity, "mean": mean_div},
        "distances": distances,
        "intensity": intensity,
        "inception_fid": inception_fid(m.inception_weights, gen_x, real_x),
        "utility": utility,
        "warnings": warnings,
        "config": cfg.model_dump(mode="json"),
    }
    report = _clean(report)
    if write:
        with atomic_output_dir(out, overwrite=cfg.run.overwrite) as staging:
            _write_outputs(staging, report, confusion, classes, generated, real, cfg)
            save_config(cfg, staging / "config.yaml")
        log_line(f"wrote {out}: generation accuracy {report['generation_accuracy']['overall']:.3f}, "
                 f"Frechet distance {_fmt(distances['overall']['frechet'])}", True)
    return report


def _mean(values: list) -> float | None:
    kept = [v for v in values if v is not None and math.isfinite(v)]
    return sum(kept) / len(kept) if kept else None


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _write_outputs(folder: Path, report: dict, confusion: torch.Tensor, classes: list[str],
                   generated: dict[str, torch.Tensor], real: dict[str, torch.Tensor], cfg: EvaluateConfig) -> None:
    from fadscale.train_expert import save_confusion_png

    files = {"report": "report.json", "markdown": "report.md", "confusion": "confusion.png", "grids": {}}
    acc = report["generation_accuracy"]["overall"]
    save_confusion_png(confusion.double(), classes, folder / "confusion.png",
                       f"evaluator on generated tiles: accuracy {_fmt(acc)}")
    for name in classes:
        count = min(cfg.report.grid, len(generated[name]), len(real[name]))
        rel = f"grids/{class_dir_name(name)}.png"
        write_grid(list(real[name][:count]) + list(generated[name][:count]), folder / rel, rows=2)
        files["grids"][name] = rel
    report["files"] = files
    atomic_write_json(folder / "report.json", report)
    atomic_write_text(folder / "report.md", markdown_report(report))


def markdown_report(report: dict) -> str:
    classes = report["classes"]
    ev = report["evaluator"]
    lines = ["# fadscale evaluation", ""]
    run = report["samples"].get("run") or {}
    sampler = report["samples"].get("sampler") or {}
    lines.append(f"- samples: `{report['samples']['path']}` ({report['samples']['count']} tiles, "
                 f"{report['samples']['image']['size']} px)")
    if run:
        lines.append(f"- run: `{run.get('path')}` (method {run.get('method')}, step {run.get('step')})")
    if sampler:
        lines.append(f"- sampler: {sampler.get('scheduler')}, {sampler.get('steps')} steps, guidance "
                     f"{sampler.get('guidance')}; weights {(report['samples'].get('weights') or {}).get('used')}")
    lines.append(f"- real tiles: `{report['real']['shards']}` {report['real']['split']} split "
                 f"({report['real']['count']} tiles)")
    lines.append(f"- evaluator: {ev['arch']} `{ev['card']}` (sha256 {ev['sha256'][:12]}); "
                 + ("**the alignment expert itself (allowed by evaluator.allow_alignment_expert)**"
                    if ev["is_alignment_expert"] else
                    "independent of the alignment expert" if ev["alignment_expert_known"] else "alignment expert unknown"))
    if ev.get("selection"):
        lines.append(f"- evaluator weights: {ev['selection']}")
    for warning in report["warnings"]:
        lines.append(f"- warning: {warning}")
    lines += ["", "## Summary", "", "| metric | value |", "| --- | --- |"]
    overall = report["distances"]["overall"]
    div = report["diversity"]["mean"]
    rows = [("generation accuracy (evaluator top-1)", report["generation_accuracy"]["overall"]),
            ("evaluator accuracy on real tiles", report["real_accuracy"]["overall"]),
            ("SSIM diversity, generated (mean over classes)", div["generated"]),
            ("SSIM diversity, real (mean over classes)", div["real"]),
            ("Frechet distance (evaluator features)", overall["frechet"]),
            ("Frechet distance, real train vs real val (reference)", (report["distances"].get("reference") or {}).get("frechet")),
            ("Frechet ratio (generated / reference; 1 = as close as real tiles)", report["distances"].get("frechet_ratio")),
            ("KID (evaluator features)", overall["kid"]),
            ("precision", overall["precision"]), ("recall", overall["recall"])]
    fid = report["inception_fid"]
    rows.append(("Inception FID", fid["fid"] if fid.get("computed") else f"not computed: {fid['reason']}"))
    lines += [f"| {k} | {_fmt(v, 4)} |" for k, v in rows]
    intensity = (report.get("intensity") or {}).get("per_class") or {}
    lines += ["", "## Per class", "",
              "| class | gen. accuracy | real accuracy | intensity gen. | intensity real | gap | diversity gen. | "
              "diversity real | Frechet | KID | precision | recall |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    per_dist = report["distances"].get("per_class") or {}
    for name in classes:
        d = per_dist.get(name, {})
        level = intensity.get(name, {})
        lines.append("| " + " | ".join([name, _fmt(report["generation_accuracy"]["per_class"][name]),
                                         _fmt(report["real_accuracy"]["per_class"][name]),
                                         _fmt(level.get("generated")), _fmt(level.get("real")),
                                         _fmt(level.get("gap")),
                                         _fmt(report["diversity"]["per_class"][name]["generated"]),
                                         _fmt(report["diversity"]["per_class"][name]["real"]),
                                         _fmt(d.get("frechet"), 2), _fmt(d.get("kid"), 4),
                                         _fmt(d.get("precision"), 2), _fmt(d.get("recall"), 2)]) + " |")
    lines += ["", "## Utility (train on X, test on real)", ""]
    utility = report["utility"]
    if utility.get("computed"):
        budget = f"{utility['steps']} steps" if utility.get("steps") else f"{utility['epochs']} epochs"
        lines += [f"{utility['classifier']}, {budget} each, tested on {utility['test']['tiles']} real "
                  f"{utility['test']['split']} tiles.", "",
                  "| trained on | tiles | accuracy |", "| --- | --- | --- |"]
        for name, res in utility["setups"].items():
            lines.append(f"| {name} | {res['train_tiles']} | {_fmt(res['overall'])} |")
    else:
        lines.append(f"not computed: {utility.get('reason')}")
    lines += ["", "Confusion matrix: `confusion.png`; real (top row) vs generated (bottom row) tiles per class: "
              "`grids/<CLASS>.png`.", ""]
    return "\n".join(lines)


def report_value(report: dict, path: tuple) -> float | None:
    """A number from a report by its key path (e.g. ("distances", "overall", "frechet")); None if absent."""
    value = report
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def evaluate_samples(samples: str | Path, evaluator: str | Path, out_dir: str | Path | None = None,
                     **overrides) -> dict:
    """Library entry: evaluate a sample set with an evaluator card and return the report dict; writes the
    report folder when `out_dir` is given. Other settings as section__key=value, e.g.
    `evaluate_samples(s, card, out, utility__enabled=False, real__shards="runs/shards")`."""
    tree: dict = {"samples": str(samples), "evaluator": {"card": str(evaluator)}}
    if out_dir is not None:
        tree["run"] = {"out_dir": str(out_dir)}
    with_settings(tree, overrides)
    return evaluate(build_config(EvaluateConfig, tree, "evaluate_samples"), write=out_dir is not None)


def run(cfg: EvaluateConfig) -> int:
    evaluate(cfg)
    return 0


def main(argv=None) -> None:
    run_entry("evaluate", EvaluateConfig, run, argv)


if __name__ == "__main__":
    main()
