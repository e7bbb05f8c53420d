"""`fadscale demo`: the whole pipeline on built-in procedural tiles (or your own) with CPU-sized models,
ending in `report.html` (one self-contained file) and `report.md`."""

from __future__ import annotations

import io
import shutil
import sys
import time
from pathlib import Path

import torch

from fadscale import __version__
from fadscale.artifacts import EXPERT_CARD, RUN_CARD
from fadscale.core.evaluation.report import accuracy_interval, report_value
from fadscale.data.download import DATASETS, fetch, is_named_dataset
from fadscale.data.sources import holds_colour
from fadscale.pipeline import document
from fadscale.pipeline.plan import Plan, recipe_steps, run_pipeline, stage_names
from fadscale.errors import FadscaleError
from fadscale.runtime.io import atomic_write_bytes, atomic_write_text
from fadscale.runtime.logging import log_line, read_metrics
from fadscale.training.backend import resolve_precision

# Seconds per stage measured on a 2-core CPU with native bf16 (for the ETA only), per recipe.
EXPECTED_SECONDS = {
    "tiny": {"shard": 5, "expert A (alignment)": 20, "expert B (evaluator)": 20, "feature cache": 5,
             "train vanilla": 210, "sample vanilla": 35, "evaluate vanilla": 20,
             "train fad": 215, "sample fad": 35, "evaluate fad": 20},
    "kather16": {"shard": 12, "expert A (alignment)": 45, "expert B (evaluator)": 100, "feature cache": 12,
                 "train vanilla": 310, "sample vanilla": 26, "evaluate vanilla": 28,
                 "train fad": 320, "sample fad": 26, "evaluate fad": 28},
}
# The demo's sampler and learning-curve cadence (docs/results/recipe.md, for what they buy).
SAMPLER = ["sample.scheduler=dpm++", "sample.steps=25"]
# On real tiles the stochastic DPM-Solver++ (re-noising at each step) makes tiles the evaluator recognises
# more often and nearer the real ones, at the same cost (picked on val tiles: docs/results/real-tiles.md).
REAL_TILE_SAMPLER = ["sample.scheduler=dpm++-sde", "sample.steps=25"]
# The real-tile recipe's AdamW at 4e-3 is picked for the demo's length. Held high for longer it has collapsed
# (cosine over 20,000 steps: dead at step ~5,750); StableAdamW's update clipping trained those 20,000 steps
# through but costs quality at 4,600 (docs/results/real-tiles.md), so it takes over only past the longest
# AdamW run measured whole.
LONG_RUN_STEPS = 10_000
LONG_RUN_OPTIMIZER = "optim.name=stableadamw"
EVAL_EVERY = 100
# For the ETA on a CPU without native bf16 (the UNets train in fp32): training seconds per arm measured on
# 2 cores of an AVX2 EPYC, 548, over the table above (bf16, another 2-core machine), 212.
FP32_CPU_SLOWDOWN = 2.6

METRICS = [  # (label, path in the evaluation report, higher is better; None: closest to the real tiles)
    ("generation accuracy (evaluator top-1)", ("generation_accuracy", "overall"), True),
    ("evaluator accuracy on the scored real tiles (reference)", ("real_accuracy", "overall"), True),
    ("Frechet distance (evaluator features)", ("distances", "overall", "frechet"), False),
    ("Frechet, real train vs scored real, same count (reference)", ("distances", "reference", "frechet"), False),
    ("precision, real train vs scored real (reference)", ("distances", "reference", "precision"), True),
    ("recall, real train vs scored real (reference)", ("distances", "reference", "recall"), True),
    ("Frechet ratio (generated / reference)", ("distances", "frechet_ratio"), False),
    ("KID", ("distances", "overall", "kid"), False),
    ("precision", ("distances", "overall", "precision"), True),
    ("recall", ("distances", "overall", "recall"), True),
    ("largest class intensity gap (vs real)", ("intensity", "max_abs_gap"), False),
    ("SSIM diversity (1 - mean SSIM)", ("diversity", "mean", "generated"), None),
    ("SSIM diversity of the scored real tiles (reference)", ("diversity", "mean", "real"), None),
    ("largest class colour gap, R/G/B (vs real)", ("intensity", "max_abs_channel_gap"), False),
    ("copy share, pixels (held-out real: ~0.05)", ("copies", "pixels", "share"), False),
    ("copy share, evaluator features (held-out real: ~0.05)", ("copies", "features", "share"), False),
    ("train-on-synthetic accuracy", ("utility", "setups", "synthetic", "overall"), True),
    ("train-on-real accuracy, same count (reference)", ("utility", "setups", "real (same count)", "overall"), True),
    ("real + synthetic accuracy", ("utility", "setups", "real+synthetic", "overall"), True),
    ("real-only accuracy, all train tiles (reference)", ("utility", "setups", "real", "overall"), True),
]

