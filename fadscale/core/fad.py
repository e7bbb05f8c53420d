"""Feature-aligned diffusion as a model and one objective.

`FadModel` is the trainable whole: UNet, class conditioning and (FAD only) the alignment projector, one
module so that DDP and DeepSpeed wrap and synchronise every trainable part together. `FadObjective` is the
whole loss of one batch, read top to bottom:

    noise the tile at drawn timesteps (low-noise draw T u^p, label drop for guidance)
    -> the expert target: cached for this tile and view, or the expert on a noisy input every step
    -> one UNet forward that also yields the aligned layer's feature
    -> loss = mean mse(prediction, epsilon or v) [x min-SNR weights] + align.weight x (1 - cosine)
"""

from __future__ import annotations

import torch
from torch import nn

from fadscale.core.align import FeatureTap
from fadscale.core.conditioning import ClassConditioning
from fadscale.core.models.expert import expert_input
from fadscale.core.models.unet import get_module, uses_class_labels
from fadscale.core.objective import Noised, add_noise, min_snr_weights, noise_loss, reference_noisy, total_loss


class FadModel(nn.Module):
    """UNet + class conditioning + (optional) alignment projector; the alignment loss is part of the forward."""

    def __init__(self, unet: nn.Module, conditioning: ClassConditioning, projector: nn.Module | None, layer: str):
        super().__init__()
        self.unet, self.conditioning, self.projector = unet, conditioning, projector
        self.tap = FeatureTap(get_module(unet, layer)) if projector is not None else None

    def forward(self, noisy, timesteps, labels, drop, expert_target=None):
        tokens = self.conditioning(labels, drop)
        class_labels = self.conditioning.labels(labels, drop) if uses_class_labels(self.unet) else None
        if self.tap is not None:
            self.tap.arm()
        prediction = self.unet(noisy, timesteps, tokens, class_labels=class_labels).sample
        if self.tap is None:
            return prediction, None, None
        feature = self.tap.pop()
        if expert_target is None:  # alignment switched off for this step (align.until_step)
            return prediction, None, None
        align_loss, diagnostics = self.projector(feature, expert_target)
        return prediction, align_loss, diagnostics


class FadObjective:
    """The loss of one batch from a FadConfig's `noise`, `align` and `train` settings.

    `online_expert` (align.target noisy-online / noisy-reference) sees a noisy tile every step: the UNet's
    own input (noisy-online), or the reference's x_t of the same tile, noise and timestep in its [0, 1]
    range, unnormalised, at the tile's size (noisy-reference). Otherwise the target comes from the batch
    (the feature cache: `pooled`, or `spatial` for the repa projector)."""

    def __init__(self, cfg, scheduler, expert_card: dict | None = None, online_expert: nn.Module | None = None,
                 spatial: bool = False):
        self.noise, self.align, self.train = cfg.noise, cfg.align, cfg.train
        self.scheduler, self.card, self.online_expert = scheduler, expert_card, online_expert
        self.target_key = "spatial" if spatial else "pooled"

    def __call__(self, model: nn.Module, clean: torch.Tensor, labels: torch.Tensor, batch: dict, step: int,
                 generator: torch.Generator, dtype: torch.dtype, channels_last: bool = False):
        noised = add_noise(self.scheduler, clean, generator, label_dropout=self.train.label_dropout,
                           prediction_type=self.noise.prediction_type,
                           input_perturbation=self.noise.input_perturbation, timestep_power=self.noise.timestep_power)
        noisy = noised.noisy.to(dtype)
        if channels_last:
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        target = self.expert_target(batch, noisy, step, clean, noised)
        prediction, align_loss, diagnostics = model(noisy, noised.timesteps, labels, noised.drop, target)
        weights = min_snr_weights(self.scheduler.alphas_cumprod, noised.timesteps, self.noise.min_snr_gamma,
                                  self.noise.prediction_type) if self.noise.min_snr_gamma else None
        noise = noise_loss(prediction, noised.target, weights)
        loss = total_loss(noise, align_loss, self.align.weight)
        metrics = {"loss/noise": noise.item(), "loss/total": loss.item()}
        if align_loss is not None:
            metrics.update({"loss/align": align_loss.item(), **{k: v.item() for k, v in diagnostics.items()}})
        return loss, metrics

    def expert_target(self, batch: dict, noisy: torch.Tensor, step: int, clean: torch.Tensor,
                      noised: Noised) -> torch.Tensor | None:
        align = self.align
        if not align.enabled or (align.until_step is not None and step >= align.until_step):
            return None
        if align.target == "cached":
            return batch[self.target_key].to(noisy.device)
        with torch.no_grad():
            if align.target == "noisy-reference":  # the reference's own x_t (in [0, 1]), mapped to [-1, 1]
                seen = reference_noisy(self.scheduler, clean, noised.noise, noised.timesteps) * 2 - 1
            else:
                seen = noisy.float()
            return self.online_expert.features(self.expert_input(seen))

    def expert_input(self, images: torch.Tensor) -> torch.Tensor:
        """Tiles in [-1, 1] -> the online expert's input. noisy-online: the expert's own (size, channels and
        normalisation from its card). noisy-reference: the reference's: the tile at its own size, in [0, 1],
        not normalised (the expert's BatchNorm stays in train mode, as the reference leaves it)."""
        if self.align.target == "noisy-online":
            return expert_input(images, self.card)
        plain = {**self.card, "input_size": images.shape[-1],
                 "normalization": {"mean": [0.0] * self.card["in_chans"], "std": [1.0] * self.card["in_chans"]}}
        return expert_input(images, plain)
