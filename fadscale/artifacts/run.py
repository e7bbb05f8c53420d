"""A trained run's final/ folder, read back: the UNet (EMA or raw), the conditioning table and the card,
checked against final/checksums.json; for latent runs the VAE too. Written by the training stage
(FadTask.export); read by `fadscale sample` and `fadscale export`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from fadscale.artifacts import HEAD_FILE, RUN_CARD
from fadscale.errors import FadscaleError
from fadscale.runtime.io import checksum_problems


def resolve_final(path: str | Path) -> Path:
    """The final/ folder of a run folder (or the folder itself when it holds the run card)."""
    path = Path(path)
    for candidate in (path / "final", path):
        if (candidate / RUN_CARD.filename).is_file():
            return candidate
    if not path.exists():
        raise FadscaleError(f"model.path {path}: not found")
    raise FadscaleError(f"model.path {path}: no final/{RUN_CARD.filename} (has training finished?)")


def image_channels(card: dict) -> int:
    """The channels of the tiles a run makes: its data's (a latent run's UNet works in the VAE's channels)."""
    if card["space"] != "latent":
        return int(card["channels"])
    return int(card.get("config", {}).get("data", {}).get("channels", card["channels"]))


@dataclass
class LoadedRun:
    final: Path
    card: dict
    unet: torch.nn.Module
    table: torch.Tensor
    weights: str  # the folder used: unet_ema or unet
    fallback: bool  # EMA asked for, but the run has none
    vae: torch.nn.Module | None = None
    vae_scale: float = 1.0


def load_run(path: str | Path, weights: str = "ema", device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32) -> LoadedRun:
    """UNet (EMA or raw), conditioning table and, for latent runs, the VAE of a trained run."""
    from diffusers import UNet2DConditionModel

    final = resolve_final(path)
    card = RUN_CARD.read(final)
    folder, fallback = ("unet_ema", False) if weights == "ema" else ("unet", False)
    if folder == "unet_ema" and not (final / "unet_ema").is_dir():
        folder, fallback = "unet", True
    if not (final / folder).is_dir():
        raise FadscaleError(f"{final / folder}: UNet weights not found")
    damaged = checksum_problems(final, only=(folder, HEAD_FILE, RUN_CARD.filename))
    if damaged:  # None: a run written before final/ had checksums
        raise FadscaleError(f"{final}: damaged ({'; '.join(damaged[:3])}); train again (the run's checkpoints "
                            "rewrite final/), or restore the folder from a copy")
    try:
        unet = UNet2DConditionModel.from_pretrained(final / folder, torch_dtype=dtype)
    except (OSError, ValueError) as exc:
        raise FadscaleError(f"{final / folder}: cannot load the UNet ({exc})") from None
    head = final / HEAD_FILE
    if not head.is_file():
        raise FadscaleError(f"{head}: conditioning head not found")
    try:
        table = load_file(str(head))["conditioning.table"].float()
    except Exception as exc:  # noqa: BLE001 - unreadable or without the key: the same user error
        raise FadscaleError(f"{head}: no readable conditioning.table ({exc})") from None
    classes = len(card["classes"])
    if table.shape[0] != classes + 1:
        raise FadscaleError(f"{head}: conditioning table has {table.shape[0]} rows; expected {classes + 1} "
                            f"({classes} classes + the null token)")
    loaded = LoadedRun(final, card, unet.to(device).eval().requires_grad_(False), table, folder, fallback)
    if card["space"] == "latent":
        from fadscale.core.models.vae import load_vae

        loaded.vae, loaded.vae_scale = load_vae(card.get("vae"), device)
    return loaded
