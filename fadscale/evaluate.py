"""`fadscale evaluate`: score a sample set against held-out real tiles (the test part when the shards have one,
else val) with an independent evaluator.

    python -m fadscale.evaluate --config configs/tiny/evaluate.yaml

- generation accuracy: the evaluator's top-1 on the generated tiles, per class and overall (plus its
  accuracy on the real tiles, the reference point). The evaluator must not share training tiles with
  the alignment expert (the run was trained to please it): decided from the two cards (the same weights,
  the same half or "all" of the same shards share tiles), refused unless
  `evaluator.allow_alignment_expert`, and then the report says so; the report states the basis.
- SSIM diversity per class (1 - mean SSIM over random pairs), for the generated and the real tiles.
- Frechet distance, KID and k-NN precision/recall in the evaluator's pooled feature space, overall and
  per class; Inception FID only with local Inception weights (`metrics.inception_weights`).
- per-class mean intensity and colour (R, G, B), and orientation coherence, generated beside real.
- the copy check (fadscale/core/evaluation/copies.py): the share of generated tiles nearer to a real training
  tile than 95% of the held-out real tiles are, in pixels and in the evaluator's features.
- utility: a small classifier trained on synthetic tiles, on real + synthetic, on real tiles only and on
  as many real tiles as synthetic ones, each tested on the scored real tiles (train on synthetic, test on
  real).

Which real tiles are scored is `real.split`: `test` where the shards have a test part (no model trains
or picks anything on it), else `val`.

Output (`run.out_dir`, written atomically): report.json, report.md, confusion.png, grids/<CLASS>.png
(real tiles on top, generated below), config.yaml. `evaluate_samples(...)` is the same as a library call.
This module holds the config and the evaluation itself; its parts live in fadscale/core/evaluation/ (inputs,
distances, utility, report).
"""

from __future__ import annotations

import random
from datetime import datetime, timezone
from pathlib import Path

import torch

from fadscale import __version__
from fadscale.config import EvaluateConfig, build_config, save_config, with_settings
from fadscale.core.evaluation.copies import copy_check
from fadscale.core.evaluation.distances import (feature_distances, inception_fid, intensity_by_class, orientation_by_class,
                                           reference_distances)
from fadscale.core.evaluation.inputs import (check_independence, evaluator_outputs, evaluator_selection, load_real_tiles,
                                        load_sample_set, stack_tiles)
from fadscale.core.evaluation.report import fmt, json_safe, mean_of, report_value, write_outputs
from fadscale.core.evaluation.utility import utility_scores
from fadscale.data.shard import load_manifest
from fadscale.core.metrics import accuracy_from_confusion, confusion_matrix, ssim_diversity
from fadscale.core.models.expert import load_expert, read_card
from fadscale.runtime.entry import run_entry
from fadscale.errors import FadscaleError
from fadscale.runtime.io import atomic_output_dir, git_commit
from fadscale.runtime.logging import log_line

__all__ = ["EvaluateConfig", "evaluate", "evaluate_samples", "report_value", "load_real_tiles", "load_sample_set"]


# --------------------------------------------------------------------------------------------------
# The evaluation
# --------------------------------------------------------------------------------------------------