def quality_bar(report: dict, real_tiles: bool = False) -> list[tuple[str, float | None, str, bool | None]]:
    """(what, measured, bar, passed) for one arm's evaluation report. The built-in tiles' bar is the issue
    "Tiles that look like their class"; on real tiles (`real_tiles`) the issue "Real tiles" asks more:
    train-on-synthetic against train-on-real at the same count, no copies, every class's colour."""
    acc = report_value(report, ("generation_accuracy", "overall"))
    real = report_value(report, ("real_accuracy", "overall"))
    ratio = report_value(report, ("distances", "frechet_ratio"))
    syn = report_value(report, ("utility", "setups", "synthetic", "overall"))

    def check(value, ok):
        return None if value is None else bool(ok(value))

    interval = accuracy_interval(report, "real_accuracy")
    if real_tiles:
        same = report_value(report, ("utility", "setups", "real (same count)", "overall"))
        ratio_syn = syn / same if syn is not None and same else None
        copies = report_value(report, ("copies", "share"))
        colour = report_value(report, ("intensity", "max_abs_channel_gap"))
        return [
            ("generation accuracy", acc, f">= {real or 0:.3f} (the evaluator on real "
             f"{(report.get('real') or {}).get('split', 'test')} tiles{'; ' + interval if interval else ''})",
             check(acc, lambda v: v >= (real or 0.0))),
            ("Frechet / real-vs-real Frechet", ratio, "<= 2", check(ratio, lambda v: v <= 2.0)),
            ("train-on-synthetic / train-on-real, same count", ratio_syn,
             f">= 0.8 (real: {_fmt(same)}, synthetic: {_fmt(syn)})", check(ratio_syn, lambda v: v >= 0.8)),
            ("copy share (nearer a training tile than 95% of held-out tiles)", copies, "<= 0.10",
             check(copies, lambda v: v <= 0.10)),
            ("largest per-class mean colour gap (R, G, B)", colour, "<= 0.05", check(colour, lambda v: v <= 0.05)),
        ]
    gap = report_value(report, ("intensity", "max_abs_gap"))
    bar_acc = max(real or 0.0, 0.75)
    return [
        ("generation accuracy", acc, f">= {bar_acc:.3f} (the larger of the evaluator's real-tile accuracy, "
                                     f"{_fmt(real)}{' (' + interval + ')' if interval else ''}, and 0.75)",
         check(acc, lambda v: v >= bar_acc)),
        ("Frechet / real-vs-real Frechet", ratio, "<= 2", check(ratio, lambda v: v <= 2.0)),
        ("largest per-class intensity gap", gap, "<= 0.05", check(gap, lambda v: v <= 0.05)),
        ("train-on-synthetic accuracy", syn, ">= 0.60", check(syn, lambda v: v >= 0.60)),
    ]


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buffer.getvalue()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_curves(runs: dict[str, Path]) -> bytes:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for arm, folder in runs.items():
        records = [r for r in read_metrics(folder) if "loss/noise" in r]
        axes[0].plot([r["step"] for r in records], [r["loss/noise"] for r in records], label=arm)
        aligned = [r for r in records if "loss/align" in r]
        if aligned:
            axes[1].plot([r["step"] for r in aligned], [r["loss/align"] for r in aligned], label=arm)
    axes[0].set_title("noise loss (MSE, lower is better)")
    axes[1].set_title("alignment loss (1 - cosine)")
    return _step_plot(fig, axes)


