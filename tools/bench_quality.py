"""The experiment: does the feature-alignment loss make better tiles than plain training, once plain
training makes class-faithful ones?

    python tools/bench_quality.py --threads 2           # preset cpu: the demo's regime, 5 arms x 3 seeds (~1.5 h, 2 cores)
    python tools/bench_quality.py --quick               # smoke test: 1 seed, few steps (minutes)
    python tools/bench_quality.py --preset gpu          # tiny-sd at 64 px, the same table (one GPU)
    python tools/bench_quality.py --preset real         # the 127 real Kather tiles of ../shared/data (sanity check)

Design (fadscale.pipeline.plan): the tiles are sharded once (80/20 train/val, stratified); the alignment
expert is trained on subset A of the train split, the evaluator on the disjoint subset B (as in the
demo); the feature caches come from the alignment expert. Then for each seed, each arm trains with
`run.seed=seed` and the same recipe (configs/tiny/fad.yaml, the demo's: cpu-base UNet, class embedding,
v-prediction, low-noise timestep draw, its 1,200 steps x 16, bf16), scores learning-curve points every
`eval_every` steps, is sampled with the same sampler and per-image seeds, and scored by the split-B evaluator against the real val tiles.

Arms (the FAD ones differ from vanilla only by the alignment settings):
- vanilla: align.enabled false.
- fad-seed: the reference's projector (Linear(expert) -> UNet channels, pooled cosine) on the cached
  expert feature of the clean tile, for the view the UNet sees (fadscale's default).
- fad-reference: the reference's own step (align.target noisy-reference): the expert sees the reference's
  noisy tile (its [0, 1] range) every step, without normalisation, with its BatchNorm in train mode.
- fad-repa: REPA's projector (an MLP per location) against the expert's spatial map. The alignment
  expert sees the tiles at 128 px (`alignment_expert` overrides) so its map is really spatial: resnet10t
  gives 4x4 there (1x1 at 32 px); the aligned layer's 8x8 prediction is averaged onto it. (The real-tile
  study, tools/study_fad.py, uses an inner stage of a 32 px expert instead.)
- fad-seed-centred: the seed projector on centred expert features, without a bias (align.center_target).
All FAD arms use the same 128 px alignment expert.

Measured per run: generation accuracy, Frechet distance (evaluator features) and its ratio to the
real-train vs real-val distance, KID, precision/recall, SSIM diversity, the largest per-class intensity
gap, train-on-synthetic utility; convergence: the training steps and seconds until a learning-curve
point first reaches the accuracy bar (the evaluator's accuracy on real val tiles) and the Frechet bar
(a probe Frechet at most `frechet_bar`; the probe scores `eval.per_class` tiles per class, so its
Frechet runs higher than the final evaluation's); the collapse diagnostic: the share of the alignment
targets' (unit-normalised, uncentred) second moment along their top direction over 256 cached tiles
(1: every tile's target points one way).

The rule, stated before any number (and applied by `verdict`): for each metric, the paired difference
arm - vanilla over seeds gives a mean and a 95% interval (t distribution, n - 1 degrees of freedom).
A metric is "better" (or "worse") only when that interval excludes 0 on that side and most seeds moved
that way; otherwise "no effect shown". An arm "helps" when generation accuracy or Frechet distance is
better and neither is worse, "hurts" in the mirror case, "mixed" when one is better and one worse,
and otherwise "no effect shown".

The last line printed is one JSON object with every number; the table goes to stdout before it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

from fadscale.artifacts import CACHE_MANIFEST, EXPERT_CARD, RUN_CARD  # noqa: E402
from fadscale.core.evaluation.report import report_value  # noqa: E402
from fadscale.runtime.logging import read_metrics  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = REPO.parent / "shared" / "data" / "kather16-sample"

METRICS = [  # (key, label, path in the evaluation report, higher is better; None: no direction)
    ("gen_acc", "gen. accuracy", ("generation_accuracy", "overall"), True),
    ("frechet", "Frechet", ("distances", "overall", "frechet"), False),
    ("frechet_ratio", "Frechet ratio", ("distances", "frechet_ratio"), False),
    ("kid", "KID", ("distances", "overall", "kid"), False),
    ("precision", "precision", ("distances", "overall", "precision"), True),
    ("recall", "recall", ("distances", "overall", "recall"), True),
    ("diversity", "SSIM div.", ("diversity", "mean", "generated"), None),
    ("intensity_gap", "intensity gap", ("intensity", "max_abs_gap"), False),
    ("util_syn", "util. syn.", ("utility", "setups", "synthetic", "overall"), True),
    ("util_mix", "util. real+syn.", ("utility", "setups", "real+synthetic", "overall"), True),
]
# Read from the training run rather than the evaluation report (lower is better for all three).
RUN_METRICS = [("steps_to_acc", "steps to acc."), ("seconds_to_acc", "train s to acc."),
               ("steps_to_frechet", "steps to FD bar")]
PRIMARY = ("gen_acc", "frechet")

ARMS = {
    "vanilla": ["align.enabled=false"],
    "fad-seed": ["align.enabled=true", "align.projector=seed", "align.target=cached"],
    "fad-reference": ["align.enabled=true", "align.projector=seed", "align.target=noisy-reference"],
    "fad-repa": ["align.enabled=true", "align.projector=repa", "align.target=cached"],
    "fad-seed-centred": ["align.enabled=true", "align.projector=seed", "align.target=cached",
                         "align.center_target=true"],
}

PRESETS = {
    # The demo's regime (fadscale demo): 512 procedural 32 px tiles (408 train / 104 val), the recipe of
    # configs/tiny/fad.yaml as it is (steps None: its train.max_steps). The alignment expert at 128 px for
    # a 4x4 map (repa); the evaluator is the demo's (32 px).
    "cpu": dict(source="procedural:per_class=64,size=32,seed=0", image_size=32, seeds=[0, 1, 2], steps=None,
                batch=16, per_class=32, eval_every=100, frechet_bar=40.0,
                alignment_expert=["data.image_size=128", "model.input_size=128", "data.batch_size=32"],
                expert=[], fad=[], sampler=("dpm++", 25), sampler_row_per_class=8, ddpm_steps=1000,
                eval_batch=128, sample_batch=128),
    # tiny-sd (323M) at 64 px on 4x the tiles, bf16, batch 64: one GPU. Not yet run (no device lent).
    "gpu": dict(source="procedural:per_class=256,size=64,seed=0", image_size=64, seeds=[0, 1, 2], steps=3000,
                batch=64, per_class=64, eval_every=250, frechet_bar=40.0,
                alignment_expert=["data.image_size=128", "model.input_size=128", "data.batch_size=64"],
                expert=["train.epochs=8", "data.batch_size=64"],
                fad=["model.preset=tiny-sd", "train.mixed_precision=auto", "optim.lr=2e-4", "optim.warmup_steps=200",
                     "train.ema_decay=0.999", "train.log_every=50", "checkpoint.every=1000", "eval.per_class=16"],
                sampler=("dpm++", 25), sampler_row_per_class=16, ddpm_steps=1000, eval_batch=256, sample_batch=256),
    # The 127 real tiles (centre-cropped square, 32 px), one seed: does every arm run on real files; far
    # too few tiles to judge anything.
    "real": dict(source=str(REAL_DATA), image_size=32, seeds=[0], steps=None, batch=16, per_class=8, eval_every=200,
                 frechet_bar=40.0, alignment_expert=["data.image_size=128", "model.input_size=128", "data.batch_size=16"],
                 expert=["train.epochs=20", "data.batch_size=16"], fad=[], sampler=("dpm++", 25),
                 sampler_row_per_class=4, ddpm_steps=1000, eval_batch=64, sample_batch=64),
}
# --quick: a smoke test of every code path, not a measurement.
QUICK = dict(seeds=[0], steps=30, per_class=4, eval_every=15, sampler_row_per_class=2, ddpm_steps=50)
QUICK_EXPERT = ["train.epochs=2"]
QUICK_PROCEDURAL_PER_CLASS = 16

# Two-sided 95% quantiles of Student's t by degrees of freedom (1.96 beyond the table).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def t95(df: int) -> float:
    if df in T95:
        return T95[df]
    smaller = [k for k in T95 if k < df]
    return T95[max(smaller)] if df <= 30 else 1.96


# ------------------------------------------------------------------------------------------ numbers


def metrics_of(report: dict) -> dict:
    return {key: report_value(report, path) for key, _, path, _ in METRICS}


def convergence(run_dir: Path, accuracy_bar: float | None, frechet_bar: float) -> dict:
    """The first learning-curve point at or past each bar: its step and training seconds (None: not reached)."""
    points = [r for r in read_metrics(run_dir) if "eval/generation_accuracy" in r]
    out = {"steps_to_acc": None, "seconds_to_acc": None, "steps_to_frechet": None,
           "curve": [{"step": r["step"], "accuracy": r["eval/generation_accuracy"], "frechet": r["eval/frechet"],
                      "train_s": r.get("eval/train_seconds")} for r in points]}
    for r in points:
        if out["steps_to_acc"] is None and accuracy_bar is not None and r["eval/generation_accuracy"] >= accuracy_bar:
            out["steps_to_acc"], out["seconds_to_acc"] = r["step"], r.get("eval/train_seconds")
        if out["steps_to_frechet"] is None and r["eval/frechet"] <= frechet_bar:
            out["steps_to_frechet"] = r["step"]
    return out


def summary(values: list) -> dict:
    kept = [v for v in values if v is not None and math.isfinite(v)]
    return {"mean": statistics.fmean(kept) if kept else None,
            "std": statistics.stdev(kept) if len(kept) > 1 else None, "n": len(kept)}


def paired(arm: list[dict], vanilla: list[dict], keys: list[tuple[str, bool | None]]) -> dict:
    """Per metric: arm - vanilla per seed, mean, std, 95% interval, seeds better, and the rule's verdict."""
    out = {}
    for key, higher in keys:
        diffs = [a[key] - v[key] for a, v in zip(arm, vanilla) if a.get(key) is not None and v.get(key) is not None]
        entry = {**summary(diffs), "per_seed": diffs}
        n, mean, std = entry["n"], entry["mean"], entry["std"]
        if n > 1 and std is not None:
            half = t95(n - 1) * std / math.sqrt(n)
            entry["ci95"] = [mean - half, mean + half]
        if higher is not None and diffs:
            entry["better"] = sum(1 for d in diffs if d != 0 and (d > 0) == higher)
            entry["worse"] = sum(1 for d in diffs if d != 0 and (d > 0) != higher)
            entry["verdict"] = verdict(entry, higher)
        out[key] = entry
    return out


