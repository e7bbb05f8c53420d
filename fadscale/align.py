"""Feature alignment: capture a UNet feature during the forward pass, project, and score it against the expert.

Two projectors (architecture doc):
- `seed`: the reference. The expert's pooled feature goes through a trainable Linear(D_expert -> C_unet);
  the UNet feature is average-pooled; loss = 1 - cosine.
- `repa`: REPA (Yu et al. 2024). A small MLP (1x1 convs) maps the UNet feature at every location to the
  expert's width; loss = 1 - cosine per location against the expert's spatial map resized to the UNet grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fadscale.runtime.io import FadscaleError


class FeatureTap:
    """Keeps the output of one module from the forward pass.

    Under gradient checkpointing the module runs again during backward (recomputation) and its hooks
    fire again. Only the capture made between `arm()` and the first firing is kept, so the feature used
    in the loss is the one from the real forward pass, which is part of the autograd graph.
    """

    def __init__(self, module: nn.Module):
        self._armed = False
        self._value: torch.Tensor | None = None
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, _module, _inputs, output):
        if self._armed:
            self._value, self._armed = output, False
        return None  # returning a value would replace the module's output

    def arm(self) -> None:
        self._armed, self._value = True, None

    def pop(self) -> torch.Tensor:
        if self._value is None:
            raise RuntimeError("the aligned layer did not run in this forward pass")
        value, self._value = self._value, None
        return value

    def remove(self) -> None:
        self._handle.remove()


def _cosine_loss(prediction: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cos = F.cosine_similarity(prediction.float(), target.float(), dim=1)
    return (1.0 - cos).mean(), cos.mean().detach()


class SeedProjector(nn.Module):
    """Expert pooled feature [B, D] -> UNet channels; compared with the pooled UNet feature."""

    needs_spatial = False

    def __init__(self, expert_dim: int, unet_channels: int):
        super().__init__()
        self.proj = nn.Linear(expert_dim, unet_channels)

    def forward(self, unet_feature: torch.Tensor, expert_feature: torch.Tensor):
        pooled = unet_feature.mean(dim=(2, 3))
        # Inputs in the projector's dtype: fp32 normally, bf16 when DeepSpeed keeps bf16 weights.
        return _cosine_loss(pooled, self.proj(expert_feature.to(self.proj.weight.dtype)))


class RepaProjector(nn.Module):
    """UNet feature [B, C, h, w] -> expert width at each location; compared with the expert's spatial map."""

    needs_spatial = True

    def __init__(self, expert_dim: int, unet_channels: int, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Conv2d(unet_channels, hidden, 1), nn.SiLU(),
            nn.Conv2d(hidden, hidden, 1), nn.SiLU(),
            nn.Conv2d(hidden, expert_dim, 1),
        )

    def forward(self, unet_feature: torch.Tensor, expert_map: torch.Tensor):
        prediction = self.mlp(unet_feature.to(self.mlp[0].weight.dtype))
        target = F.interpolate(expert_map.float(), size=prediction.shape[-2:], mode="bilinear",
                               align_corners=False, antialias=True) \
            if expert_map.shape[-2:] != prediction.shape[-2:] else expert_map.float()
        return _cosine_loss(prediction, target)


def build_projector(kind: str, expert_dim: int, feature_shape: torch.Size, hidden: int, layer: str) -> nn.Module:
    """Size the projector from the aligned layer's output shape; refuse shapes it cannot take."""
    if len(feature_shape) != 4:
        raise FadscaleError(
            f"align.layer {layer!r}: output shape {tuple(feature_shape)} is not a [B, C, H, W] feature map; "
            f"the {kind} projector needs one"
        )
    channels = int(feature_shape[1])
    if kind == "seed":
        return SeedProjector(expert_dim, channels)
    return RepaProjector(expert_dim, channels, hidden)
