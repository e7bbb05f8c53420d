"""The diffusion UNet: presets, pretrained loading, and the pixel-space channel swap.

`tiny-sd` is segmind/tiny-sd's architecture (BK-SDM-Tiny: SD 1.5 with blocks removed). The CPU presets
keep its shape (three levels, one resnet per block, no mid block, cross-attention on the lower two
levels) at small widths, so the reference's aligned layer `down_blocks.2.resnets.0.conv_shortcut`
exists in every preset.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from fadscale.runtime.io import FadscaleError

_TINY_SD_BLOCKS = dict(
    down_block_types=("CrossAttnDownBlock2D",) * 3,
    up_block_types=("CrossAttnUpBlock2D",) * 3,
    mid_block_type=None,
    layers_per_block=1,
)

# Self-attention over every pixel of the full-resolution level dominates a CPU step (13 s vs 0.7 s per
# step for cpu-small at 32x32, batch 16): the CPU presets drop attention at that level only.
_CPU_BLOCKS = dict(
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    mid_block_type=None,
    layers_per_block=1,
    attention_head_dim=4,
    norm_num_groups=8,
)

PRESETS: dict[str, dict] = {
    "tiny-sd": dict(_TINY_SD_BLOCKS, block_out_channels=(320, 640, 1280), attention_head_dim=8,
                    cross_attention_dim=768, norm_num_groups=32),
    "cpu-small": dict(_CPU_BLOCKS, block_out_channels=(32, 64, 128), cross_attention_dim=64),
    "cpu-tiny": dict(_CPU_BLOCKS, block_out_channels=(16, 32, 64), cross_attention_dim=32),
}


def build_unet(preset: str, channels: int, sample_size: int, pretrained: str | None = None) -> UNet2DConditionModel:
    """A UNet with `channels` input/output channels.

    With `pretrained`, the real weights are loaded and, when the channel count differs (pixel space on
    grayscale tiles: 1 channel vs SD's 4 latent channels), conv_in/conv_out are replaced by fresh
    convolutions of the same shape otherwise; every other weight is kept, as the reference does.
    """
    if pretrained:
        source = Path(pretrained)
        kwargs = {"subfolder": "unet"} if (source / "unet").is_dir() else {}
        try:
            unet = UNet2DConditionModel.from_pretrained(pretrained, **kwargs)
        except (OSError, ValueError) as exc:
            raise FadscaleError(f"model.pretrained {pretrained!r}: cannot load a diffusers UNet ({exc})") from None
        return swap_io_channels(unet, channels)
    if preset not in PRESETS:
        raise FadscaleError(f"model.preset {preset!r}: expected one of {', '.join(PRESETS)}")
    return UNet2DConditionModel(sample_size=sample_size, in_channels=channels, out_channels=channels,
                                **PRESETS[preset])


def swap_io_channels(unet: UNet2DConditionModel, channels: int) -> UNet2DConditionModel:
    if unet.config.in_channels == channels and unet.config.out_channels == channels:
        return unet
    old_in, old_out = unet.conv_in, unet.conv_out
    unet.conv_in = nn.Conv2d(channels, old_in.out_channels, old_in.kernel_size, old_in.stride, old_in.padding)
    unet.conv_out = nn.Conv2d(old_out.in_channels, channels, old_out.kernel_size, old_out.stride, old_out.padding)
    unet.register_to_config(in_channels=channels, out_channels=channels)
    return unet


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def module_names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules() if name]


def get_module(model: nn.Module, path: str) -> nn.Module:
    """`model.get_submodule(path)` with a one-line error that lists close matches."""
    import difflib

    try:
        return model.get_submodule(path)
    except AttributeError:
        names = module_names(model)
        close = difflib.get_close_matches(path, names, n=5, cutoff=0.5)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise FadscaleError(f"align.layer {path!r}: no such module in the UNet{hint}") from None


@torch.no_grad()
def probe_feature_shape(unet: UNet2DConditionModel, layer: str, channels: int, size: int) -> torch.Size:
    """The output shape of `layer` for one input (used to size the alignment projector)."""
    captured = {}
    handle = get_module(unet, layer).register_forward_hook(lambda m, i, o: captured.setdefault("out", o))
    try:
        dim = unet.config.cross_attention_dim
        unet(torch.zeros(1, channels, size, size), torch.zeros(1, dtype=torch.long), torch.zeros(1, 1, dim))
    finally:
        handle.remove()
    out = captured["out"]
    if not isinstance(out, torch.Tensor):
        raise FadscaleError(f"align.layer {layer!r}: its output is a {type(out).__name__}, not a tensor")
    return out.shape
