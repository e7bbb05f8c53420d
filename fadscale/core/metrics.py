"""Sample-quality metrics on feature sets and image sets: the closed forms, in float64, with no downloads.

- `frechet_distance`: ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) between Gaussians fitted to two
  feature sets (FID's formula, in whatever feature space the caller chooses; here the evaluator's).
- `kernel_distance`: KID, the unbiased MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3,
  averaged over random subsets (Binkowski et al. 2018).
- `precision_recall`: k-NN manifold precision and recall (Kynkaanniemi et al. 2019).
- `ssim_diversity`: 1 - mean SSIM over random pairs of distinct images of one set (torchmetrics' SSIM).
- `orientation_coherence`: how strongly a tile's edges share one direction (fibres, streaks), from its
  gradient structure tensor; a fine-structure check that class accuracy and feature distances miss.

Every function is deterministic for a given `seed`.
"""

from __future__ import annotations

import math

import torch


def _as64(x) -> torch.Tensor:
    x = torch.as_tensor(x).detach().to("cpu", torch.float64)
    if x.ndim != 2:
        raise ValueError(f"expected a feature matrix [N, D], got shape {tuple(x.shape)}")
    return x


def _sqrtm_psd(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def gaussian_stats(features) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [D] and (unbiased) covariance [D, D] of a feature set, in float64."""
    x = _as64(features)
    if x.shape[0] < 2:
        raise ValueError(f"a covariance needs at least 2 feature vectors, got {x.shape[0]}")
    mu = x.mean(0)
    centred = x - mu
    return mu, centred.T @ centred / (x.shape[0] - 1)


def frechet_from_stats(mu_a, sigma_a, mu_b, sigma_b) -> float:
    """The Frechet distance between N(mu_a, sigma_a) and N(mu_b, sigma_b).

    Tr((S_a S_b)^1/2) is computed as the sum of square roots of the eigenvalues of the symmetric PSD
    matrix S_a^1/2 S_b S_a^1/2 (same spectrum as S_a S_b): stable for singular covariances (fewer
    samples than dimensions), where the product's eigenvalues would be complex from rounding.
    """
    mu_a, mu_b = torch.as_tensor(mu_a, dtype=torch.float64), torch.as_tensor(mu_b, dtype=torch.float64)
    sigma_a, sigma_b = torch.as_tensor(sigma_a, dtype=torch.float64), torch.as_tensor(sigma_b, dtype=torch.float64)
    root_a = _sqrtm_psd(sigma_a)
    middle = root_a @ sigma_b @ root_a
    eigen = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0)
    value = (mu_a - mu_b).square().sum() + sigma_a.trace() + sigma_b.trace() - 2 * eigen.sqrt().sum()
    return max(float(value), 0.0)


def frechet_distance(features_a, features_b) -> float:
    return frechet_from_stats(*gaussian_stats(features_a), *gaussian_stats(features_b))


def _mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> float:
    d = x.shape[1]
    kxx = (x @ x.T / d + 1) ** 3
    kyy = (y @ y.T / d + 1) ** 3
    kxy = (x @ y.T / d + 1) ** 3
    m, n = x.shape[0], y.shape[0]
    term_x = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    term_y = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return float(term_x + term_y - 2 * kxy.mean())


def kernel_distance(features_a, features_b, *, subsets: int = 50, subset_size: int = 1000,
                    seed: int = 0) -> tuple[float, float]:
    """KID: (mean, std) of the unbiased MMD^2 over `subsets` random subsets of `subset_size` from each set
    (the subset size is capped by the smaller set; at least 2 vectors per set are needed)."""
    x, y = _as64(features_a), _as64(features_b)
    size = min(subset_size, x.shape[0], y.shape[0])
    if size < 2:
        raise ValueError(f"KID needs at least 2 feature vectors per set, got {x.shape[0]} and {y.shape[0]}")
    gen = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        ix = torch.randperm(x.shape[0], generator=gen)[:size]
        iy = torch.randperm(y.shape[0], generator=gen)[:size]
        values.append(_mmd2_unbiased(x[ix], y[iy]))
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std(unbiased=False)) if len(values) > 1 else 0.0


def _kth_radius(x: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each vector of x to its k-th nearest neighbour in x (itself excluded)."""
    dist = torch.cdist(x, x)
    return dist.kthvalue(k + 1, dim=1).values  # the 1st smallest is the point itself (distance 0)


def precision_recall(real, fake, *, k: int = 3) -> dict:
    """Improved precision and recall (Kynkaanniemi et al. 2019).

    precision: the fraction of fake vectors inside the real manifold (the union of balls around each
    real vector with radius its k-th nearest real neighbour); recall: the fraction of real vectors
    inside the fake manifold. k is capped at (set size - 1).
    """
    r, f = _as64(real), _as64(fake)
    k_used = min(k, r.shape[0] - 1, f.shape[0] - 1)
    if k_used < 1:
        raise ValueError(f"precision/recall need at least 2 vectors per set, got {r.shape[0]} and {f.shape[0]}")
    radius_r, radius_f = _kth_radius(r, k_used), _kth_radius(f, k_used)
    cross = torch.cdist(f, r)  # [fake, real]
    precision = (cross <= radius_r.unsqueeze(0)).any(dim=1).double().mean()
    recall = (cross.T <= radius_f.unsqueeze(0)).any(dim=1).double().mean()
    return {"precision": float(precision), "recall": float(recall), "k": k_used}


def random_pairs(n: int, pairs: int, seed: int = 0) -> torch.Tensor:
    """[P, 2] index pairs (i != j) drawn with a seeded generator; every pair once when n(n-1)/2 <= P."""
    if n < 2:
        raise ValueError(f"pairs need at least 2 images, got {n}")
    total = n * (n - 1) // 2
    if total <= pairs:
        return torch.combinations(torch.arange(n), 2)
    gen = torch.Generator().manual_seed(seed)
    first = torch.randint(0, n, (pairs,), generator=gen)
    offset = torch.randint(1, n, (pairs,), generator=gen)
    return torch.stack([first, (first + offset) % n], dim=1)


def _ssim_kernel(size: int) -> int:
    kernel = min(11, size)
    return kernel if kernel % 2 == 1 else kernel - 1


def ssim_diversity(images: torch.Tensor, *, pairs: int = 64, seed: int = 0, batch_size: int = 64) -> dict:
    """1 - mean SSIM over random pairs of distinct images: 0 for copies, larger for a more varied set.

    `images`: [N, C, H, W], uint8 (0..255) or float in [0, 1]. SSIM is torchmetrics' (Gaussian window,
    data_range 1), with the window shrunk for tiles smaller than 11 px.
    """
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    index = random_pairs(x.shape[0], pairs, seed)
    kernel = _ssim_kernel(min(x.shape[-2:]))
    scores = []
    for start in range(0, len(index), batch_size):
        chunk = index[start:start + batch_size]
        scores.append(ssim(x[chunk[:, 0]].double(), x[chunk[:, 1]].double(), data_range=1.0,
                           kernel_size=kernel, reduction="none"))
    mean = float(torch.cat(scores).mean())
    return {"diversity": 1.0 - mean, "mean_ssim": mean, "pairs": len(index)}


def orientation_coherence(images: torch.Tensor) -> float:
    """Mean over tiles of the tile-level orientation coherence, (l1 - l2) / (l1 + l2) of the gradient
    structure tensor summed over the tile (channels averaged first): 1 when every edge runs one way
    (parallel fibres), near 0 for isotropic texture or noise. `images`: [N, C, H, W], uint8 or float.

    Why: at 32 px a model can get a class's brightness and texture statistics right (high generation
    accuracy, a small Frechet distance) and still draw stroma without its oriented fibres; this says so.
    """
    x = images.double().mean(dim=1)
    gy, gx = torch.gradient(x, dim=(1, 2))
    jxx, jyy, jxy = (gx * gx).mean((1, 2)), (gy * gy).mean((1, 2)), (gx * gy).mean((1, 2))
    spread = torch.sqrt((jxx - jyy) ** 2 + 4 * jxy ** 2)
    energy = jxx + jyy
    coherence = torch.where(energy > 0, spread / energy.clamp_min(1e-300), torch.zeros_like(energy))
    return float(coherence.mean())


def confusion_matrix(true: torch.Tensor, predicted: torch.Tensor, classes: int) -> torch.Tensor:
    """[true, predicted] counts (int64)."""
    flat = true.long() * classes + predicted.long()
    return torch.bincount(flat, minlength=classes * classes).view(classes, classes)


def wilson_interval(successes: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95% at z = 1.96): where a classifier's accuracy on the source of
    `total` tiles lies, given `successes` right on these. Unlike p +- z SE it stays inside [0, 1] near the ends."""
    if total == 0:
        return math.nan, math.nan
    p = successes / total
    spread = z * z / total
    centre = (p + spread / 2) / (1 + spread)
    half = z * math.sqrt(p * (1 - p) / total + spread / (4 * total)) / (1 + spread)
    return centre - half, centre + half


def accuracy_from_confusion(confusion: torch.Tensor, names: list[str]) -> dict:
    """Overall and per-class top-1 accuracy, the count, and the overall accuracy's 95% interval (`interval95`:
    how far another draw of as many tiles could move it)."""
    rows = confusion.sum(1)
    per_class = {name: (float(confusion[i, i] / rows[i]) if rows[i] else math.nan) for i, name in enumerate(names)}
    total = int(confusion.sum())
    right = int(confusion.diag().sum())
    return {"overall": right / total if total else math.nan, "per_class": per_class, "count": total,
            "interval95": list(wilson_interval(right, total))}
