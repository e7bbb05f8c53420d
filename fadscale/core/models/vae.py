"""The VAE of latent-space runs: one loader for the cache builder, the trainer and the sampler.

A path may be a VAE folder or a whole diffusers pipeline folder (then its `vae/` sub-folder is used),
local, or a hub id when online. Read-only: fadscale never trains the VAE.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fadscale.errors import FadscaleError

DEFAULT_SCALING = 0.18215  # SD 1.x, for a VAE config without scaling_factor


def _subfolder(path: str) -> dict:
    return {"subfolder": "vae"} if (Path(path) / "vae").is_dir() else {}


def load_vae(path: str | None, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, float]:
    """(the AutoencoderKL in eval mode without gradients, its latent scaling factor)."""
    from diffusers import AutoencoderKL

    if not path:
        raise FadscaleError("model.vae: latent space needs a diffusers VAE folder (none given)")
    try:
        vae = AutoencoderKL.from_pretrained(path, **_subfolder(path))
    except (OSError, ValueError) as exc:
        raise FadscaleError(f"model.vae {path!r}: cannot load a diffusers VAE ({exc})") from None
    return vae.to(device).eval().requires_grad_(False), float(vae.config.get("scaling_factor", DEFAULT_SCALING))


def vae_scaling_factor(path: str) -> float:
    """The latent scaling factor from the VAE's config alone (no weights read)."""
    from diffusers import AutoencoderKL

    try:
        return float(AutoencoderKL.load_config(path, **_subfolder(path)).get("scaling_factor", DEFAULT_SCALING))
    except (OSError, ValueError) as exc:
        raise FadscaleError(f"model.vae {path!r}: cannot read the VAE's config ({exc})") from None