def _step_plot(fig, axes) -> bytes:
    """Finish a figure of curves against training steps: axis label, legend, grid; its PNG bytes."""
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def curve_points(folder: Path) -> list[dict]:
    """The learning-curve points of a run (eval.every): step, generation accuracy, Frechet."""
    return [r for r in read_metrics(folder) if "eval/generation_accuracy" in r]


def learning_curves(runs: dict[str, Path], real_accuracy: float | None) -> bytes | None:
    """Generation accuracy and Frechet distance against training steps, one line per arm."""
    points = {arm: curve_points(folder) for arm, folder in runs.items()}
    if not any(points.values()):
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for arm, rows in points.items():
        steps = [r["step"] for r in rows]
        axes[0].plot(steps, [r["eval/generation_accuracy"] for r in rows], marker="o", label=arm)
        axes[1].plot(steps, [r["eval/frechet"] for r in rows], marker="o", label=arm)
    if real_accuracy is not None:
        axes[0].axhline(real_accuracy, color="gray", linestyle="--", label="evaluator on real tiles")
    axes[0].set_title("generation accuracy (higher is better)")
    axes[1].set_title("Frechet distance, evaluator features (lower is better)")
    axes[1].set_yscale("log")
    return _step_plot(fig, axes)


def comparison_grid(result: dict, per_row: int = 8) -> bytes:
    """One row per class: the scored real tiles (test, else val) | each arm's samples (large enough to see
    the tissue)."""
    plt = _pyplot()
    from fadscale.core.evaluation.inputs import load_real_tiles, load_sample_set

    reports = result["reports"]
    first = next(iter(reports.values()))
    classes = first["classes"]
    size, channels = first["samples"]["image"]["size"], first["samples"]["image"]["channels"]
    split = first["real"]["split"]
    columns = {f"real ({split})": load_real_tiles(result["shards"], classes, split=split, image_size=size,
                                                  channels=channels, max_per_class=per_row)}
    for arm in reports:
        columns[arm] = load_sample_set(result["out"] / f"samples-{arm}", classes)[2]
    fig, axes = plt.subplots(len(classes), len(columns), figsize=(6.4 * len(columns), 0.86 * len(classes) + 0.6),
                             squeeze=False)
    for row, name in enumerate(classes):
        for col, (label, tiles) in enumerate(columns.items()):
            strip = tiles[name][:per_row]
            image = torch.cat(list(strip), dim=-1)
            ax = axes[row, col]
            if channels == 1:
                ax.imshow(image[0].numpy(), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            else:
                ax.imshow(image.permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(label)
            if col == 0:
                ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
    fig.tight_layout()
    return _png(fig)


def generated_confusion(reports: dict) -> bytes:
    """The evaluator's confusion on each arm's generated tiles, rows normalised: row = the class asked for,
    column = what the evaluator saw; the diagonal is each class's generation accuracy."""
    plt = _pyplot()
    import numpy as np

    fig, axes = plt.subplots(1, len(reports), figsize=(5.2 * len(reports), 4.6), squeeze=False)
    for ax, (arm, report) in zip(axes[0], reports.items()):
        classes = report["classes"]
        counts = np.asarray(report["generation_accuracy"]["confusion"], dtype=float)
        shares = counts / np.maximum(counts.sum(1, keepdims=True), 1)
        ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
        for i in range(len(classes)):
            for j in range(len(classes)):
                if counts[i, j]:
                    ax.text(j, i, f"{shares[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if shares[i, j] > 0.6 else "black")
        ax.set_xticks(range(len(classes)), classes, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(len(classes)), classes, fontsize=8)
        ax.set_xlabel("evaluator's class")
        ax.set_ylabel("class asked for")
        ax.set_title(f"{arm}: generation accuracy {report['generation_accuracy']['overall']:.3f}")
    fig.tight_layout()
    return _png(fig)


def metrics_rows(reports: dict) -> list[tuple[str, float | None, float | None, float | None, bool | None]]:
    rows = []
    for label, path, higher in METRICS:
        vanilla, fad = report_value(reports.get("vanilla", {}), path), report_value(reports.get("fad", {}), path)
        diff = fad - vanilla if vanilla is not None and fad is not None else None
        rows.append((label, vanilla, fad, diff, higher))
    return rows


def per_class_rows(reports: dict) -> list[list[str]]:
    """class | evaluator on real | real colour (R/G/B, or intensity) | real orientation | per arm: generation
    accuracy, the largest colour (or intensity) gap, orientation."""
    first = next(iter(reports.values()))
    rows = []
    for name in first["classes"]:
        level = ((first.get("intensity") or {}).get("per_class") or {}).get(name) or {}
        real = "/".join(f"{v:.2f}" for v in level.get("channels_real") or [level.get("real") or 0.0])
        row = [name, _fmt(report_value(first, ("real_accuracy", "per_class", name))), real,
               _fmt(report_value(first, ("orientation", "per_class", name, "real")))]
        for report in reports.values():
            own = ((report.get("intensity") or {}).get("per_class") or {}).get(name) or {}
            gaps = own.get("channel_gap") or [own.get("gap")]
            gap = max(gaps, key=lambda g: abs(g or 0.0)) if gaps and None not in gaps else None
            row += [_fmt(report_value(report, ("generation_accuracy", "per_class", name))), _fmt(gap),
                    _fmt(report_value(report, ("orientation", "per_class", name, "generated")))]
        rows.append(row)
    return rows


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:+.3f}" if isinstance(value, float) and value < 0 else \
        (f"{value:.3f}" if value is not None else "n/a")


def _direction(higher: bool | None) -> str:
    return "higher" if higher else "lower" if higher is False else "close to real"


def _verdict(diff: float | None, higher: bool | None) -> str:
    if diff is None or higher is None or diff == 0:
        return ""
    return " (better)" if (diff > 0) == higher else " (worse)"


ORIENTATION_NOTE = ("Orientation: how strongly a tile's edges run one way (0..1: 1 all parallel, near 0 "
                    "isotropic; mean over tiles). A generated value far below the real one means the oriented fine "
                    "structure (stroma's fibres) is missing, whatever the accuracy says.")

COLLAPSE_WARNING = 0.9  # a target whose top direction holds this share of its variance says little per tile


def collapse_note(runs: dict[str, Path]) -> str | None:
    """The FAD run's collapse diagnostic (run card `alignment_diagnostic`) as one sentence, with a warning
    when the alignment target has collapsed onto one direction."""
    card_path = runs.get("fad", Path("-")) / "final" / "run_card.json"
    if not card_path.is_file():
        return None
    diagnostic = RUN_CARD.read(card_path).get("alignment_diagnostic") or {}
    share, expert = diagnostic.get("target_top_direction_share"), diagnostic.get("expert_top_direction_share")
    if share is None:
        return None
    text = (f"Alignment target collapse check: the top principal direction holds {share:.3f} of the FAD target's "
            f"variance over {diagnostic.get('tiles')} tiles (the expert's own features: {_fmt(expert)}; 1 means every "
            f"tile's target points one way).")
    if share >= COLLAPSE_WARNING:
        text += (" WARNING: the target has collapsed, so the alignment loss asks almost nothing tile-specific of "
                 "the UNet. The repa projector (a fixed target: the expert's own map) cannot collapse; "
                 "align.center_target=true alone does not prevent it (docs/results/fad-vs-vanilla-procedural.md).")
    return text


def write_report(result: dict, out: Path, total_seconds: float, command: str) -> Path:
    reports = result["reports"]
    runs = {arm: out / arm for arm in reports}
    alignment_card = EXPERT_CARD.read(result["alignment_expert"])
    evaluator_card = EXPERT_CARD.read(result["evaluator"])
    real_accuracy = report_value(next(iter(reports.values())), ("real_accuracy", "overall"))
    images = {
        "samples": comparison_grid(result),
        "losses": loss_curves(runs),
        "generated-confusion": generated_confusion(reports),
        "confusion": (Path(result["alignment_expert"]).parent / "confusion.png").read_bytes(),
    }
    for arm in reports:
        pairs = out / f"eval-{arm}" / "copies.png"
        if pairs.is_file():
            images[f"copies-{arm}"] = pairs.read_bytes()
    curves = learning_curves(runs, real_accuracy)
    if curves is not None:
        images["curves"] = curves
    for name, data in images.items():
        atomic_write_bytes(out / f"report-{name}.png", data)
    rows = metrics_rows(reports)
    arms = list(reports)
    real_tiles = result.get("recipe") == "kather16"
    split = next(iter(reports.values()))["real"]["split"]
    bars = {arm: quality_bar(report, real_tiles) for arm, report in reports.items()}
    timings = result["timings"]
    class_rows = per_class_rows(reports)
    collapse = collapse_note(runs)
    class_header = ["class", "evaluator on real", "real colour", "real orientation"] + \
        [f"{arm} {what}" for arm in arms for what in ("gen. accuracy", "colour gap", "orientation")]

    def bar_cell(arm: str, i: int) -> str:
        what, value, _, passed = bars[arm][i]
        interval = accuracy_interval(reports[arm], "generation_accuracy") if what == "generation accuracy" else ""
        interval = f" ({interval})" if interval else ""
        return f"{_fmt(value)}{interval} {'pass' if passed else 'FAIL' if passed is False else ''}".strip()

    bar_names = [(what, bar) for what, _, bar, _ in next(iter(bars.values()))]
    trained = RUN_CARD.read(runs[arms[0]] / "final")["config"]
    training = f"{trained['train']['max_steps']:,} at batch {trained['data']['batch_size']}"
    if trained["train"].get("crop"):
        training += f", on random {trained['train']['crop']} px windows of the {trained['data']['image_size']} px tiles"

    def tone(passed: bool | None) -> str:
        return "good" if passed else "bad" if passed is False else ""

    def diff_tone(diff, higher) -> str:
        verdict = _verdict(diff, higher)
        return "good" if verdict == " (better)" else "bad" if verdict == " (worse)" else ""

    blocks: list[document.Block] = [
        document.Heading("fadscale demo report", 1),
        document.Paragraph(f"fadscale {__version__}; {time.strftime('%Y-%m-%d %H:%M')}; {torch.get_num_threads()} CPU "
                         f"threads; total {total_seconds:.0f} s." + (
                             f" The arms trained side by side, one process each ({result['arm_processes']} "
                             "processes sharing the threads), so their stage times below overlap."
                             if result.get("arm_processes", 1) > 1 else "")),
        document.Paragraph(
            "Vanilla = plain training; FAD = the same plus the feature-alignment loss. Both use the same "
            f"seed, steps ({training}), UNet "
            f"({trained['model']['preset']}) and sampler. Scored by an evaluator trained on tiles (split B) that the "
            f"alignment expert (split A) never saw, against real {split} tiles that no model trained on"
            + (" or picked anything on" if split == "test" else "") + "."),
        document.Heading("Class-faithful? The bar"),
        document.Table(["check", "bar", *arms],
                     [[what, bar, *(bar_cell(arm, i) for arm in arms)] for i, (what, bar) in enumerate(bar_names)],
                     [["", "", *(tone(bars[arm][i][3]) for arm in arms)] for i in range(len(bar_names))]),
        document.Paragraph(
            "Each figure is one draw of generated tiles. The 95% intervals of the accuracies (Wilson, over the tiles "
            "scored, the evaluator fixed) say how far another draw of as many tiles could move them: where an arm's "
            "interval overlaps the evaluator's own, its pass or FAIL on that line is within sampling noise."),
        document.Heading("Samples (real | " + " | ".join(arms) + ")"),
        document.Image("samples"),
        document.Heading("Metrics"),
        document.Table(["metric", "better", "vanilla", "FAD", "FAD - vanilla"],
                     [[label, _direction(higher), _fmt(vanilla), _fmt(fad), _fmt(diff) + _verdict(diff, higher)]
                      for label, vanilla, fad, diff, higher in rows],
                     [["", "", "", "", diff_tone(diff, higher)] for _, _, _, diff, higher in rows]),
        document.Paragraph(f"Alignment expert ({alignment_card['arch']}, split A) val accuracy: "
                         f"{alignment_card['val_accuracy']:.3f}; evaluator ({evaluator_card['arch']}, split B): "
                         f"{evaluator_card['val_accuracy']:.3f}."),
        document.Paragraph("One seed of a demo-sized run shows what the pipeline makes; it is not evidence for or "
                         "against FAD: docs/results/fad-vs-vanilla.md is the seeded study on real tiles."),
        *([document.Paragraph(collapse, "bad" if "WARNING" in collapse else "")] if collapse else []),
        document.Heading("Per class"),
        document.Paragraph(ORIENTATION_NOTE),
        document.Table(class_header, class_rows),
    ]
    if "curves" in images:
        blocks += [document.Heading("Learning curves (generation scored during training)"), document.Image("curves")]
    for arm in arms:
        if f"copies-{arm}" in images:
            blocks += [document.Heading(f"Copy check, {arm}: the closest pairs (generated | nearest training tile)"),
                       document.Image(f"copies-{arm}")]
    blocks += [
        document.Heading("Evaluator on generated tiles: confusion (row: the class asked for; diagonal: generation "
                       "accuracy)"),
        document.Image("generated-confusion"),
        document.Heading("Loss curves"), document.Image("losses"),
        document.Heading("Alignment expert: confusion matrix (val, split A)"), document.Image("confusion"),
        document.Heading("Timings"),
        document.Table(["stage", "seconds"], [[name, f"{seconds:.1f}"] for name, seconds in timings.items()]),
        document.Heading("Reproduce"), document.Code([command]),
        document.Paragraph("Each stage on its own, with the demo's settings (the same code the demo runs):"),
        document.Code(result["commands"]),
    ]
    atomic_write_text(out / "report.md", document.markdown(blocks))
    atomic_write_text(out / "report.html", document.html(blocks, "fadscale demo report", images))
    return out / "report.html"


# --preset gpu: tiny-sd's UNet at 64 px (the reference's size) on real tiles, bf16, batch 64, one GPU; the
# experts at 64 px too (the expert sees the UNet's tile size in this pipeline). Not yet run: no GPU lent.
GPU_PRESET = dict(
    image_size=64, per_class=64, eval_every=500,
    expert=["train.epochs=12", "data.batch_size=64"],
    fad=["model.preset=tiny-sd", "model.gradient_checkpointing=true", "data.batch_size=64", "optim.lr=2e-4",
         "optim.warmup_steps=200", "train.max_steps=6000", "train.ema_decay=0.999", "train.log_every=50",
         "checkpoint.every=1000", "eval.per_class=16"])


def demo_plan(out: Path, data: str | None = None, quick: bool = False, steps: int | None = None,
              preset: str = "cpu", grayscale: bool = False) -> Plan:
    """What the demo runs: the built-in tiles with configs/tiny's recipe, or `data`; where `data` holds colour
    tiles (real H&E), configs/kather16's: RGB, and a test part (20% of each class) that the evaluation
    scores and nothing trains or picks on.

    `quick`: the smallest setting (a smoke test of every stage in about a minute): 96 tiles, 1 expert
    epoch, the cpu-tiny UNet for 6 steps (two learning-curve points), 3 samples per class, no utility
    classifiers. `steps`: training steps per arm instead of the recipe's (1,200 on built-in tiles, 2,500 on real ones),
    in proportionally more time (docs/results/procedural-demo.md and real-tiles.md say what longer runs
    measured); learning-curve points stay about a dozen per run."""
    plan = Plan(out=out, source=str(Path(data).resolve()) if data else Plan.source, eval_every=EVAL_EVERY,
                sample_overrides=list(SAMPLER))
    if data and holds_colour(data):
        plan.recipe, plan.channels, plan.val_fraction, plan.test_fraction = "kather16", 3, 0.1, 0.2
        plan.sample_overrides = list(REAL_TILE_SAMPLER)
        plan.eval_every = recipe_steps("kather16") // 10
        # The judge as strong as the budget allows: a weak evaluator makes every generator look faithful,
        # and training it longer costs about a minute (docs/results/real-tiles.md has what it bought).
        plan.evaluator_overrides = ["train.epochs=16"]
    if grayscale:  # the reference's setting: tiles trained and judged in grey
        plan.channels = 1
    if preset == "gpu":
        plan.image_size, plan.per_class, plan.eval_every = (GPU_PRESET[k] for k in ("image_size", "per_class",
                                                                                    "eval_every"))
        plan.expert_overrides = list(GPU_PRESET["expert"])
        plan.fad_overrides = list(GPU_PRESET["fad"])
    if quick:
        if not data:
            plan.source = "procedural:per_class=12,size=32,seed=0"
        plan.expert_overrides = ["train.epochs=1"]
        plan.fad_overrides = ["train.max_steps=6", "checkpoint.every=6", "model.preset=cpu-tiny",
                              "data.batch_size=8", "eval.per_class=2", "eval.steps=3"]
        plan.eval_every = 3
        plan.per_class = 3
        plan.sample_overrides = [o for o in plan.sample_overrides if not o.startswith("sample.steps=")] + ["sample.steps=5"]
        plan.eval_overrides = ["utility.enabled=false"]
    if steps is not None:
        plan.fad_overrides = [o for o in plan.fad_overrides if not o.startswith(("train.max_steps=", "checkpoint.every="))]
        plan.fad_overrides += [f"train.max_steps={steps}", f"checkpoint.every={max(1, steps // 3)}"]
        plan.eval_every = max(1, steps // (2 if quick else 12))
        if plan.recipe == "kather16" and preset == "cpu" and steps > LONG_RUN_STEPS:
            plan.fad_overrides.append(LONG_RUN_OPTIMIZER)
    return plan


def run_demo(out: str | Path, data: str | None = None, overwrite: bool = False, quick: bool = False,
             steps: int | None = None, preset: str = "cpu", grayscale: bool = False) -> Path:
    """Run the pipeline into `out` and write the report; returns the path of report.html (see `demo_plan`
    for `quick` and `steps`)."""
    out = Path(out)
    if steps is not None and steps < 1:
        raise FadscaleError(f"--steps {steps}: expected a positive number of training steps")
    if data is not None and is_named_dataset(data) and not Path(data).exists():
        data = str(fetch(data))  # a published data set by name: downloaded once, md5-checked, then cached
    if data is not None and not Path(data).exists():
        raise FadscaleError(f"--data {data}: no such folder or zip (or data set to download: "
                            f"{', '.join(sorted(DATASETS))})")
    if preset not in ("cpu", "gpu"):
        raise FadscaleError(f"--preset {preset}: expected cpu or gpu")
    if preset == "gpu" and not torch.cuda.is_available():
        raise FadscaleError("--preset gpu trains tiny-sd at 64 px and needs a CUDA GPU; none is visible here "
                            "(torch.cuda.is_available() is False). Run it on a GPU machine, or drop --preset for "
                            "the CPU recipe")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FadscaleError(f"{out}: demo folder already exists (pass --overwrite to replace it)")
        # --overwrite deletes only an earlier demo's folder, and never one that holds the data.
        if not ((out / "shards" / "manifest.json").is_file() or (out / "report.md").is_file()):
            raise FadscaleError(f"{out}: not replaced: it is not a demo folder (no shards/manifest.json or "
                                f"report.md); choose another --out")
        if data is not None and Path(data).resolve().is_relative_to(out.resolve()):
            raise FadscaleError(f"{out}: not replaced: it holds the --data {data}")
        shutil.rmtree(out)
    plan = demo_plan(out, data, quick, steps, preset, grayscale)
    if LONG_RUN_OPTIMIZER in plan.fad_overrides:
        log_line(f"--steps {steps}: past {LONG_RUN_STEPS:,} steps the real-tile recipe trains with {LONG_RUN_OPTIMIZER} "
                 f"(AdamW at its learning rate has collapsed on runs that long; docs/results/real-tiles.md)")
    expected = {name: EXPECTED_SECONDS[plan.recipe].get(name, 10) for name in stage_names(plan)}
    if steps is not None:  # training time grows with the steps (the default recipe's count is what was timed)
        expected.update({name: cost * steps / recipe_steps(plan.recipe) for name, cost in expected.items()
                         if name.startswith("train ")})
    if not quick and resolve_precision("auto") == "no":
        # The recipe's mixed_precision auto trains in fp32 here; the expected costs were timed with bf16.
        expected.update({name: cost * FP32_CPU_SLOWDOWN for name, cost in expected.items() if name.startswith("train ")})
        log_line("note: this CPU has no native bf16 (AVX512-BF16 or AMX), so the UNets train in fp32: on 2 cores "
                 "of an AVX2 AMD EPYC the demo took about 21 minutes, against 8 where bf16 is native")
    started = time.perf_counter()
    result = run_pipeline(plan, expected)
    command = "fadscale demo " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["demo"] else f"fadscale demo --out {out}"
    return write_report(result, out, time.perf_counter() - started, command)
