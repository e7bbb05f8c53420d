"""`fadscale demo`: the whole pipeline on built-in procedural tiles (or your own) with CPU-sized models,
ending in `report.html` (one self-contained file) and `report.md`."""

from __future__ import annotations

import base64
import html
import io
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from fadscale import __version__
from fadscale.evaluate import report_value
from fadscale.pipeline import Plan, run_pipeline, stage_names
from fadscale.runtime.io import FadscaleError, atomic_write_bytes, atomic_write_text
from fadscale.runtime.logging import read_metrics

# Seconds per stage measured on a 2-core CPU (for the ETA only).
EXPECTED_SECONDS = {"shard": 5, "expert A (alignment)": 40, "expert B (evaluator)": 40, "feature cache": 15,
                    "train vanilla": 60, "sample vanilla": 10, "evaluate vanilla": 25,
                    "train fad": 70, "sample fad": 10, "evaluate fad": 25}

METRICS = [  # (label, path in the evaluation report, higher is better)
    ("generation accuracy", ("generation_accuracy", "overall"), True),
    ("SSIM diversity (1 - mean SSIM)", ("diversity", "mean", "generated"), True),
    ("Frechet distance (evaluator features)", ("distances", "overall", "frechet"), False),
    ("KID", ("distances", "overall", "kid"), False),
    ("precision", ("distances", "overall", "precision"), True),
    ("recall", ("distances", "overall", "recall"), True),
    ("train-on-synthetic accuracy (real val)", ("utility", "setups", "synthetic", "overall"), True),
    ("real + synthetic accuracy (real val)", ("utility", "setups", "real+synthetic", "overall"), True),
    ("real-only accuracy (real val, reference)", ("utility", "setups", "real", "overall"), True),
]


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buffer.getvalue()


