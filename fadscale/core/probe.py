"""Learning curves: score generation while training (`eval.every` in a FAD config).

Every `eval.every` steps the trainer samples a fixed small set (the same labels and per-image seeds each
time, so the points of a curve differ only by the weights) with the fast sampler, and an independent
evaluator scores it against the real val tiles: generation accuracy, Frechet distance in the
evaluator's feature space, and the largest per-class gap in mean intensity. The real tiles' features
are computed once. The points go to TensorBoard and metrics.jsonl (`eval/...` keys), from which the
demo report draws the curves and tools/bench_quality.py reads the steps each arm needs to reach a bar.

The evaluator must not share training tiles with the alignment expert (the run is trained to please it):
decided from the two cards (`shared_training_tiles`), refused when they do.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fadscale.core.evaluation.inputs import evaluator_outputs, load_real_tiles
from fadscale.core.metrics import frechet_distance
from fadscale.core.models.expert import load_expert, shared_training_tiles
from fadscale.errors import FadscaleError
from fadscale.core.sampling import generate, make_scheduler, to_uint8

SEED_BASE = 9_000_000  # the probe's per-image seeds: far from the sample stage's hashed ones


class GenerationProbe:
    """Samples `per_class` tiles per class and scores them with the evaluator; `__call__(unet, table)`."""

    def __init__(self, *, evaluator_card: str, alignment_card: dict, shards: str | Path, classes: list[str],
                 image_size: int, channels: int, per_class: int, scheduler: str, steps: int, noise: dict,
                 device: torch.device, batch_size: int = 128):
        self.model, self.card = load_expert(evaluator_card, device)
        if self.card["classes"] != classes:
            raise FadscaleError(f"eval.evaluator {evaluator_card}: its classes {self.card['classes']} differ from "
                                f"the run's {classes}")
        shared, basis = shared_training_tiles(self.card, alignment_card)
        if shared:
            raise FadscaleError(f"eval.evaluator {evaluator_card} and the alignment expert: {basis}; its score of "
                                "tiles trained to match the alignment expert's features is not independent; use an "
                                "expert trained on the other half of the tiles (data.subset B)")
        self.device, self.batch_size = device, batch_size
        self.image_size, self.channels, self.steps = image_size, channels, steps
        self.scheduler = make_scheduler(scheduler, noise)
        real = load_real_tiles(shards, classes, split="val", image_size=image_size, channels=channels)
        self.real_mean = torch.tensor([float(real[name].float().mean() / 255.0) for name in classes])
        tiles = torch.cat([real[name] for name in classes])
        self.real_features, _ = evaluator_outputs(self.model, self.card, tiles, device, batch_size)
        self.labels = torch.arange(len(classes)).repeat_interleave(per_class)
        self.seeds = [SEED_BASE + i for i in range(len(self.labels))]
        self.null_index = len(classes)

    @torch.no_grad()
    def __call__(self, unet: torch.nn.Module, table: torch.Tensor) -> dict[str, float]:
        was_training = unet.training
        unet.eval()
        try:
            images = generate(unet, table, self.labels, self.seeds, scheduler=self.scheduler, steps=self.steps,
                              null_index=self.null_index, image_size=self.image_size, channels=self.channels,
                              device=self.device)
        finally:
            unet.train(was_training)
        tiles = to_uint8(images.cpu())
        features, predicted = evaluator_outputs(self.model, self.card, tiles, self.device, self.batch_size)
        means = torch.stack([tiles[self.labels == c].float().mean() / 255.0 for c in range(len(self.real_mean))])
        return {
            "eval/generation_accuracy": float((predicted == self.labels).float().mean()),
            "eval/frechet": frechet_distance(features, self.real_features),
            "eval/max_class_intensity_gap": float((means - self.real_mean).abs().max()),
        }
