"""The optimizer both trainers build from their `optim` section: AdamW, or StableAdamW (AdamW with update
clipping, from the optimi package).

Why update clipping: Adam divides each step by the root of a running mean of squared gradients. After a
quiet stretch that mean is small, so one outlier batch can move a tensor by up to (1 - beta1) / sqrt(1 -
beta2) learning rates (3.2 at beta2 0.999); clipping the global gradient norm does not bound that.
StableAdamW (Wortsman et al. 2023) divides a tensor's learning rate by the RMS of g^2 / v when that is
above 1, and is otherwise AdamW up to how it corrects the moments' start-up bias (optimi debiases the betas).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.optim import Optimizer


def make_optimizer(params: Iterable[torch.nn.Parameter], optim, device: torch.device) -> Optimizer:
    """`optim` is an OptimSection (name, lr, betas, weight_decay)."""
    if optim.name == "stableadamw":
        from optimi import StableAdamW

        # eps as AdamW's (optimi's default is 1e-6). optimi picks its Triton kernels whenever Triton is
        # installed, which fails without a GPU: ask for them on CUDA only.
        return StableAdamW(params, lr=optim.lr, betas=optim.betas, eps=1e-8, weight_decay=optim.weight_decay,
                           triton=device.type == "cuda")
    fused = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(params, lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay, **fused)