def loss_curves(runs: dict[str, Path]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for arm, folder in runs.items():
        records = read_metrics(folder)
        steps = [r["step"] for r in records]
        axes[0].plot(steps, [r["loss/noise"] for r in records], label=arm)
        if any("loss/align" in r for r in records):
            axes[1].plot([r["step"] for r in records if "loss/align" in r],
                         [r["loss/align"] for r in records if "loss/align" in r], label=arm)
    axes[0].set_title("noise loss (MSE)")
    axes[1].set_title("alignment loss (1 - cosine)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def comparison_grid(result: dict, per_row: int = 6) -> bytes:
    """One row per class: real val tiles | vanilla samples | FAD samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fadscale.evaluate import load_real_tiles, load_sample_set

    reports = result["reports"]
    classes = next(iter(reports.values()))["classes"]
    size = next(iter(reports.values()))["samples"]["image"]["size"]
    columns = {"real": load_real_tiles(result["shards"], classes, split="val", image_size=size, channels=1,
                                       max_per_class=per_row)}
    for arm in reports:
        columns[arm] = load_sample_set(result["out"] / f"samples-{arm}", classes)[2]
    fig, axes = plt.subplots(len(classes), len(columns), figsize=(3.2 * len(columns), 0.62 * len(classes) + 0.5))
    for row, name in enumerate(classes):
        for col, (label, tiles) in enumerate(columns.items()):
            strip = tiles[name][:per_row]
            image = torch.cat(list(strip), dim=-1)[0].numpy()
            ax = axes[row, col]
            ax.imshow(image, cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(label)
            if col == 0:
                ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout()
    return _png(fig)


def metrics_rows(reports: dict) -> list[tuple[str, float | None, float | None, float | None, bool]]:
    rows = []
    for label, path, higher in METRICS:
        vanilla, fad = report_value(reports.get("vanilla", {}), path), report_value(reports.get("fad", {}), path)
        diff = fad - vanilla if vanilla is not None and fad is not None else None
        rows.append((label, vanilla, fad, diff, higher))
    return rows


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:+.4f}" if isinstance(value, float) and value < 0 else \
        (f"{value:.4f}" if value is not None else "n/a")


def write_report(result: dict, out: Path, total_seconds: float, command: str) -> Path:
    reports = result["reports"]
    alignment_card = json.loads(Path(result["alignment_expert"]).read_text())
    evaluator_card = json.loads(Path(result["evaluator"]).read_text())
    images = {
        "samples": comparison_grid(result),
        "losses": loss_curves({arm: out / arm for arm in reports}),
        "confusion": (Path(result["alignment_expert"]).parent / "confusion.png").read_bytes(),
    }
    for name, data in images.items():
        atomic_write_bytes(out / f"report-{name}.png", data)
    rows = metrics_rows(reports)
    real_div = report_value(next(iter(reports.values())), ("diversity", "mean", "real"))
    timings = result["timings"]

    md = [f"# fadscale demo report\n",
          f"fadscale {__version__}; {time.strftime('%Y-%m-%d %H:%M')}; {torch.get_num_threads()} CPU threads; "
          f"total {total_seconds:.0f} s.\n",
          "Vanilla = plain fine-tuning; FAD = the same plus the feature-alignment loss. Both use the same "
          "seed, steps, batch and sampler. Scored by an evaluator trained on tiles (split B) that the "
          "alignment expert (split A) never saw.\n",
          "## Metrics\n", "| metric | vanilla | FAD | FAD - vanilla |", "|---|---|---|---|"]
    for label, vanilla, fad, diff, higher in rows:
        arrow = "" if diff is None else (" (better)" if (diff > 0) == higher and diff != 0 else " (worse)" if diff else "")
        md.append(f"| {label} | {_fmt(vanilla)} | {_fmt(fad)} | {_fmt(diff)}{arrow} |")
    md += [f"\nReal val tiles' SSIM diversity (reference point): {_fmt(real_div)}.",
           f"Alignment expert ({alignment_card['arch']}, split A) val accuracy: {alignment_card['val_accuracy']:.3f}; "
           f"evaluator ({evaluator_card['arch']}, split B): {evaluator_card['val_accuracy']:.3f}.\n",
           "A demo-sized run (tiny models, minutes of CPU) is a smoke test of the pipeline, not evidence "
           "for or against FAD: see tools/bench_quality.py for the seeded experiment.\n",
           "## Samples (real | vanilla | FAD)\n", "![samples](report-samples.png)\n",
           "## Loss curves\n", "![losses](report-losses.png)\n",
           "## Alignment expert: confusion matrix (val, split A)\n", "![confusion](report-confusion.png)\n",
           "## Timings\n", "| stage | seconds |", "|---|---|"]
    md += [f"| {name} | {seconds:.1f} |" for name, seconds in timings.items()]
    md += ["\n## Reproduce\n", "```", command, "```",
           "Each stage on its own (the same code the demo runs):", "```",
           f"fadscale shard-data procedural:per_class=64,size=32 --out {out}/shards --grayscale --val-fraction 0.2",
           f"fadscale train-expert --config configs/tiny/expert.yaml --set data.shards={out}/shards "
           f"--set data.subset=A --set run.out_dir={out}/expert-A",
           f"fadscale train --config configs/tiny/fad.yaml --set data.shards={out}/shards "
           f"--set expert={out}/expert-A/expert.json --set cache.dir={out}/cache --set run.out_dir={out}/fad",
           f"fadscale sample --set model.path={out}/fad --set run.out_dir={out}/samples-fad",
           f"fadscale evaluate --set samples={out}/samples-fad --set evaluator.card={out}/expert-B/expert.json "
           f"--set run.out_dir={out}/eval-fad", "```"]
    atomic_write_text(out / "report.md", "\n".join(md) + "\n")

    def img(name: str) -> str:
        return f'<img alt="{name}" src="data:image/png;base64,{base64.b64encode(images[name]).decode()}">'

    table = "".join(
        f"<tr><td>{html.escape(label)}</td><td>{_fmt(v)}</td><td>{_fmt(f)}</td>"
        f"<td class='{'good' if d is not None and d != 0 and (d > 0) == hi else 'bad' if d else ''}'>{_fmt(d)}</td></tr>"
        for label, v, f, d, hi in rows)
    timing_rows = "".join(f"<tr><td>{html.escape(n)}</td><td>{s:.1f}</td></tr>" for n, s in timings.items())
    body = f"""<!doctype html><html><head><meta charset="utf-8"><title>fadscale demo report</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}
td:first-child,th:first-child{{text-align:left}}.good{{color:#176e2a}}.bad{{color:#a3261b}}img{{max-width:100%}}
pre{{background:#f4f4f4;padding:1em;overflow-x:auto}}</style></head><body>
<h1>fadscale demo report</h1>
<p>fadscale {__version__}, {html.escape(time.strftime('%Y-%m-%d %H:%M'))}, {torch.get_num_threads()} CPU threads,
total {total_seconds:.0f} s. Vanilla = plain fine-tuning; FAD = the same plus the feature-alignment loss (same seed,
steps, batch, sampler). Scored by an evaluator trained on tiles (split B) the alignment expert (split A) never saw.</p>
<h2>Metrics</h2><table><tr><th>metric</th><th>vanilla</th><th>FAD</th><th>FAD - vanilla</th></tr>{table}</table>
<p>Real val tiles' SSIM diversity: {_fmt(real_div)}. Alignment expert ({html.escape(alignment_card['arch'])}, split A)
val accuracy {alignment_card['val_accuracy']:.3f}; evaluator (split B) {evaluator_card['val_accuracy']:.3f}.
A demo-sized run is a smoke test of the pipeline, not evidence for or against FAD
(tools/bench_quality.py runs the seeded experiment).</p>
<h2>Samples: real | vanilla | FAD</h2>{img('samples')}
<h2>Loss curves</h2>{img('losses')}
<h2>Alignment expert: confusion matrix</h2>{img('confusion')}
<h2>Timings</h2><table><tr><th>stage</th><th>seconds</th></tr>{timing_rows}</table>
<h2>Reproduce</h2><pre>{html.escape(command)}</pre><p>Stage by stage: see report.md.</p>
</body></html>"""
    atomic_write_text(out / "report.html", body)
    return out / "report.html"


def run_demo(out: str | Path, data: str | None = None, overwrite: bool = False, quick: bool = False) -> Path:
    """Run the pipeline into `out` and write the report; returns the path of report.html.

    `quick`: the smallest setting (a smoke test of every stage in about a minute): 96 tiles, 1 expert
    epoch, the cpu-tiny UNet for 6 steps, 3 samples per class, no utility classifiers."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FadscaleError(f"{out}: demo folder already exists (pass --overwrite to replace it)")
        shutil.rmtree(out)
    if data is not None and not Path(data).exists():
        raise FadscaleError(f"--data {data}: no such folder or zip")
    plan = Plan(out=out, source=str(Path(data).resolve()) if data else Plan.source)
    if quick:
        if not data:
            plan.source = "procedural:per_class=12,size=32,seed=0"
        plan.expert_overrides = ["train.epochs=1"]
        plan.fad_overrides = ["train.max_steps=6", "checkpoint.every=6", "model.preset=cpu-tiny",
                              "data.batch_size=8"]
        plan.per_class = 3
        plan.sample_overrides = {"sample__steps": 5}
        plan.eval_overrides = {"utility__enabled": False}
    expected = {name: EXPECTED_SECONDS.get(name, 10) for name in stage_names(plan)}
    started = time.perf_counter()
    result = run_pipeline(plan, expected)
    command = "fadscale demo " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["demo"] else f"fadscale demo --out {out}"
    return write_report(result, out, time.perf_counter() - started, command)