def verdict(entry: dict, higher: bool) -> str:
    """The module docstring's rule: the 95% interval excludes 0 on one side and most seeds agree."""
    interval, n = entry.get("ci95"), entry.get("n", 0)
    if interval is None:
        return "no effect shown"
    low, high = interval
    up = low > 0
    down = high < 0
    if (up and higher) or (down and not higher):
        return "better" if entry["better"] > n / 2 else "no effect shown"
    if (up and not higher) or (down and higher):
        return "worse" if entry["worse"] > n / 2 else "no effect shown"
    return "no effect shown"


def arm_verdict(diff: dict) -> str:
    words = [diff[k].get("verdict", "no effect shown") for k in PRIMARY]
    if "better" in words and "worse" not in words:
        return "helps"
    if "worse" in words and "better" not in words:
        return "hurts"
    if "better" in words and "worse" in words:
        return "mixed"
    return "no effect shown"


def _num(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _pm(entry: dict, digits: int = 3, signed: bool = False) -> str:
    if entry.get("mean") is None:
        return "-"
    fmt = f"{{:+.{digits}f}}" if signed else f"{{:.{digits}f}}"
    text = fmt.format(entry["mean"])
    return text + (f" +/- {entry['std']:.{digits}f}" if entry.get("std") is not None else "")


def _ci(entry: dict, digits: int) -> str:
    if entry.get("mean") is None:
        return "-"
    text = f"{entry['mean']:+.{digits}f}"
    if entry.get("ci95"):
        text += f" [{entry['ci95'][0]:+.{digits}f}, {entry['ci95'][1]:+.{digits}f}]"
    if "better" in entry:
        text += f" {entry['better']}/{entry['n']}"
    return text


def _digits(key: str) -> int:
    return {"frechet": 2, "kid": 4, "steps_to_acc": 0, "steps_to_frechet": 0, "seconds_to_acc": 1}.get(key, 3)


# ------------------------------------------------------------------------------------------ the run


def build_plan(args, preset: dict, out: Path):
    from fadscale.pipeline.plan import Plan

    fad = [f"train.max_steps={preset['steps']}", f"data.batch_size={preset['batch']}",
           f"checkpoint.every={max(preset['steps'], 1)}", "checkpoint.keep_last=1", *preset["fad"], *args.set]
    scheduler, steps = preset["sampler"]
    sample = [f"sample.scheduler={scheduler}", f"sample.steps={steps}", f"sample.batch_size={preset['sample_batch']}"]
    evaluate = [f"utility.enabled={str(not args.no_utility).lower()}", f"evaluator.batch_size={preset['eval_batch']}"]
    return Plan(out=out, source=preset["source"], image_size=preset["image_size"], seed=0, arms=dict(ARMS),
                expert_overrides=list(preset["expert"]), alignment_expert_overrides=list(preset["alignment_expert"]),
                fad_overrides=fad, per_class=preset["per_class"], eval_every=preset["eval_every"],
                sample_overrides=sample, eval_overrides=evaluate)


def expected_costs(plan, preset: dict, seeds: list[int], arms: dict, sampler_row: bool) -> dict[str, float]:
    """Rough stage costs (seconds on 2 idle CPU cores; a guess on a GPU), for the progress ETA only."""
    from fadscale.pipeline.plan import arm_stage_names, prepare_stage_names

    step = 0.16 * (preset["image_size"] / 32) ** 2 * preset["batch"] / 16
    costs = {name: 5.0 for name in prepare_stage_names(plan, arms)}
    costs.update({"expert A (alignment)": 60.0, "expert B (evaluator)": 10.0})
    for seed in seeds:
        for arm in arms:
            train, sample, evaluate = arm_stage_names(f"{arm}-s{seed}")
            costs[train] = preset["steps"] * step * (1.3 if arm == "fad-reference" else 1.0) + 25
            costs[sample] = preset["per_class"] * 8 * 0.11
            costs[evaluate] = 25.0
    if sampler_row:
        for label, _, steps in row_samplers(preset):
            costs[f"sampler {label}"] = preset["sampler_row_per_class"] * 8 * 0.004 * steps
            costs[f"evaluate sampler {label}"] = 10.0
    if torch.cuda.is_available():
        costs = {name: max(2.0, cost * 0.05) for name, cost in costs.items()}
    return costs


def row_samplers(preset: dict) -> list[tuple[str, str, int]]:
    """(label, scheduler, steps): DDPM with all training steps (the reference), DDIM-25 and the arms' sampler."""
    scheduler, steps = preset["sampler"]
    rows = [(f"ddpm-{preset['ddpm_steps']}", "ddpm", preset["ddpm_steps"]), ("ddim-25", "ddim", 25)]
    if (scheduler, steps) not in [(s, n) for _, s, n in rows]:
        rows.append((f"{scheduler}-{steps}", scheduler, steps))
    return rows


def run_bench(args) -> dict:
    from fadscale.pipeline.plan import StageClock, evaluate_run, prepare, recipe_steps, run_arm, sample_run

    preset = dict(PRESETS[args.preset])
    if args.quick:
        preset.update(QUICK)
        preset["expert"] = [*preset["expert"], *QUICK_EXPERT]
        if preset["source"].startswith("procedural:"):
            preset["source"] = re.sub(r"per_class=\d+", f"per_class={QUICK_PROCEDURAL_PER_CLASS}", preset["source"])
    for key in ("steps", "per_class", "eval_every"):
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
    if args.seeds is not None:
        preset["seeds"] = list(range(args.seeds))
    if preset["steps"] is None:  # the recipe's own length, so the bench and the demo cannot drift apart
        preset["steps"] = recipe_steps()
    if args.preset == "real" and not REAL_DATA.is_dir():
        raise SystemExit(f"preset real: {REAL_DATA} not found (the real tiles live in ../shared/data)")
    out = Path(args.out or REPO / "runs" / f"bench-quality-{args.preset}{'-quick' if args.quick else ''}")
    if out.exists() and any(out.iterdir()):
        if not args.overwrite:
            raise SystemExit(f"{out}: already exists (pass --overwrite to replace it)")
        shutil.rmtree(out)
    seeds = preset["seeds"]
    plan = build_plan(args, preset, out)
    arms = {name: ARMS[name] for name in args.arms}
    if "vanilla" not in arms:
        raise SystemExit("--arms must include vanilla (the differences are against it)")
    plan.arms = dict(arms)
    sampler_row = not args.no_sampler_row
    clock = StageClock(expected_costs(plan, preset, seeds, arms, sampler_row))
    started = time.perf_counter()
    prepared = prepare(plan, clock, arms)
    evaluator_card = EXPERT_CARD.read(prepared.evaluator)

    runs = []
    for seed in seeds:
        for arm, extra in arms.items():
            result = run_arm(plan, prepared, arm, extra, seed=seed, tag=f"{arm}-s{seed}", clock=clock)
            runs.append(_record(result, arm, seed, preset))

    sampler = None
    if sampler_row:
        run_dir = out / f"vanilla-s{seeds[0]}"
        rows = {}
        for label, scheduler, steps in row_samplers(preset):
            samples = out / f"samplerrow-{label}"
            manifest = clock.run(f"sampler {label}", lambda: sample_run(
                plan, run_dir, samples, seed=seeds[0], overrides=[f"sample.scheduler={scheduler}", f"sample.steps={steps}",
                                                                  f"sample.per_class={preset['sampler_row_per_class']}"]))
            rows[label] = {"scheduler": scheduler, "steps": steps, "images": manifest["count"],
                           "s_per_image": manifest["timing"]["s_per_image"], "wall_s": manifest["timing"]["wall_s"]}
            report = clock.run(f"evaluate sampler {label}", lambda: evaluate_run(
                plan, prepared, samples, out / f"eval-samplerrow-{label}", seed=seeds[0], overrides=["utility.enabled=false"]))
            rows[label]["metrics"] = metrics_of(report)
        sampler = {"run": str(run_dir), "per_class": preset["sampler_row_per_class"], "rows": rows}

    total = time.perf_counter() - started
    return assemble(args, preset, plan, prepared, evaluator_card, runs, arms, sampler, clock.timings, total)


def _record(result: dict, arm: str, seed: int, preset: dict) -> dict:
    report, manifest = result["report"], result["manifest"]
    card = RUN_CARD.read(Path(result["run"]) / "final")
    final = card.get("final_metrics", {})
    accuracy_bar = report_value(report, ("real_accuracy", "overall"))
    curve = convergence(Path(result["run"]), accuracy_bar, preset["frechet_bar"])
    diagnostic = card.get("alignment_diagnostic") or {}
    return {"arm": arm, "seed": seed,
            "metrics": {**metrics_of(report), **{k: curve[k] for k, _ in RUN_METRICS}},
            "curve": curve["curve"],
            "real": {"diversity": report_value(report, ("diversity", "mean", "real")),
                     "evaluator_accuracy": accuracy_bar,
                     "frechet_reference": report_value(report, ("distances", "reference", "frechet")),
                     "utility_real_only": report_value(report, ("utility", "setups", "real", "overall"))},
            "train_s": result["timings"].get(f"train {arm}-s{seed}"),
            "train_seconds_clock": final.get("eval/train_seconds"),
            "final_noise_loss": final.get("loss/noise"),
            "final_align_cosine": final.get("align/cosine"),
            "target_top_direction_share": diagnostic.get("target_top_direction_share"),
            "expert_top_direction_share": diagnostic.get("expert_top_direction_share"),
            "unet": card.get("config", {}).get("model", {}).get("preset"),
            "sample_s_per_image": manifest["timing"]["s_per_image"], "generated": manifest["count"],
            "run": str(result["run"])}


def assemble(args, preset, plan, prepared, evaluator_card, runs, arms, sampler, timings, total) -> dict:
    def of(arm):
        return sorted((r for r in runs if r["arm"] == arm), key=lambda r: r["seed"])

    keys = [(k, h) for k, _, _, h in METRICS] + [(k, False) for k, _ in RUN_METRICS]
    per_arm = {}
    for arm in arms:
        rows = of(arm)
        per_arm[arm] = {key: {**summary([r["metrics"][key] for r in rows]), "per_seed": [r["metrics"][key] for r in rows]}
                        for key, _ in keys}
        for extra in ("train_s", "final_noise_loss", "final_align_cosine", "target_top_direction_share",
                      "expert_top_direction_share"):
            per_arm[arm][extra] = summary([r.get(extra) for r in rows])
        per_arm[arm]["seeds"] = [r["seed"] for r in rows]
    vanilla_by_seed = {r["seed"]: r["metrics"] for r in of("vanilla")}
    differences, verdicts = {}, {}
    for arm in [a for a in arms if a != "vanilla"]:
        rows = [r for r in of(arm) if r["seed"] in vanilla_by_seed]
        differences[arm] = paired([r["metrics"] for r in rows], [vanilla_by_seed[r["seed"]] for r in rows], keys)
        differences[arm]["seeds"] = [r["seed"] for r in rows]
        verdicts[arm] = arm_verdict(differences[arm])
    arrays = {}
    for folder in prepared.caches.values():
        shapes = CACHE_MANIFEST.read(folder)["cache"]["arrays"]
        arrays.update({key.removesuffix(".npy"): value["shape"] for key, value in shapes.items()})
    alignment_card = EXPERT_CARD.read(prepared.alignment_expert)
    first = runs[0]["real"] if runs else {}
    scheduler, sampler_steps = preset["sampler"]
    return {
        "bench": "quality",
        "preset": args.preset, "quick": bool(args.quick),
        "setup": {"source": plan.source, "image_size": plan.image_size, "seeds": preset["seeds"],
                  "steps": preset["steps"], "batch": preset["batch"], "per_class_generated": preset["per_class"],
                  "eval_every": preset["eval_every"], "frechet_bar": preset["frechet_bar"],
                  "sampler": {"scheduler": scheduler, "steps": sampler_steps}, "utility": not args.no_utility,
                  "fad_overrides": plan.fad_overrides, "expert_overrides": plan.expert_overrides,
                  "alignment_expert_overrides": plan.alignment_expert_overrides, "arms": arms,
                  "unet": runs[0]["unet"] if runs else None,
                  "cached_expert_arrays": arrays,  # per tile: [8 views, D] pooled, [8, D, h, w] spatial
                  "device": "cuda" if torch.cuda.is_available() else "cpu", "threads": torch.get_num_threads(),
                  "out": str(plan.out)},
        "experts": {"alignment_expert": {"arch": alignment_card.get("arch"), "input_size": alignment_card.get("input_size"),
                                         "val_accuracy": alignment_card.get("val_accuracy"), "subset": "A"},
                    "evaluator": {"arch": evaluator_card.get("arch"), "input_size": evaluator_card.get("input_size"),
                                  "val_accuracy": evaluator_card.get("val_accuracy"), "subset": "B",
                                  "best_epoch": evaluator_card.get("best_epoch")}},
        "reference": {"real_val_diversity": first.get("diversity"),
                      "evaluator_accuracy_on_real_val": first.get("evaluator_accuracy"),
                      "frechet_real_train_vs_val": first.get("frechet_reference"),
                      "utility_real_only": first.get("utility_real_only")},
        "rule": "per metric: 'better'/'worse' only when the paired 95% t-interval of arm - vanilla excludes 0 on "
                "that side and most seeds agree, else 'no effect shown'; arm: helps / hurts / mixed / no effect "
                "shown from generation accuracy and Frechet distance",
        "runs": runs, "arms": per_arm, "differences": differences, "verdict": verdicts, "sampler": sampler,
        "timings_s": {k: round(v, 2) for k, v in timings.items()}, "total_s": round(total, 1),
    }


# ------------------------------------------------------------------------------------------ printing


def print_table(result: dict) -> None:
    setup = result["setup"]
    labels = {k: label for k, label, _, _ in METRICS} | dict(RUN_METRICS)
    keys = [k for k in labels if any(a[k]["mean"] is not None for a in result["arms"].values())]
    print(f"bench_quality preset {result['preset']}{' (quick)' if result['quick'] else ''}: {setup['source']}, "
          f"{setup['image_size']} px, {setup['unet']} UNet, seeds {setup['seeds']}, {setup['steps']} steps x batch "
          f"{setup['batch']}, {setup['per_class_generated']}/class sampled with {setup['sampler']['scheduler']}-"
          f"{setup['sampler']['steps']}; {setup['device']}, {setup['threads']} threads; total {result['total_s']:.0f} s")
    ex, ref = result["experts"], result["reference"]
    print(f"alignment expert A: {ex['alignment_expert']['arch']} @{ex['alignment_expert']['input_size']} px, val acc "
          f"{_num(ex['alignment_expert']['val_accuracy'])}; evaluator B: {ex['evaluator']['arch']} "
          f"@{ex['evaluator']['input_size']} px, on real val tiles {_num(ref['evaluator_accuracy_on_real_val'])} "
          f"(the accuracy bar); real train vs val Frechet {_num(ref['frechet_real_train_vs_val'], 2)}; real SSIM "
          f"diversity {_num(ref['real_val_diversity'])}; real-only utility {_num(ref['utility_real_only'])}; "
          f"Frechet bar (probe) {setup['frechet_bar']}")
    print()
    print("per arm: mean +/- std over seeds; target top-dir.: the collapse diagnostic (1: one direction)")
    columns = [(labels[k], {arm: _pm(e[k], _digits(k)) for arm, e in result["arms"].items()}) for k in keys]
    columns += [(label, {arm: _pm(e[key], 3) for arm, e in result["arms"].items()})
                for label, key in (("target top-dir.", "target_top_direction_share"),
                                   ("expert top-dir.", "expert_top_direction_share"))]
    widths = [max(len(label), *(len(cell) for cell in cells.values())) + 2 for label, cells in columns]
    print(f"{'arm':<18}" + "".join(f"{label:>{w}}" for (label, _), w in zip(columns, widths)))
    for arm in result["arms"]:
        print(f"{arm:<18}" + "".join(f"{cells[arm]:>{w}}" for (_, cells), w in zip(columns, widths)))
    print()
    print("paired arm - vanilla (same seed): mean [95% interval] seeds better/n, and the rule's verdict")
    for arm, diff in result["differences"].items():
        print(f"{arm}: {result['verdict'][arm]}")
        for k in keys:
            if diff[k].get("mean") is not None:
                print(f"    {labels[k]:<18}{_ci(diff[k], _digits(k)):<44}{diff[k].get('verdict', '')}")
    if result["sampler"]:
        s = result["sampler"]
        print()
        print(f"sampler row: {s['run']}, {s['per_class']}/class")
        for label, row in s["rows"].items():
            m = row["metrics"]
            print(f"    {label:<14} {row['s_per_image']:.4f} s/image   generation accuracy {_num(m['gen_acc'])}   "
                  f"Frechet {_num(m['frechet'], 2)}")
    print()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--quick", action="store_true", help="1 seed, few steps, few tiles: a smoke test")
    parser.add_argument("--out", help="output folder (default runs/bench-quality-<preset>)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--seeds", type=int, help="number of seeds (0..N-1); default: the preset's")
    parser.add_argument("--steps", type=int, help="training steps per run; default: the preset's")
    parser.add_argument("--per-class", dest="per_class", type=int, help="generated tiles per class")
    parser.add_argument("--eval-every", dest="eval_every", type=int, help="steps between learning-curve points")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--no-sampler-row", action="store_true", help="skip the DDPM-1000 / DDIM / arms' sampler row")
    parser.add_argument("--no-utility", action="store_true", help="skip the train-on-synthetic classifiers")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: the CPUs available); set it on a shared machine")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra FadConfig override for every arm, e.g. --set optim.lr=1e-3")
    args = parser.parse_args(argv)
    from fadscale.runtime.distributed import set_cpu_threads

    set_cpu_threads(args.threads)
    # Library output (stage lines, per-stage logs) goes to stderr; stdout holds the table and the JSON.
    with contextlib.redirect_stdout(sys.stderr):
        result = run_bench(args)
    print_table(result)
    print(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