def evaluate(cfg: EvaluateConfig, write: bool = True) -> dict:
    """Score the sample set of `cfg`; write the report folder when `write`; return the report."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.run.seed)
    random.seed(cfg.run.seed)
    out = Path(cfg.run.out_dir)
    if write and out.exists() and not cfg.run.overwrite:
        raise FadscaleError(f"{out}: report folder already exists (set run.overwrite=true to replace it)")
    card = read_card(cfg.evaluator.card)
    classes = list(card["classes"])
    folder, manifest, generated = load_sample_set(cfg.samples, classes)
    independence = check_independence(card, manifest, cfg.evaluator.alignment_expert,
                                      cfg.evaluator.allow_alignment_expert)
    if manifest is not None and manifest.get("classes") not in (None, classes):
        raise FadscaleError(f"samples {folder}: classes {manifest['classes']} differ from the evaluator's {classes}")
    shards = cfg.real.shards
    if shards is None:
        source = (manifest or {}).get("run") or {}
        listed = source.get("shards_manifest") or ((manifest or {}).get("source") or {}).get("shards")
        if not listed:
            raise FadscaleError(f"samples {folder}: no run card names the real shards; set real.shards")
        shards = str(Path(listed).parent) if str(listed).endswith(".json") else str(listed)
    shards = Path(shards)
    size, channels = next(iter(generated.values())).shape[-1], next(iter(generated.values())).shape[1]
    split = scored_split(shards, cfg.real.split)
    real = load_real_tiles(shards, classes, split=split, image_size=size, channels=channels,
                           subset=cfg.real.subset, subset_seed=cfg.real.subset_seed,
                           max_per_class=cfg.real.max_per_class)
    model, card = load_expert(cfg.evaluator.card, device)
    log_line(f"evaluating {sum(len(t) for t in generated.values())} generated tiles from {folder} against "
             f"{sum(len(t) for t in real.values())} real {split} tiles with {card['arch']} "
             f"({card['_path']})", True)

    gen_x, gen_y = stack_tiles(generated, classes)
    real_x, real_y = stack_tiles(real, classes)
    gen_feat, gen_pred = evaluator_outputs(model, card, gen_x, device, cfg.evaluator.batch_size)
    real_feat, real_pred = evaluator_outputs(model, card, real_x, device, cfg.evaluator.batch_size)
    confusion = confusion_matrix(gen_y, gen_pred, len(classes))
    real_confusion = confusion_matrix(real_y, real_pred, len(classes))

    m = cfg.metrics
    diversity = {}
    for i, name in enumerate(classes):
        entry = {}
        for kind, tiles in (("generated", generated[name]), ("real", real[name])):
            entry[kind] = ssim_diversity(tiles, pairs=m.ssim_pairs, seed=cfg.run.seed * 1009 + i)["diversity"] \
                if len(tiles) >= 2 else None
        entry["pairs"] = m.ssim_pairs
        diversity[name] = entry
    mean_div = {kind: mean_of([d[kind] for d in diversity.values()]) for kind in ("generated", "real")}

    # Every real train tile, loaded once: the reference rows, the class colours, the copy check and the
    # train-on-real classifiers all draw on them.
    train = load_real_tiles(shards, classes, split="train", image_size=size, channels=channels)
    train_x, _ = stack_tiles(train, classes)
    distances = {"space": f"evaluator features ({card['arch']}, {card['feature_dim']}-d pooled)",
                 "overall": feature_distances(gen_feat, real_feat, m, cfg.run.seed),
                 "reference": reference_distances(model, card, train, classes, generated, real_feat, m,
                                                  cfg.run.seed, device, cfg.evaluator.batch_size)}
    ref_frechet = distances["reference"].get("frechet")
    distances["frechet_ratio"] = distances["overall"]["frechet"] / ref_frechet \
        if ref_frechet and distances["overall"]["frechet"] is not None else None
    intensity = intensity_by_class(generated, real, train, classes)
    copies = {"computed": False, "reason": "the scored real tiles are the train split: nothing is held out"}
    if split != "train":
        train_feat, _ = evaluator_outputs(model, card, train_x, device, cfg.evaluator.batch_size)
        copies = {"computed": True, **copy_check(gen_x, real_x, train_x, generated_features=gen_feat,
                                                   held_out_features=real_feat, train_features=train_feat)}
    orientation = orientation_by_class(generated, real, classes)
    if m.per_class:
        distances["per_class"] = {name: feature_distances(gen_feat[gen_y == i], real_feat[real_y == i], m, cfg.run.seed + i)
                                  for i, name in enumerate(classes)}
    utility = {"computed": False, "reason": "utility.enabled is false"}
    if cfg.utility.enabled:
        budget = f"{cfg.utility.steps} steps" if cfg.utility.steps else f"{cfg.utility.epochs} epochs"
        log_line(f"utility: training 4 {cfg.utility.arch} classifiers ({budget} each)", True)
        utility = utility_scores(cfg, classes, generated, real, train, device, split)

    warnings = []
    if independence["is_alignment_expert"]:
        warnings.append("the evaluator IS the alignment expert (evaluator.allow_alignment_expert): generation "
                        "accuracy is not an independent measure")
    elif independence["shares_training_tiles"]:
        warnings.append(f"the evaluator shares training tiles with the alignment expert "
                        f"({independence['independence_basis']}; evaluator.allow_alignment_expert): generation "
                        "accuracy is not an independent measure")
    elif not independence["alignment_expert_known"]:
        warnings.append("the alignment expert is unknown (no run card in the sample manifest, no "
                        "evaluator.alignment_expert): independence of the evaluator was not checked")
    report = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tool_version": __version__,
        "git_commit": git_commit(),
        "samples": {"path": str(folder.resolve()), "count": len(gen_x),
                    "per_class": {n: len(generated[n]) for n in classes},
                    "image": {"size": size, "channels": channels},
                    "run": (manifest or {}).get("run"), "sampler": (manifest or {}).get("sampler"),
                    "weights": (manifest or {}).get("weights"), "filter": (manifest or {}).get("filter")},
        "real": {"shards": str(shards.resolve()), "split": split, "subset": cfg.real.subset,
                 "count": len(real_x), "per_class": {n: len(real[n]) for n in classes}},
        "evaluator": {"card": card["_path"], "arch": card["arch"], "sha256": card["sha256"],
                      "card_val_accuracy": card.get("val_accuracy"), "selection": evaluator_selection(card, cfg, split),
                      **independence},
        "classes": classes,
        "generation_accuracy": {**accuracy_from_confusion(confusion, classes), "confusion": confusion.tolist()},
        "real_accuracy": {**accuracy_from_confusion(real_confusion, classes), "confusion": real_confusion.tolist()},
        "diversity": {"metric": "1 - mean SSIM over random pairs (torchmetrics SSIM, data_range 1)",
                      "pairs_per_class": m.ssim_pairs, "per_class": diversity, "mean": mean_div},
        "distances": distances,
        "intensity": intensity,
        "orientation": orientation,
        "copies": copies,
        "inception_fid": inception_fid(m.inception_weights, gen_x, real_x),
        "utility": utility,
        "warnings": warnings,
        "config": cfg.model_dump(mode="json"),
    }
    report = json_safe(report)
    if write:
        with atomic_output_dir(out, overwrite=cfg.run.overwrite, made_by="report.json") as staging:
            write_outputs(staging, report, confusion, classes, generated, real, cfg,
                          train=train_x)
            save_config(cfg, staging / "config.yaml")
        log_line(f"wrote {out}: generation accuracy {report['generation_accuracy']['overall']:.3f}, "
                 f"Frechet distance {fmt(distances['overall']['frechet'])}", True)
    return report


def scored_split(shards: Path, wanted: str) -> str:
    """The real split an evaluation scores: `wanted`, or for "auto" the test part where the shards have one
    (no model trains or picks anything on it) and val otherwise."""
    if wanted != "auto":
        return wanted
    return "test" if load_manifest(shards)["splits"]["test"]["count"] else "val"


def evaluate_samples(samples: str | Path, evaluator: str | Path, out_dir: str | Path | None = None,
                     **overrides) -> dict:
    """Library entry: evaluate a sample set with an evaluator card and return the report dict; writes the
    report folder when `out_dir` is given. Other settings as section__key=value, e.g.
    `evaluate_samples(s, card, out, utility__enabled=False, real__shards="runs/shards")`."""
    return evaluate(evaluate_config(samples, evaluator, out_dir, **overrides), write=out_dir is not None)


def evaluate_config(samples: str | Path, evaluator: str | Path, out_dir: str | Path | None = None,
                    **overrides) -> EvaluateConfig:
    """An EvaluateConfig from a sample set, an evaluator card and a report folder; other settings as
    section__key=value."""
    tree: dict = {"samples": str(samples), "evaluator": {"card": str(evaluator)}}
    if out_dir is not None:
        tree["run"] = {"out_dir": str(out_dir)}
    with_settings(tree, overrides)
    return build_config(EvaluateConfig, tree, "evaluate_samples")


def run(cfg: EvaluateConfig) -> int:
    evaluate(cfg)
    print(Path(cfg.run.out_dir) / "report.json", flush=True)  # the one line on stdout: where the report is
    return 0


def main(argv=None) -> None:
    run_entry("evaluate", EvaluateConfig, run, argv)


if __name__ == "__main__":
    main()
