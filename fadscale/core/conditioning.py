"""Class conditioning: one cross-attention token per class, plus a null token for classifier-free guidance.

With a text encoder (a local CLIP folder), each class's token is the encoder's pooled embedding of its
prompt ("a histological image of adipose tissue"), computed once by the cache stage and frozen, as in
the reference. Without one, the tokens are learned embeddings trained with the UNet.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from fadscale.errors import FadscaleError
from fadscale.runtime.io import save_safetensors

CONDITIONING_FILE = "conditioning.safetensors"


def class_prompts(classes: list[str], template: str) -> list[str]:
    return [template.format(name=name.lower()) for name in classes]


@torch.no_grad()
def encode_prompts(encoder_path: str, prompts: list[str]) -> torch.Tensor:
    """[len(prompts) + 1, 1, D]: the pooled text embedding of each prompt, then of the empty prompt (null)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    try:
        tokenizer = CLIPTokenizer.from_pretrained(encoder_path, subfolder=_sub(encoder_path, "tokenizer"))
        encoder = CLIPTextModel.from_pretrained(encoder_path, subfolder=_sub(encoder_path, "text_encoder"))
    except (OSError, ValueError) as exc:
        raise FadscaleError(f"conditioning.text_encoder {encoder_path!r}: cannot load a CLIP text encoder ({exc})") from None
    tokens = tokenizer(prompts + [""], padding="max_length", truncation=True,
                       max_length=tokenizer.model_max_length, return_tensors="pt")
    pooled = encoder.eval()(**tokens).pooler_output
    return pooled.unsqueeze(1).float().contiguous()


def _sub(path: str, name: str) -> str:
    """A full diffusers pipeline folder keeps the encoder in a sub-folder; a bare CLIP folder does not."""
    return name if (Path(path) / name).is_dir() else ""


def save_table(path: str | Path, table: torch.Tensor) -> None:
    save_safetensors({"table": table.contiguous()}, path)


def load_table(path: str | Path) -> torch.Tensor:
    return load_file(str(path))["table"]


class ClassConditioning(nn.Module):
    """labels [B] -> tokens [B, 1, D]; `drop` replaces a label by the null token (classifier-free guidance)."""

    def __init__(self, num_classes: int, dim: int, fixed_table: torch.Tensor | None = None):
        super().__init__()
        self.num_classes = num_classes
        if fixed_table is not None:
            if fixed_table.shape != (num_classes + 1, 1, dim):
                raise FadscaleError(
                    f"conditioning table has shape {tuple(fixed_table.shape)}; expected "
                    f"({num_classes + 1}, 1, {dim}) for {num_classes} classes and the UNet's cross_attention_dim"
                )
            self.register_buffer("table", fixed_table.clone())
        else:
            self.table = nn.Parameter(torch.randn(num_classes + 1, 1, dim) * 0.02)

    @property
    def null_index(self) -> int:
        return self.num_classes

    def labels(self, labels: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """The labels with the dropped ones replaced by the null class (for the UNet's class embedding)."""
        if drop is None:
            return labels
        return torch.where(drop, torch.full_like(labels, self.null_index), labels)

    def forward(self, labels: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        return self.table[self.labels(labels, drop)]
