"""Feature alignment: capture a UNet feature during the forward pass, project, and score it against the expert.

Two projectors (architecture doc):
- `seed`: the reference. The expert's pooled feature goes through a trainable Linear(D_expert -> C_unet);
  the UNet feature is average-pooled; loss = 1 - cosine. Because the target is learned it can collapse
  (see `target_similarity`); `center_target` (an option, off for parity) subtracts a running mean of the
  expert features and drops the Linear's bias, so no constant target exists for it to collapse onto; the
  Linear can still learn a rank-one map (every target on one line), which `top_direction_share` shows.
- `repa`: REPA (Yu et al. 2024). A small MLP (1x1 convs) maps the UNet feature at every location to the
  expert's width; loss = 1 - cosine per location against the expert's spatial map, on the coarser of the two
  grids (the finer side averaged down; a map is never upsampled, which would invent detail the expert did
  not see).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fadscale.core.objective import cosine_alignment_loss
from fadscale.errors import FadscaleError


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


def _cosine_loss(prediction: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """1 - cosine (per sample, or per location of a map), and detached diagnostics to log."""
    loss, cosine = cosine_alignment_loss(prediction, target)
    diagnostics = {"align/cosine": cosine}
    if target.shape[0] > 1:
        diagnostics["align/target_similarity"] = target_similarity(target)
    return loss, diagnostics


def target_similarity(target: torch.Tensor) -> torch.Tensor:
    """Mean cosine between the targets of different tiles in a batch (each flattened to one vector).

    Near 1 the alignment loss cannot tell tiles apart. The seed projector learns its target
    (Linear(expert) -> UNet channels), and it can collapse every tile onto one direction, which the
    pooled UNet feature matches at no cost: the loss then falls to ~0 and asks nothing of the UNet
    (docs/results/fad-vs-vanilla-procedural.md measured it).
    """
    unit = F.normalize(target.detach().float().flatten(1), dim=1)
    n = unit.shape[0]
    gram = unit @ unit.T
    return (gram.sum() - gram.diagonal().sum()) / (n * (n - 1))


def top_direction_share(targets: torch.Tensor) -> float:
    """The collapse diagnostic: the share of the unit-normalised targets' second moment (not centred) that
    lies along its top principal direction, over many tiles (>= 256 in the run card).

    1.0: every tile's target points one way (or its opposite), so a cosine loss asks the same of every
    tile; ~1/D for directions spread over D dimensions. Unlike the in-batch cosine of a centred target
    (about -1/(n-1) whatever it holds), it is high for a target collapsed onto a line through the origin.
    """
    unit = F.normalize(targets.detach().float().flatten(1), dim=1)
    gram = unit @ unit.T / unit.shape[0]  # n x n: the same non-zero eigenvalues as the D x D second moment
    eigenvalues = torch.linalg.eigvalsh(gram.double())
    return float(eigenvalues[-1] / eigenvalues.sum())


class SeedProjector(nn.Module):
    """Expert pooled feature [B, D] -> UNet channels; compared with the pooled UNet feature.

    With `center`, the expert feature minus its running mean (a buffer, updated in training mode)
    goes through a Linear without bias: the target then has zero mean over tiles and carries only
    what tells tiles apart.
    """

    needs_spatial = False

    def __init__(self, expert_dim: int, unet_channels: int, center: bool = False):
        super().__init__()
        self.center = center
        self.proj = nn.Linear(expert_dim, unet_channels, bias=not center)
        if center:
            self.register_buffer("feature_mean", torch.zeros(expert_dim))
            self.register_buffer("batches_seen", torch.zeros((), dtype=torch.long))

    def forward(self, unet_feature: torch.Tensor, expert_feature: torch.Tensor):
        pooled = unet_feature.mean(dim=(2, 3))
        # Inputs in the projector's dtype: fp32 normally, bf16 when DeepSpeed keeps bf16 weights.
        expert_feature = expert_feature.to(self.proj.weight.dtype)
        if self.center and self.training:
            with torch.no_grad():  # a cumulative mean at first, then an EMA over the last ~100 batches
                self.batches_seen += 1
                rate = max(1.0 / float(self.batches_seen), 0.01)
                self.feature_mean.lerp_(expert_feature.float().mean(0).to(self.feature_mean.dtype), rate)
        return _cosine_loss(pooled, self.targets(expert_feature))

    def targets(self, expert_feature: torch.Tensor) -> torch.Tensor:
        """What the pooled UNet feature is pulled towards, per tile [B, C]."""
        expert_feature = expert_feature.to(self.proj.weight.dtype)
        if self.center:
            expert_feature = expert_feature - self.feature_mean.to(expert_feature.dtype)
        return self.proj(expert_feature)


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
        grid = tuple(min(p, t) for p, t in zip(prediction.shape[-2:], expert_map.shape[-2:]))
        if tuple(prediction.shape[-2:]) != grid:  # a coarser expert map: average the prediction onto its grid
            prediction = F.adaptive_avg_pool2d(prediction, grid)
        return _cosine_loss(prediction, self.targets(expert_map, grid))

    @staticmethod
    def targets(expert_map: torch.Tensor, grid: tuple[int, int] | torch.Size | None = None) -> torch.Tensor:
        """The expert's map on the compared grid [B, D, h, w]: fixed, nothing learned in it. A finer map is
        averaged down to the UNet's grid; a coarser one is never upsampled (the prediction is pooled instead)."""
        if grid is None or expert_map.shape[-2:] == tuple(grid):
            return expert_map.float()
        return F.adaptive_avg_pool2d(expert_map.float(), tuple(grid))


def build_projector(kind: str, expert_dim: int, feature_shape: torch.Size, hidden: int, layer: str,
                    center_target: bool = False) -> nn.Module:
    """Size the projector from the aligned layer's output shape; refuse shapes it cannot take."""
    if len(feature_shape) != 4:
        raise FadscaleError(
            f"align.layer {layer!r}: output shape {tuple(feature_shape)} is not a [B, C, H, W] feature map; "
            f"the {kind} projector needs one"
        )
    channels = int(feature_shape[1])
    if kind == "seed":
        return SeedProjector(expert_dim, channels, center=center_target)
    return RepaProjector(expert_dim, channels, hidden)
