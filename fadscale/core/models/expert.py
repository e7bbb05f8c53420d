"""The expert: a timm backbone with a classification head, its card, and safe save/load.

The card (`expert.json`) is the expert's passport: every later stage reads architecture, classes,
channels, input size, normalisation and feature size from it, and checks the weights' sha256.
"""

from __future__ import annotations

import difflib
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from fadscale.artifacts import EXPERT_CARD
from fadscale.errors import FadscaleError
from fadscale.runtime.io import save_safetensors, sha256_file

WEIGHTS_NAME = "expert.safetensors"
# expert.safetensors holds the backbone under timm's own keys (so timm loads it: docs/usage.md, "The expert") and
# this project's head under `fadscale_head.`; files of earlier versions prefix the backbone with `backbone.`.
HEAD_PREFIX = "fadscale_head."
WEIGHTS_LAYOUT = "timm backbone keys + fadscale_head.*"
CARD_NAME = EXPERT_CARD.filename


def _create_backbone(arch: str, in_chans: int, input_size: int, drop_rate: float) -> nn.Module:
    import timm

    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise FadscaleError(f"model.arch {arch!r}: not a timm model name{hint}")
    kwargs: dict[str, Any] = dict(pretrained=False, num_classes=0, in_chans=in_chans, drop_rate=drop_rate)
    try:
        try:  # transformers need the input size at construction; convnets do not accept it
            return timm.create_model(arch, img_size=input_size, **kwargs)
        except TypeError:
            return timm.create_model(arch, **kwargs)
    except Exception as exc:  # noqa: BLE001 - e.g. an input size the architecture cannot take
        raise FadscaleError(f"model.arch {arch!r}: cannot be built with in_chans={in_chans} at "
                            f"{input_size}x{input_size} ({type(exc).__name__}: {exc})") from None


