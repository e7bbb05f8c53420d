"""Distances between generated and real tiles in the evaluator's feature space (Frechet, KID, precision and
recall), the same for real train tiles as the reference a perfect generator would score, per-class mean
intensity and orientation coherence, and Inception FID when local weights are given."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from fadscale.evaluation.inputs import evaluator_outputs, load_real_tiles, stack_tiles
from fadscale.metrics import frechet_distance, kernel_distance, orientation_coherence, precision_recall
from fadscale.runtime.io import FadscaleError

if TYPE_CHECKING:
    from fadscale.evaluate import MetricsSection


def feature_distances(fake: torch.Tensor, real: torch.Tensor, m: MetricsSection, seed: int) -> dict:
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
    train_x, _ = stack_tiles(train, classes)
    train_feat, _ = evaluator_outputs(model, card, train_x, device, batch_size)
    return {"what": "real train tiles (as many per class as generated, first by key) vs the real val tiles",
            **feature_distances(train_feat, real_feat, m, seed)}


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


def orientation_by_class(generated: dict[str, torch.Tensor], real_val: dict[str, torch.Tensor],
                         classes: list[str]) -> dict:
    """Orientation coherence (0..1, metrics.orientation_coherence) per class of the generated and the real
    val tiles: oriented structure such as stroma's fibres, which accuracy and distances do not see."""
    per_class = {}
    for name in classes:
        gen = orientation_coherence(generated[name]) if len(generated[name]) else None
        real = orientation_coherence(real_val[name]) if len(real_val[name]) else None
        per_class[name] = {"generated": gen, "real": real,
                           "gap": gen - real if gen is not None and real is not None else None}
    return {"what": "orientation coherence of the gradient structure tensor (1: all edges one way, ~0: "
                    "isotropic); real: the real val tiles", "per_class": per_class}


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


