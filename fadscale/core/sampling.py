"""Reverse diffusion with diffusers schedulers: the one sampling loop used by training grids and `fadscale sample`.

Every image has its own seed, so a sample set is the same whatever the batch size or number of ranks.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

# The step-noise rule lives in the exported pipeline's module (which may import nothing of fadscale), so the
# two make the same tile from the same seed.
from fadscale.artifacts.hub_pipeline import denoise_step, draws_step_noise, step_seed
from fadscale.core.models.unet import uses_class_labels

SCHEDULERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpm++": DPMSolverMultistepScheduler,
              "dpm++-sde": DPMSolverMultistepScheduler}
# Samplers that add fresh noise at every step: their noise is drawn per image (see generate).
STOCHASTIC = {"ddpm", "dpm++-sde"}


def noise_config(noise_cfg) -> dict:
    """The training noise schedule, as diffusers scheduler arguments (the reference: DDPM, 1000 steps,
    squaredcos_cap_v2, epsilon prediction), and the samplers' timestep spacing."""
    return dict(num_train_timesteps=noise_cfg.num_train_timesteps, beta_schedule=noise_cfg.beta_schedule,
                prediction_type=noise_cfg.prediction_type, timestep_spacing=noise_cfg.timestep_spacing)


def make_scheduler(name: str, config: dict, clip_sample: bool = True):
    """`clip_sample`: clip the predicted clean image to [-1, 1] (pixel space); off for latents."""
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler {name!r}: expected one of {', '.join(SCHEDULERS)}")
    if name in ("dpm++", "dpm++-sde"):
        # DPM-Solver++ has no clip_sample: without thresholding its first step (t=999 of a cosine
        # schedule) amplifies the noise-prediction error ~2e4x and a briefly trained UNet gives saturated
        # noise. Dynamic thresholding to [-1, 1] is the pixel-space equivalent of clip_sample.
        # The SDE variant re-noises at every step, which lets later steps correct an imperfect model's
        # errors instead of integrating them (Karras et al. 2022, section 4).
        algorithm = "sde-dpmsolver++" if name == "dpm++-sde" else "dpmsolver++"
        extra = {"algorithm_type": algorithm, "thresholding": clip_sample, "sample_max_value": 1.0}
    else:
        extra = {"clip_sample": clip_sample}
    return SCHEDULERS[name](**config, **extra)


@torch.no_grad()
def generate(unet, table: torch.Tensor, labels: torch.Tensor, seeds: list[int], *, scheduler, steps: int,
             guidance: float = 1.0, null_index: int | None = None, image_size: int, channels: int,
             device: torch.device, dtype: torch.dtype = torch.float32, clamp: bool = True) -> torch.Tensor:
    """Images in [-1, 1] (latents unclamped with clamp=False), [N, C, S, S], for `labels`, one seed each.

    `table` holds the conditioning tokens [classes + 1, 1, D] (row `null_index` is the null token); a UNet
    with a class embedding also gets the labels (`null_index` for the unconditional half). guidance != 1
    applies classifier-free guidance against the null token and class.
    """
    latents = torch.stack([
        torch.randn(channels, image_size, image_size, generator=torch.Generator().manual_seed(int(s)))
        for s in seeds
    ]).to(device)
    labels = labels.cpu()
    tokens = table[labels].to(device, dtype)
    guided = guidance != 1.0 and null_index is not None
    if guided:
        null = table[null_index].expand(len(labels), -1, -1).to(device, dtype)
        tokens = torch.cat([null, tokens])
        labels = torch.cat([torch.full_like(labels, null_index), labels])
    class_labels = labels.to(device) if uses_class_labels(unet) else None
    scheduler.set_timesteps(steps, device=device)
    latents = latents * scheduler.init_noise_sigma
    # DDPM and DPM-Solver++ SDE draw fresh noise at each step: a per-image generator keeps that
    # reproducible whatever the batch. Its seed comes from the image's seed by the rule an exported
    # pipeline also uses (hub_pipeline.step_seed), so both make the same tile from the same seed.
    generators = ([torch.Generator().manual_seed(step_seed(int(s))) for s in seeds]
                  if draws_step_noise(scheduler) else None)
    for t in scheduler.timesteps:
        model_in = torch.cat([latents] * 2) if guided else latents
        model_in = scheduler.scale_model_input(model_in, t)
        out = unet(model_in.to(dtype), t, tokens, class_labels=class_labels).sample.float()
        if guided:
            uncond, cond = out.chunk(2)
            out = uncond + guidance * (cond - uncond)
        latents = denoise_step(scheduler, out, t, latents, generators)
    return latents.clamp(-1, 1) if clamp else latents




def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float -> [0, 255] uint8, same shape."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def grid(images: torch.Tensor, rows: int) -> torch.Tensor:
    """[N, C, H, W] -> one [C, rows*H, cols*W] image (N = rows * cols)."""
    n, c, h, w = images.shape
    cols = n // rows
    return images[: rows * cols].view(rows, cols, c, h, w).permute(2, 0, 3, 1, 4).reshape(c, rows * h, cols * w)
