"""The diffusion UNet: presets, pretrained loading, class embeddings, and the pixel-space channel swap.

`tiny-sd` is segmind/tiny-sd's architecture (BK-SDM-Tiny: SD 1.5 with blocks removed). The CPU presets
keep its outline (three levels, one resnet per block, no mid block) at small widths, with the channel
count growing between the second and third level, so the reference's aligned layer
`down_blocks.2.resnets.0.conv_shortcut` exists in every preset.

Class conditioning: besides the cross-attention tokens (the reference's one token per class), a UNet
can carry a class embedding added to its timestep embedding (diffusers' `num_class_embeds`), with one
extra row for the null class of classifier-free guidance. From scratch it is what makes the class
matter (measured in docs/results/recipe.md: at CPU widths the one token alone leaves the class almost unused).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from fadscale.errors import FadscaleError

_TINY_SD_BLOCKS = dict(
    down_block_types=("CrossAttnDownBlock2D",) * 3,
    up_block_types=("CrossAttnUpBlock2D",) * 3,
    mid_block_type=None,
    layers_per_block=1,
)

# Self-attention over every pixel of the full-resolution level dominates a CPU step (13 s vs 0.7 s per
# step for cpu-small at 32x32, batch 16): the CPU presets drop attention at that level only.
_CPU_COMMON = dict(mid_block_type=None, layers_per_block=1, attention_head_dim=4, norm_num_groups=8)
_CPU_BLOCKS = dict(
    _CPU_COMMON,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
)

# The demo's UNet: attention (self + the token's cross-attention) at the lowest level only (8x8 at 32 px),
# where it is cheap and gives every pixel a global view; plain resnets above. At 32 px, batch 16, 2 threads
# it trains at 0.23 s/step fp32, 0.18 s/step bf16 autocast (tools/bench_step.py) and reaches generation
# accuracy above the evaluator's real-tile accuracy in 800 steps (docs/results/recipe.md).
_CPU_BASE_BLOCKS = dict(
    _CPU_COMMON,
    down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
)

PRESETS: dict[str, dict] = {
    "tiny-sd": dict(_TINY_SD_BLOCKS, block_out_channels=(320, 640, 1280), attention_head_dim=8,
                    cross_attention_dim=768, norm_num_groups=32),
    "cpu-base": dict(_CPU_BASE_BLOCKS, block_out_channels=(24, 48, 96), cross_attention_dim=32),
    "cpu-small": dict(_CPU_BLOCKS, block_out_channels=(32, 64, 128), cross_attention_dim=64),
    "cpu-tiny": dict(_CPU_BLOCKS, block_out_channels=(16, 32, 64), cross_attention_dim=32),
}


def build_unet(preset: str, channels: int, sample_size: int, pretrained: str | None = None,
               class_embeds: int | None = None) -> UNet2DConditionModel:
    """A UNet with `channels` input/output channels and, with `class_embeds` (classes + 1 for the null
    class), a class embedding added to the timestep embedding.

    With `pretrained`, the real weights are loaded and, when the channel count differs (pixel space on
    grayscale tiles: 1 channel vs SD's 4 latent channels), conv_in/conv_out are replaced by fresh
    convolutions of the same shape otherwise; every other weight is kept, as the reference does. A class
    embedding is then added with zero weights, so the pretrained UNet starts out unchanged.
    """
    if pretrained:
        source = Path(pretrained)
        kwargs = {"subfolder": "unet"} if (source / "unet").is_dir() else {}
        try:
            unet = UNet2DConditionModel.from_pretrained(pretrained, **kwargs)
        except (OSError, ValueError) as exc:
            raise FadscaleError(f"model.pretrained {pretrained!r}: cannot load a diffusers UNet ({exc})") from None
        unet = swap_io_channels(unet, channels)
        return add_class_embedding(unet, class_embeds) if class_embeds else unet
    if preset not in PRESETS:
        raise FadscaleError(f"model.preset {preset!r}: expected one of {', '.join(PRESETS)}")
    return UNet2DConditionModel(sample_size=sample_size, in_channels=channels, out_channels=channels,
                                num_class_embeds=class_embeds, **PRESETS[preset])


def add_class_embedding(unet: UNet2DConditionModel, count: int) -> UNet2DConditionModel:
    """Give a loaded UNet a zero-initialised class embedding of `count` rows (kept when it has one that fits)."""
    existing = getattr(unet, "class_embedding", None)
    if isinstance(existing, nn.Embedding) and existing.num_embeddings == count:
        return unet
    if unet.config.class_embed_type is not None or existing is not None:
        raise FadscaleError(f"model.pretrained: the UNet already has a class embedding "
                            f"({unet.config.class_embed_type or unet.config.num_class_embeds}); set "
                            f"conditioning.class_embedding=false to use its own conditioning")
    width = unet.time_embedding.linear_2.out_features
    unet.class_embedding = nn.Embedding(count, width)
    nn.init.zeros_(unet.class_embedding.weight)
    unet.register_to_config(num_class_embeds=count)
    return unet


def uses_class_labels(unet: nn.Module) -> bool:
    """Whether the UNet takes class labels (a class embedding added to the timestep embedding)."""
    return getattr(unet, "class_embedding", None) is not None


def has_cross_attention(unet: UNet2DConditionModel) -> bool:
    """Whether any block attends to the conditioning tokens."""
    return any("CrossAttn" in kind for kind in (*unet.config.down_block_types, *unet.config.up_block_types))


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
        labels = torch.zeros(1, dtype=torch.long) if uses_class_labels(unet) else None
        unet(torch.zeros(1, channels, size, size), torch.zeros(1, dtype=torch.long), torch.zeros(1, 1, dim),
             class_labels=labels)
    finally:
        handle.remove()
    out = captured["out"]
    if not isinstance(out, torch.Tensor):
        raise FadscaleError(f"align.layer {layer!r}: its output is a {type(out).__name__}, not a tensor")
    return out.shape
