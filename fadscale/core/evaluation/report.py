"""The evaluation report: JSON-safe values, report.json / report.md / confusion.png / grids, and reading a
number back out of a report (`report_value`, for the demo and the benchmarks)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fadscale.artifacts import EVALUATION_REPORT
from fadscale.runtime.io import atomic_write_text
from fadscale.artifacts.sample_set import class_dir_name, write_grid

if TYPE_CHECKING:
    from fadscale.config import EvaluateConfig


def json_safe(value):
    """JSON-safe: NaN/inf -> None, tensors -> lists."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, torch.Tensor):
        return json_safe(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def mean_of(values: list) -> float | None:
    kept = [v for v in values if v is not None and math.isfinite(v)]
    return sum(kept) / len(kept) if kept else None


def fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def write_outputs(folder: Path, report: dict, confusion: torch.Tensor, classes: list[str],
                   generated: dict[str, torch.Tensor], real: dict[str, torch.Tensor], cfg: EvaluateConfig,
                   train: torch.Tensor | None = None) -> None:
    """Write report.json, report.md, confusion.png, grids/<CLASS>.png and, with the real train tiles
    (`train`, stacked in class order), copies.png: the copy check's closest pairs, one pair a row."""
    files = {"report": "report.json", "markdown": "report.md", "confusion": "confusion.png", "grids": {}}
    acc = report["generation_accuracy"]["overall"]
    save_confusion_png(confusion.double(), classes, folder / "confusion.png",
                       f"evaluator on generated tiles: accuracy {fmt(acc)}")
    for name in classes:
        count = min(cfg.report.grid, len(generated[name]), len(real[name]))
        rel = f"grids/{class_dir_name(name)}.png"
        write_grid(list(real[name][:count]) + list(generated[name][:count]), folder / rel, rows=2)
        files["grids"][name] = rel
    copies = report.get("copies") or {}
    if copies.get("computed") and copies.get("closest") and train is not None:
        flat_generated = torch.cat([generated[name] for name in classes])
        strip = []
        for pair in copies["closest"]:
            strip += [flat_generated[pair["generated"]], train[pair["train"]]]
        # Enlarged (nearest neighbour) to about 128 px a tile: at 32 px a reader cannot judge a copy.
        scale = max(1, 128 // strip[0].shape[-1])
        strip = [tile.repeat_interleave(scale, -1).repeat_interleave(scale, -2) for tile in strip]
        write_grid(strip, folder / "copies.png", rows=len(copies["closest"]))
        files["closest_pairs"] = "copies.png"
        copies["files"] = {"closest_pairs": "copies.png"}
    report["files"] = files
    EVALUATION_REPORT.write(folder, report)
    atomic_write_text(folder / "report.md", markdown_report(report))


def markdown_report(report: dict) -> str:
    classes = report["classes"]
    ev = report["evaluator"]
    lines = ["# fadscale evaluation", ""]
    run = report["samples"].get("run") or {}
    sampler = report["samples"].get("sampler") or {}
    lines.append(f"- samples: `{report['samples']['path']}` ({report['samples']['count']} tiles, "
                 f"{report['samples']['image']['size']} px)")
    if run:
        lines.append(f"- run: `{run.get('path')}` (method {run.get('method')}, step {run.get('step')})")
    if sampler:
        lines.append(f"- sampler: {sampler.get('scheduler')}, {sampler.get('steps')} steps, guidance "
                     f"{sampler.get('guidance')}; weights {(report['samples'].get('weights') or {}).get('used')}")
    lines.append(f"- real tiles scored: `{report['real']['shards']}` {report['real']['split']} split "
                 f"({report['real']['count']} tiles)")
    lines.append(f"- evaluator: {ev['arch']} `{ev['card']}` (sha256 {ev['sha256'][:12]}); "
                 + ("**the alignment expert itself (allowed by evaluator.allow_alignment_expert)**"
                    if ev["is_alignment_expert"] else
                    f"**shares training tiles with the alignment expert (allowed by evaluator.allow_alignment_expert): "
                    f"{ev.get('independence_basis')}**" if ev.get("shares_training_tiles") else
                    f"independent of the alignment expert: {ev.get('independence_basis')}" if ev["alignment_expert_known"]
                    else "alignment expert unknown"))
    if ev.get("selection"):
        lines.append(f"- evaluator weights: {ev['selection']}")
    for warning in report["warnings"]:
        lines.append(f"- warning: {warning}")
    lines += ["", "## Summary", "", "| metric | value |", "| --- | --- |"]
    overall = report["distances"]["overall"]
    div = report["diversity"]["mean"]
    rows = [("generation accuracy (evaluator top-1)", report["generation_accuracy"]["overall"]),
            ("evaluator accuracy on real tiles", report["real_accuracy"]["overall"]),
            ("SSIM diversity, generated (mean over classes)", div["generated"]),
            ("SSIM diversity, real (mean over classes)", div["real"]),
            ("Frechet distance (evaluator features)", overall["frechet"]),
            (f"Frechet distance, real train vs real {report['real']['split']} (reference)", (report["distances"].get("reference") or {}).get("frechet")),
            ("Frechet ratio (generated / reference; 1 = as close as real tiles)", report["distances"].get("frechet_ratio")),
            ("KID (evaluator features)", overall["kid"]),
            ("precision", overall["precision"]), ("recall", overall["recall"])]
    fid = report["inception_fid"]
    rows.append(("Inception FID", fid["fid"] if fid.get("computed") else f"not computed: {fid['reason']}"))
    lines += [f"| {k} | {fmt(v, 4)} |" for k, v in rows]
    generated, real = accuracy_interval(report, "generation_accuracy"), accuracy_interval(report, "real_accuracy")
    if generated and real:
        lines += ["", f"Wilson intervals over the tiles scored: generation accuracy {generated}, evaluator on real "
                  f"tiles {real}: how far another draw of as many tiles could move each."]
    intensity = (report.get("intensity") or {}).get("per_class") or {}
    orientation = (report.get("orientation") or {}).get("per_class") or {}
    lines += ["", "## Per class", "",
              "| class | gen. accuracy | real accuracy | intensity gen. | intensity real | gap | diversity gen. | "
              "diversity real | orientation gen. | orientation real | Frechet | KID | precision | recall |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    per_dist = report["distances"].get("per_class") or {}
    for name in classes:
        d = per_dist.get(name, {})
        level, oriented = intensity.get(name, {}), orientation.get(name, {})
        lines.append("| " + " | ".join([name, fmt(report["generation_accuracy"]["per_class"][name]),
                                         fmt(report["real_accuracy"]["per_class"][name]),
                                         fmt(level.get("generated")), fmt(level.get("real")),
                                         fmt(level.get("gap")),
                                         fmt(report["diversity"]["per_class"][name]["generated"]),
                                         fmt(report["diversity"]["per_class"][name]["real"]),
                                         fmt(oriented.get("generated"), 2), fmt(oriented.get("real"), 2),
                                         fmt(d.get("frechet"), 2), fmt(d.get("kid"), 4),
                                         fmt(d.get("precision"), 2), fmt(d.get("recall"), 2)]) + " |")
    lines += copy_lines(report.get("copies") or {})
    lines += ["", "## Utility (train on X, test on real)", ""]
    utility = report["utility"]
    if utility.get("computed"):
        budget = f"{utility['steps']} steps" if utility.get("steps") else f"{utility['epochs']} epochs"
        lines += [f"{utility['classifier']}, {budget} each, tested on {utility['test']['tiles']} real "
                  f"{utility['test']['split']} tiles.", "",
                  "| trained on | tiles | accuracy |", "| --- | --- | --- |"]
        for name, res in utility["setups"].items():
            lines.append(f"| {name} | {res['train_tiles']} | {fmt(res['overall'])} |")
    else:
        lines.append(f"not computed: {utility.get('reason')}")
    lines += ["", "Confusion matrix: `confusion.png`; real (top row) vs generated (bottom row) tiles per class: "
              "`grids/<CLASS>.png`.", ""]
    return "\n".join(lines)


def copy_lines(copies: dict) -> list[str]:
    """The copy check's section of report.md."""
    lines = ["", "## Copy check (nearest real training tile)", ""]
    if not copies.get("computed"):
        return lines + [f"not computed: {copies.get('reason')}"]
    lines += [f"{copies['what']}. {copies['train_tiles']} training tiles, {copies['held_out_tiles']} held-out.", "",
              "| space | copy share (generated) | held-out share (reference, ~0.05) | threshold | median nearest, "
              "generated | median nearest, held-out |", "| --- | --- | --- | --- | --- | --- |"]
    for space in ("pixels", "features"):
        c = copies[space]
        lines.append(f"| {space} | {fmt(c['share'])} | {fmt(c['held_out_share'])} | {fmt(c['threshold'], 4)} | "
                     f"{fmt(c['generated_median'], 4)} | {fmt(c['held_out_median'], 4)} |")
    if "closest_pairs" in (copies.get("files") or {}):
        lines += ["", f"The closest pairs (generated, then its nearest training tile): `{copies['files']['closest_pairs']}`"]
    return lines


def report_value(report: dict, path: tuple) -> float | None:
    """A number from a report by its key path (e.g. ("distances", "overall", "frechet")); None if absent."""
    value = report
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def accuracy_interval(report: dict, key: str) -> str:
    """"95%: lo-hi" for an accuracy of the report (generation_accuracy or real_accuracy); "" for a report written
    before evaluations kept the interval."""
    interval = (report.get(key) or {}).get("interval95")
    return f"95%: {interval[0]:.3f}-{interval[1]:.3f}" if interval else ""


def save_confusion_png(confusion: torch.Tensor, classes: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = confusion / confusion.sum(1, keepdim=True).clamp(min=1)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * len(classes), 0.8 + 0.6 * len(classes)))
    ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, int(confusion[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
