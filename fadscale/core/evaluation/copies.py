"""The copy check: are generated tiles nearer to the training tiles than unseen real tiles are?

A generator can score well on every fidelity figure by reproducing its training tiles. For each
generated tile we take the distance to its nearest real training tile; the same distance for each
held-out real tile (a part no model trained on) says how near an honest new tile of this distribution
falls. Its 5th percentile is the threshold, and the copy share is the share of generated tiles below
it: held-out tiles give 5% by construction, a generator that memorises gives far more.

Two spaces, since a copy may hide in either: pixels (L2 on [0, 1] values, the nearest over the 8
flips/rotations the training loader shows a tile, so a rotated copy counts as a copy) and the
evaluator's pooled features (cosine distance). The closest pairs are kept for the report's picture.
"""

from __future__ import annotations

import torch

from fadscale.data.loader import apply_view

QUANTILE = 0.05  # the threshold: the 5th percentile of held-out real tiles' nearest distances
VIEWS = 8


def nearest(query: torch.Tensor, bank: torch.Tensor, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(distance [N], index into bank [N]) of each query row's nearest bank row (Euclidean)."""
    distances, indices = [], []
    bank = bank.float()
    bank_sq = bank.pow(2).sum(1)
    for start in range(0, len(query), chunk):
        q = query[start:start + chunk].float()
        # |q - b|^2 = |q|^2 + |b|^2 - 2 q.b: one matrix product per chunk instead of N x M differences.
        squared = q.pow(2).sum(1, keepdim=True) + bank_sq[None, :] - 2.0 * q @ bank.T
        best, where = squared.clamp_min(0).min(1)
        distances.append(best.sqrt())
        indices.append(where)
    return torch.cat(distances), torch.cat(indices)


def _pixels(tiles: torch.Tensor) -> torch.Tensor:
    return tiles.float().div(255.0).flatten(1)


def _unit(features: torch.Tensor) -> torch.Tensor:
    features = features.float()
    return features / features.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _space(gen: torch.Tensor, held: torch.Tensor, bank: torch.Tensor, bank_tile: torch.Tensor) -> dict:
    gen_dist, gen_index = nearest(gen, bank)
    held_dist, _ = nearest(held, bank)
    threshold = float(torch.quantile(held_dist.double(), QUANTILE))
    return {"threshold": threshold,
            "share": float((gen_dist < threshold).double().mean()),
            "held_out_share": float((held_dist < threshold).double().mean()),
            "generated_median": float(gen_dist.median()), "held_out_median": float(held_dist.median()),
            "_distance": gen_dist, "_train_index": bank_tile[gen_index]}


def copy_check(generated: torch.Tensor, held_out: torch.Tensor, train: torch.Tensor, *,
               generated_features: torch.Tensor, held_out_features: torch.Tensor, train_features: torch.Tensor,
               closest: int = 8) -> dict:
    """The copy check of uint8 tiles [N, C, S, S] (generated, held-out real, real train) and their evaluator
    features. Returns the report's record: per space the threshold, the copy share, the held-out tiles'
    own share (about 5%: a check of the check) and medians; `share` is the larger of the two spaces';
    `closest` lists the generated tiles nearest to a training tile in pixels (index, train index,
    distance), for the picture."""
    views = torch.cat([apply_view(train, v) for v in range(VIEWS)])
    which = torch.arange(len(train)).repeat(VIEWS)
    pixels = _space(_pixels(generated), _pixels(held_out), _pixels(views), which)
    features = _space(_unit(generated_features), _unit(held_out_features), _unit(train_features),
                      torch.arange(len(train)))
    order = pixels["_distance"].argsort()[:closest]
    pairs = [{"generated": int(i), "train": int(pixels["_train_index"][i]), "distance": float(pixels["_distance"][i])}
             for i in order]
    public = {name: {k: v for k, v in space.items() if not k.startswith("_")}
              for name, space in (("pixels", pixels), ("features", features))}
    return {"what": "share of generated tiles nearer to a real training tile than 95% of held-out real tiles are "
                    "(pixels: L2 over the 8 flips/rotations; features: the evaluator's, cosine); held-out tiles "
                    "score 5% by construction",
            "quantile": QUANTILE, "train_tiles": len(train), "held_out_tiles": len(held_out),
            **public, "share": max(public["pixels"]["share"], public["features"]["share"]), "closest": pairs}