class Expert(nn.Module):
    """timm backbone (pooled features) + head. `features` is what FAD aligns to."""

    def __init__(self, arch: str, num_classes: int, in_chans: int, input_size: int,
                 head: str = "mlp", drop_rate: float = 0.0):
        super().__init__()
        self.arch, self.num_classes, self.in_chans, self.input_size = arch, num_classes, in_chans, input_size
        self.backbone = _create_backbone(arch, in_chans, input_size, drop_rate)
        # The pooled output: timm's head_hidden_size where a model has a pre-logits layer
        # (MobileNetV3: 1280 pooled vs 960 in the last map), num_features otherwise.
        self.feature_dim = int(getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features)
        self.spatial_dim = int(self.backbone.num_features)
        if head == "mlp":  # the reference's head: feature -> 256 -> classes
            self.head = nn.Sequential(nn.Linear(self.feature_dim, 256), nn.ReLU(), nn.Linear(256, num_classes))
        else:
            self.head = nn.Linear(self.feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def spatial_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map [B, D, h, w]; transformer tokens are reshaped to their grid."""
        return self._as_map(self.backbone.forward_features(x))

    def features_and_map(self, x: torch.Tensor, stage: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`features(x)` and a feature map from one pass through the backbone: the last map
        (`spatial_features(x)`), or with `stage` the map of that stage (an index into timm's feature_info:
        for a resnet 1-4 at strides 4-32), for a map finer than the last one without resizing the tile."""
        if stage is None:
            out = self.backbone.forward_features(x)
            return self.backbone.forward_head(out), self._as_map(out)
        stages = len(getattr(self.backbone, "feature_info", []) or [])
        if not hasattr(self.backbone, "forward_intermediates") or not 0 <= stage < stages:
            raise FadscaleError(f"align.expert_stage {stage}: {self.arch} has "
                                f"{f'stages 0-{stages - 1}' if stages else 'no intermediate stages timm can return'}")
        out, maps = self.backbone.forward_intermediates(x, indices=[stage], intermediates_only=False)
        return self.backbone.forward_head(out), maps[0].contiguous()

    def _as_map(self, out: torch.Tensor) -> torch.Tensor:
        if out.ndim == 4:
            # Most timm models give NCHW; some (Swin, MaxViT, ...) give NHWC.
            if out.shape[1] != self.spatial_dim and out.shape[-1] == self.spatial_dim:
                out = out.permute(0, 3, 1, 2)
            return out.contiguous()
        prefix = int(getattr(self.backbone, "num_prefix_tokens", 0))
        tokens = out[:, prefix:]
        side = int(round(tokens.shape[1] ** 0.5))
        if side * side != tokens.shape[1]:
            raise FadscaleError(f"expert tokens ({tokens.shape[1]}) do not form a square grid")
        return tokens.transpose(1, 2).reshape(out.shape[0], out.shape[2], side, side)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def expert_input(images: torch.Tensor, card: dict) -> torch.Tensor:
    """Tiles in [-1, 1] (any size) -> the expert's input: its size, channels and normalisation."""
    size = card["input_size"]
    if images.shape[-1] != size or images.shape[-2] != size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    if images.shape[1] != card["in_chans"]:
        if card["in_chans"] == 1:
            weights = torch.tensor([0.299, 0.587, 0.114], device=images.device, dtype=images.dtype)
            images = (images * weights.view(1, 3, 1, 1)).sum(1, keepdim=True)
        else:
            images = images.expand(-1, card["in_chans"], -1, -1)
    mean = torch.tensor(card["normalization"]["mean"], device=images.device, dtype=images.dtype)
    std = torch.tensor(card["normalization"]["std"], device=images.device, dtype=images.dtype)
    return ((images + 1) / 2 - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file or a PyTorch/timm checkpoint, never running code from it."""
    import argparse

    if path.suffix == ".safetensors":
        return load_file(str(path))
    # weights_only=True refuses arbitrary pickled objects; timm's train.py stores its argparse
    # Namespace beside the weights, a plain record that is safe to allow.
    with torch.serialization.safe_globals([argparse.Namespace]):
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict_ema", "state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise ValueError(f"holds a {type(state).__name__}, not a state dict")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _weights_file(path: Path) -> Path:
    """A file, or a model folder holding one (a timm / Hugging Face download)."""
    if path.is_dir():
        for name in (WEIGHTS_NAME, "model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
            if (path / name).is_file():
                return path / name
        raise FadscaleError(f"model.pretrained {path}: folder has no model.safetensors or pytorch_model.bin")
    if not path.is_file():
        raise FadscaleError(f"model.pretrained {path}: file not found")
    return path


def load_initial_weights(model: Expert, path: str | Path) -> str:
    """Initial weights from a local file: safetensors, or a timm/PyTorch checkpoint read with
    weights_only=True (never runs code). The backbone must match; an `in_chans` mismatch is adapted
    (timm's adapt_input_conv) and a ViT's position embedding resampled (the model's own timm
    checkpoint filter). A head is loaded only when it has this model's shape (a fadscale expert with
    the same classes); a source classifier for other classes is dropped. Returns a one-line summary."""
    path = _weights_file(Path(path))
    try:
        state = _read_state_dict(path)
    except Exception as exc:  # noqa: BLE001 - any parse failure is the same user error
        raise FadscaleError(f"model.pretrained {path}: not a readable checkpoint ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    from timm.models import adapt_input_conv

    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith(HEAD_PREFIX) for k in state):  # a fadscale expert: its head may fit too
        state = module_state(state)
    head = {k.removeprefix("head."): v for k, v in state.items() if k.startswith("head.")}
    backbone_state = {k.removeprefix("backbone."): v for k, v in state.items() if not k.startswith("head.")}
    filter_fn = getattr(sys.modules.get(type(model.backbone).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            backbone_state = filter_fn(backbone_state, model.backbone)
        except Exception:  # noqa: BLE001 - a filter for another layout: fall back to the raw keys
            pass
    target = model.backbone.state_dict()
    loaded = {}
    for key, value in backbone_state.items():
        if key not in target:
            continue  # the source's classifier and anything else foreign
        if value.ndim == 4 and target[key].ndim == 4 and value.shape[1] != target[key].shape[1]:
            value = adapt_input_conv(target[key].shape[1], value)
        if value.shape == target[key].shape:
            loaded[key] = value.to(target[key].dtype)
    if len(loaded) < 0.5 * len(target):
        raise FadscaleError(
            f"model.pretrained {path}: only {len(loaded)} of {len(target)} backbone tensors match "
            f"{type(model.backbone).__name__}; is it a checkpoint of this architecture?"
        )
    model.backbone.load_state_dict(loaded, strict=False)
    head_target = model.head.state_dict()
    head_loaded = bool(head) and head.keys() == head_target.keys() and all(
        head[k].shape == head_target[k].shape for k in head_target)
    if head_loaded:
        model.head.load_state_dict(head)
    return (f"initial weights {path}: {len(loaded)} of {len(target)} backbone tensors"
            + ("; head too" if head_loaded else "; head freshly initialised"))


def save_expert(out_dir: str | Path, model: Expert, card: dict) -> dict:
    """Write weights then card (atomically); the card gets the weights' sha256. Returns the card."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {**{k: v for k, v in model.backbone.state_dict().items()},
             **{HEAD_PREFIX + k: v for k, v in model.head.state_dict().items()}}
    save_safetensors({k: v.detach().cpu().contiguous() for k, v in state.items()}, out_dir / WEIGHTS_NAME)
    return EXPERT_CARD.write(out_dir, {**card, "weights": WEIGHTS_NAME, "weights_layout": WEIGHTS_LAYOUT,
                                       "sha256": sha256_file(out_dir / WEIGHTS_NAME)})


def module_state(state: dict) -> dict:
    """An expert.safetensors state as the Expert module's keys (`backbone.*`, `head.*`), either layout."""
    if any(k.startswith("backbone.") for k in state):
        return state
    return {(f"head.{k.removeprefix(HEAD_PREFIX)}" if k.startswith(HEAD_PREFIX) else f"backbone.{k}"): v
            for k, v in state.items()}


def read_card(card_path: str | Path) -> dict:
    """The expert card (a folder holding expert.json, or the file), checked."""
    return EXPERT_CARD.read(card_path)


def shared_training_tiles(evaluator: dict, alignment: dict) -> tuple[bool | None, str]:
    """Whether two experts' cards say they were trained on common tiles: (True/False/None: unknown, basis).

    Independent means disjoint halves (A and B, the same subset seed) of the same shard set, or different
    shard sets (not compared tile by tile). The same weights, the same half, or "all" on either side
    share training tiles."""
    if evaluator.get("sha256") == alignment.get("sha256"):
        return True, "the same weights"
    a, b = evaluator.get("data") or {}, alignment.get("data") or {}
    if not a.get("manifest_sha256") or not b.get("manifest_sha256"):
        return None, "unknown: a card does not record its training data"
    if a["manifest_sha256"] != b["manifest_sha256"]:
        return False, "trained on different shard sets (not compared tile by tile)"
    halves, seeds = {a.get("subset"), b.get("subset")}, (a.get("subset_seed"), b.get("subset_seed"))
    if halves == {"A", "B"} and seeds[0] == seeds[1]:
        return False, f"disjoint halves A and B of the same shards (subset seed {seeds[0]})"
    return True, (f"trained on subsets {a.get('subset')} and {b.get('subset')} (subset seeds {seeds[0]}, {seeds[1]}) "
                  f"of the same shards: they share training tiles")


def load_expert(card_path: str | Path, device: torch.device | str = "cpu", verify: bool = True) -> tuple[Expert, dict]:
    """Build the expert from its card and load its safetensors weights (checked against the card)."""
    card = read_card(card_path)
    weights = Path(card["_path"]).parent / card["weights"]
    if not weights.is_file():
        raise FadscaleError(f"{weights}: expert weights not found (named by {card['_path']})")
    if verify and sha256_file(weights) != card["sha256"]:
        raise FadscaleError(f"{weights}: sha256 does not match its card {card['_path']} (corrupt or replaced)")
    model = Expert(card["arch"], len(card["classes"]), card["in_chans"], card["input_size"], card["head"])
    try:
        state = load_file(str(weights))
    except Exception as exc:  # noqa: BLE001
        raise FadscaleError(f"{weights}: not a readable safetensors file ({exc})") from None
    try:
        model.load_state_dict(module_state(state), strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if "\n" in str(exc) else str(exc)
        raise FadscaleError(f"{weights}: does not fit {card['arch']} with {len(card['classes'])} classes ({first})") from None
    return model.to(device).eval(), card
