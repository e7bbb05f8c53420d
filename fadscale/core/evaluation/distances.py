"""Distances between generated and real tiles in the evaluator's feature space (Frechet, KID, precision and
recall), the same for real train tiles as the reference a perfect generator would score, per-class mean
intensity and orientation coherence, and Inception FID when local weights are given."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from fadscale.core.evaluation.inputs import evaluator_outputs, stack_tiles
from fadscale.core.metrics import frechet_distance, kernel_distance, orientation_coherence, precision_recall
from fadscale.errors import FadscaleError

if TYPE_CHECKING:
    from fadscale.config import MetricsSection


def feature_distances(fake: torch.Tensor, real: torch.Tensor, m: MetricsSection, seed: int) -> dict:
    out: dict = {"generated": len(fake), "real": len(real)}
    if len(fake) < 2 or len(real) < 2:
        return {**out, "frechet": None, "kid": None, "kid_std": None, "precision": None, "recall": None}
    kid, kid_std = kernel_distance(fake, real, subsets=m.kid_subsets, subset_size=m.kid_subset_size, seed=seed)
    pr = precision_recall(real, fake, k=m.pr_k)
    return {**out, "frechet": frechet_distance(fake, real), "kid": kid, "kid_std": kid_std,
            "precision": pr["precision"], "recall": pr["recall"], "k": pr["k"]}


def reference_distances(model: nn.Module, card: dict, train: dict[str, torch.Tensor], classes: list[str],
                        generated: dict[str, torch.Tensor], real_feat: torch.Tensor, m: MetricsSection, seed: int,
                        device: torch.device, batch_size: int) -> dict:
    """The same distances for real train tiles against the scored real tiles: what a generator that drew
    from the real distribution would score. As many train tiles per class as there are generated ones
    (the first by key), so both rows carry the same small-sample bias."""
    wanted = max(len(tiles) for tiles in generated.values())
    train_x, _ = stack_tiles({name: tiles[:wanted] for name, tiles in train.items()}, classes)
    train_feat, _ = evaluator_outputs(model, card, train_x, device, batch_size)
    return {"what": "real train tiles (as many per class as generated, first by key) vs the scored real tiles",
            **feature_distances(train_feat, real_feat, m, seed)}


def _channel_means(tiles: torch.Tensor) -> list[float]:
    return (tiles.float().mean(dim=(0, 2, 3)) / 255.0).tolist()


def intensity_by_class(generated: dict[str, torch.Tensor], real_scored: dict[str, torch.Tensor],
                       train: dict[str, torch.Tensor], classes: list[str]) -> dict:
    """Mean pixel intensity (0..1) per class of the generated tiles and of the real tiles (train + the scored
    split, the closest estimate of the class's own), and the gap; the scored split's own mean beside it.
    For colour tiles also each channel's mean (R, G, B) and its gap: H&E is told apart by its hues, and a
    grey-level match can hide a wrong stain colour."""
    per_class = {}
    for name in classes:
        real_all = torch.cat([train[name], real_scored[name]])
        gen = float(generated[name].float().mean() / 255.0)
        real = float(real_all.float().mean() / 255.0)
        gen_rgb, real_rgb = _channel_means(generated[name]), _channel_means(real_all)
        per_class[name] = {"generated": gen, "real": real, "real_val": float(real_scored[name].float().mean() / 255.0),
                           "gap": gen - real, "real_tiles": len(real_all),
                           "channels_generated": gen_rgb, "channels_real": real_rgb,
                           "channel_gap": [g - r for g, r in zip(gen_rgb, real_rgb)]}
    return {"what": "mean pixel intensity (0..1), and per channel; real: all real tiles of the class (train + the "
                    "scored split)",
            "per_class": per_class, "max_abs_gap": max(abs(v["gap"]) for v in per_class.values()),
            "max_abs_channel_gap": max(abs(g) for v in per_class.values() for g in v["channel_gap"])}


def orientation_by_class(generated: dict[str, torch.Tensor], real_scored: dict[str, torch.Tensor],
                         classes: list[str]) -> dict:
    """Orientation coherence (0..1, metrics.orientation_coherence) per class of the generated and the scored
    real tiles: oriented structure such as stroma's fibres, which accuracy and distances do not see."""
    per_class = {}
    for name in classes:
        gen = orientation_coherence(generated[name]) if len(generated[name]) else None
        real = orientation_coherence(real_scored[name]) if len(real_scored[name]) else None
        per_class[name] = {"generated": gen, "real": real,
                           "gap": gen - real if gen is not None and real is not None else None}
    return {"what": "orientation coherence of the gradient structure tensor (1: all edges one way, ~0: "
                    "isotropic); real: the scored real tiles", "per_class": per_class}


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


