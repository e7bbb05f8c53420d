"""The FAD objective as plain functions of tensors: noise sampling, the epsilon / v targets, min-SNR
weights, the noise loss and the alignment (cosine) loss. The FAD task's step (train_fad.FadTask) is
built from these, and tools/bench_step.py times that same step.

    loss = mean_b( w_b * mse(unet(noisy_b, t_b, class_b), target_b) ) + align.weight * (1 - cos(feature, expert))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def step_generator(seed: int, micro_step: int, rank: int) -> torch.Generator:
    """The randomness of one micro-batch, from (seed, micro-step, rank) alone: a resumed run draws the same
    noise, timesteps and label drops as an uninterrupted one."""
    return torch.Generator().manual_seed(seed * 1_000_003 + micro_step * 1_009 + rank)


@dataclass
class Noised:
    noisy: torch.Tensor  # the UNet's input
    timesteps: torch.Tensor  # [B] long
    target: torch.Tensor  # what the UNet predicts: the noise (epsilon) or the velocity (v)
    drop: torch.Tensor  # [B] bool: the class replaced by the null class (classifier-free guidance)
    noise: torch.Tensor | None = None  # the noise mixed into the input (with any input perturbation)


def add_noise(scheduler, clean: torch.Tensor, generator: torch.Generator, *, label_dropout: float = 0.0,
              prediction_type: str = "epsilon", input_perturbation: float = 0.0,
              timestep_power: float = 1.0) -> Noised:
    """Noise a batch of clean tiles (or latents) at drawn timesteps with a diffusers DDPM scheduler; all
    random draws come from `generator` (on the CPU, then moved to the batch's device).

    `timestep_power` p draws t = T u^p for uniform u (p = 1: the plain uniform draw, bit for bit as before).

    `input_perturbation` > 0 noises the input with noise + p * fresh noise while the target keeps the
    plain noise: the UNet learns to correct inputs that are slightly off, as its own samples are."""
    device, batch = clean.device, clean.shape[0]
    noise = torch.randn(clean.shape, generator=generator).to(device)
    steps = scheduler.config.num_train_timesteps
    if timestep_power == 1.0:
        timesteps = torch.randint(0, steps, (batch,), generator=generator).to(device)
    else:  # t = T u^p: p > 1 puts more of the batch at low noise, where fine structure is learned
        u = torch.rand(batch, generator=generator)
        timesteps = (steps * u.pow(timestep_power)).long().clamp(max=steps - 1).to(device)
    drop = (torch.rand(batch, generator=generator) < label_dropout).to(device)
    noised_with = noise
    if input_perturbation:
        noised_with = noise + input_perturbation * torch.randn(clean.shape, generator=generator).to(device)
    noisy = scheduler.add_noise(clean, noised_with, timesteps)
    target = noise if prediction_type == "epsilon" else scheduler.get_velocity(clean, noise, timesteps)
    return Noised(noisy, timesteps, target, drop, noised_with)


def random_crops(images: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """A random size x size window of each image [B, C, H, W] (patch training), positions drawn from `generator`."""
    batch, _, height, width = images.shape
    top = torch.randint(0, height - size + 1, (batch,), generator=generator).tolist()
    left = torch.randint(0, width - size + 1, (batch,), generator=generator).tolist()
    return torch.stack([images[i, :, t:t + size, l:l + size] for i, (t, l) in enumerate(zip(top, left))])


def reference_noisy(scheduler, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The noisy tile the reference's expert sees for the same clean tile, noise and timestep. The reference
    diffuses pixels in [0, 1], so its x_t = sqrt(a) x0 + sqrt(1 - a) eps with x0 in [0, 1]: the full noise
    amplitude around a [0, 1] tile, where (x_t + 1) / 2 of a [-1, 1] diffusion halves the noise and shifts it."""
    alphas = scheduler.alphas_cumprod.to(clean.device, torch.float32)[timesteps].view(-1, *([1] * (clean.ndim - 1)))
    return alphas.sqrt() * (clean.float() + 1) / 2 + (1 - alphas).sqrt() * noise.float()


def min_snr_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float,
                    prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023): min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v."""
    alphas = alphas_cumprod.to(timesteps.device)[timesteps]
    snr = alphas / (1 - alphas)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr


def noise_loss(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error per sample (over channels and pixels), optionally weighted, then averaged."""
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(dim=1)
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean()


def cosine_alignment_loss(prediction: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(1 - cosine similarity along dim 1, averaged over samples and locations; the mean cosine, detached)."""
    cos = F.cosine_similarity(prediction.float(), target.float(), dim=1)
    return (1.0 - cos).mean(), cos.mean().detach()


def total_loss(noise: torch.Tensor, align: torch.Tensor | None, weight: float) -> torch.Tensor:
    return noise if align is None else noise + weight * align
