"""The experiment: does the feature-alignment loss make better tiles than plain fine-tuning?

    python tools/bench_quality.py --quick             # smoke test: 1 seed, few steps (a few minutes, 2 CPU cores)
    python tools/bench_quality.py                     # preset cpu: procedural 32x32 tiles, 3 seeds (~30 min, 2 cores)
    python tools/bench_quality.py --preset gpu        # procedural 64x64, more data and steps (~10 min, one H100)
    python tools/bench_quality.py --preset real       # the 127 real Kather tiles of ../shared/data (sanity check)
    python tools/bench_quality.py --ablate            # also FAD variants: align weight, layer, target (more runs)
    python tools/bench_quality.py --utility           # also train-on-synthetic classifiers (slower evaluation)

Design (fadscale.pipeline): the tiles are sharded once (80/20 train/val, stratified); the alignment
expert is trained on subset A of the train split and the evaluator on the disjoint subset B; the
feature caches (pooled-only for the seed projector, with spatial maps for repa) are built once from the
alignment expert. Then for each seed and each arm (vanilla, fad-seed, fad-repa) one training run with
`run.seed=seed`, the same steps, batch, learning rate and schedule (configs/tiny/fad.yaml plus the
preset's overrides), sampled with the same sampler and the same per-image seeds, scored by the split-B
evaluator against the real val tiles (never seen by either expert's training or the UNet's).

Printed: per arm the mean +/- std over seeds of every metric; per FAD arm the paired difference
FAD - vanilla (same seed), its mean +/- std and in how many seeds it went the better way; a sampler
row (the first FAD run, seed 0, sampled with DDPM-1000, DPM-Solver++-25 and the arms' sampler: s/image
and the same metrics); with --ablate, the FAD variants tried (align weight 0.1 and 4, an earlier layer,
the reference's noisy-online target, repa at weight 0.1, the seed projector with a centred target).
The per-arm table also shows each arm's final `align/target_similarity`: the mean cosine between the
alignment targets of different tiles; near 1 the seed projector has collapsed and the alignment loss
asks nothing of the UNet. The last line is one JSON object with every number. "consistent" means: the
same direction in every seed and |mean| > std of the differences.

The arms' sampler is DDIM-25 by default, not DPM-Solver++: DPM-Solver++ works on the x0 prediction,
which at the first step (t=999 of squaredcos_cap_v2, sqrt(alpha_bar) ~ 5e-5) multiplies any error of
the noise prediction by ~2e4. Thresholding x0 to [-1, 1] (fadscale's dpm++ does) bounds it but the
multistep update carries the saturated x0 along, where DDIM keeps the model's noise estimate: with a
briefly trained UNet (quick run, 30 steps) dpm++-25 gave 12% saturated pixels and Frechet ~5,400 vs
~670 for DDIM-25 and ~290 for DDPM-100. The sampler row measures it on the trained arms.

Caveats of the small presets: at 32 px the resnet10t expert's spatial map is 1x1, so `repa` there aligns
every UNet location to the pooled feature (the gpu preset feeds the experts 128 px: a 4x4 map). On a
busy machine pass `--threads 1` (measured: a cpu-small step 3 s with 1 thread vs 9 s with 2 while other
jobs ran); the threads used are in the JSON.

Metrics (fadscale.evaluate): generation accuracy (split-B evaluator top-1 on generated tiles), SSIM
diversity (1 - mean SSIM of random same-class pairs; the real tiles' value is the reference, not
"higher is better" without limit), Frechet distance and KID in the evaluator's pooled feature space
(lower is better), k-NN precision and recall, and with --utility the real-val accuracy of a small CNN
trained on synthetic tiles only / on real + synthetic.
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

from fadscale.evaluate import report_value  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = REPO.parent / "shared" / "data" / "kather16-sample"
LAYER = "down_blocks.2.resnets.0.conv_shortcut"  # the reference's aligned layer (every preset has it)

METRICS = [  # (key, label, path in the evaluation report, higher is better; None: no direction)
    ("gen_acc", "generation accuracy", ("generation_accuracy", "overall"), True),
    ("diversity", "SSIM diversity", ("diversity", "mean", "generated"), None),
    ("frechet", "Frechet (evaluator)", ("distances", "overall", "frechet"), False),
    ("kid", "KID (evaluator)", ("distances", "overall", "kid"), False),
    ("precision", "precision", ("distances", "overall", "precision"), True),
    ("recall", "recall", ("distances", "overall", "recall"), True),
    ("util_syn", "utility: synthetic only", ("utility", "setups", "synthetic", "overall"), True),
    ("util_mix", "utility: real + synthetic", ("utility", "setups", "real+synthetic", "overall"), True),
]

ARMS = {  # the arms every seed trains (the same config but for these keys)
    "vanilla": ["align.enabled=false"],
    "fad-seed": ["align.enabled=true", "align.projector=seed"],
    "fad-repa": ["align.enabled=true", "align.projector=repa"],
}

# FAD variants of --ablate (all against the vanilla run of the same seed).
ABLATIONS = {
    "fad-seed-w0.1": ["align.enabled=true", "align.projector=seed", "align.weight=0.1"],
    "fad-seed-w4": ["align.enabled=true", "align.projector=seed", "align.weight=4.0"],
    "fad-seed-layer1": ["align.enabled=true", "align.projector=seed",
                        "align.layer=down_blocks.1.resnets.0.conv_shortcut"],
    "fad-seed-online": ["align.enabled=true", "align.projector=seed", "align.target=noisy-online"],
    "fad-repa-w0.1": ["align.enabled=true", "align.projector=repa", "align.weight=0.1"],
    # The seed projector's learned target collapses to one direction (align/target_similarity ~1);
    # centred expert features and no bias leave it no constant to collapse onto.
    "fad-seed-centred": ["align.enabled=true", "align.projector=seed", "align.center_target=true"],
}

PRESETS = {
    # Procedural grayscale tiles at 32x32, the cpu-tiny UNet of configs/tiny/fad.yaml: 3 seeds x 3 arms
    # (measured with --utility: 59 min on 2 cores with --ablate --ablate-seeds 2 and the five variants
    # before fad-seed-centred; the arms alone about half of that).
    "cpu": dict(
        source="procedural:per_class=96,size=32,seed=0", image_size=32, seeds=[0, 1, 2], steps=300, batch=16,
        per_class=24, expert=[], fad=["optim.lr=1e-3", "optim.warmup_steps=20", "train.ema_decay=0.99"],
        sampler_row_per_class=8, ddpm_steps=1000, eval_batch=64, sample_batch=64),
    # Procedural 64x64, 4x the tiles, the cpu-small UNet at batch 128 for 1000 steps, bf16 (a step of this
    # small UNet is kernel-launch bound on an H100, so the larger batch costs little). Not yet run: no
    # GPU time was left to the session that wrote it.
    "gpu": dict(
        source="procedural:per_class=256,size=64,seed=0", image_size=64, seeds=[0, 1, 2], steps=1000, batch=128,
        per_class=64,
        # The experts see the tiles at 128 px (resnet10t: a 4x4 spatial map for repa; at 64 px it is 2x2).
        expert=["train.epochs=8", "data.batch_size=64", "data.image_size=128", "model.input_size=128"],
        fad=["model.preset=cpu-small", "optim.lr=1e-3", "optim.warmup_steps=50", "train.ema_decay=0.995",
             "train.mixed_precision=auto", "train.log_every=50"],
        sampler_row_per_class=16, ddpm_steps=1000, eval_batch=256, sample_batch=256),
    # The 127 real tiles (centre-cropped square and resized to 32 px by the loader), one seed: a sanity
    # check that the pipeline runs on real files; far too few tiles to judge FAD.
    "real": dict(
        source=str(REAL_DATA), image_size=32, seeds=[0], steps=300, batch=16, per_class=8,
        expert=["train.epochs=20", "data.batch_size=16"],
        fad=["optim.lr=1e-3", "optim.warmup_steps=20", "train.ema_decay=0.99"],
        sampler_row_per_class=4, ddpm_steps=1000, eval_batch=64, sample_batch=64),
}
# --quick: a smoke test of every code path, not a measurement: 32 procedural tiles per class (real: all
# 127), 1 seed, 30 steps, 2 expert epochs; the sampler row's DDPM runs 100 steps, not 1000 (labelled so).
QUICK = dict(seeds=[0], steps=30, per_class=4, sampler_row_per_class=2, ddpm_steps=100)
QUICK_EXPERT = ["train.epochs=2"]
QUICK_PROCEDURAL_PER_CLASS = 32


# ------------------------------------------------------------------------------------------ numbers


def metrics_of(report: dict) -> dict:
    return {key: report_value(report, path) for key, _, path, _ in METRICS}


def summary(values: list) -> dict:
    kept = [v for v in values if v is not None and math.isfinite(v)]
    return {"mean": statistics.fmean(kept) if kept else None,
            "std": statistics.stdev(kept) if len(kept) > 1 else None, "n": len(kept)}


def paired(fad: list[dict], vanilla: list[dict]) -> dict:
    """Per metric: FAD - vanilla per seed, its mean/std, and how many seeds moved the better way."""
    out = {}
    for key, _, _, higher in METRICS:
        diffs = [f[key] - v[key] for f, v in zip(fad, vanilla) if f[key] is not None and v[key] is not None]
        entry = {**summary(diffs), "per_seed": diffs}
        if higher is not None and diffs:
            entry["better"] = sum(1 for d in diffs if (d > 0) == higher and d != 0)
            mean, std = entry["mean"], entry["std"]
            entry["consistent"] = entry["better"] in (0, len(diffs)) and len(diffs) > 1 and std is not None \
                and abs(mean) > std
        out[key] = entry
    return out


def _num(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _pm(entry: dict, digits: int = 3, signed: bool = False) -> str:
    if entry.get("mean") is None:
        return "-"
    fmt = f"{{:+.{digits}f}}" if signed else f"{{:.{digits}f}}"
    text = fmt.format(entry["mean"])
    return text + (f" +/- {entry['std']:.{digits}f}" if entry.get("std") is not None else "")


def _digits(key: str) -> int:
    return 2 if key == "frechet" else 4 if key == "kid" else 3


# ------------------------------------------------------------------------------------------ the run


def build_plan(args, preset: dict, out: Path):
    from fadscale.pipeline import Plan

    fad = [f"train.max_steps={preset['steps']}", f"data.batch_size={preset['batch']}",
           f"checkpoint.every={max(preset['steps'], 1)}", "checkpoint.keep_last=1", *preset["fad"], *args.set]
    sample = {"sample__scheduler": args.scheduler, "sample__steps": args.sampler_steps,
              "sample__batch_size": preset["sample_batch"]}
    evaluate = {"utility__enabled": bool(args.utility), "evaluator__batch_size": preset["eval_batch"],
                "metrics__ssim_pairs": 100, "metrics__kid_subsets": 50}
    return Plan(out=out, source=preset["source"], image_size=preset["image_size"], seed=0, arms=dict(ARMS),
                expert_overrides=list(preset["expert"]), fad_overrides=fad, per_class=preset["per_class"],
                sample_overrides=sample, eval_overrides=evaluate)


def row_samplers(args, preset: dict) -> list[tuple[str, str, int]]:
    """(label, scheduler, steps) of the sampler row: DDPM-1000 (the reference), DPM-Solver++-25, and the
    arms' own sampler when it is neither."""
    rows = [(f"ddpm-{preset['ddpm_steps']}", "ddpm", preset["ddpm_steps"]), ("dpm++-25", "dpm++", 25)]
    if (args.scheduler, args.sampler_steps) not in [(s, n) for _, s, n in rows]:
        rows.append((f"{args.scheduler}-{args.sampler_steps}", args.scheduler, args.sampler_steps))
    return rows


def expected_costs(args, plan, preset: dict, seeds: list[int], arms: dict, sampler_row: bool,
                   cache_arms: dict) -> dict[str, float]:
    """Rough stage costs (seconds on 2 idle CPU cores; a guess for a GPU) for the progress ETA only."""
    from fadscale.pipeline import arm_stage_names, prepare_stage_names

    step = 0.25 * (preset["image_size"] / 32) ** 2 * preset["batch"] / 16
    costs = {name: 5.0 for name in prepare_stage_names(plan, cache_arms)}
    costs.update({"expert A (alignment)": 30.0, "expert B (evaluator)": 30.0})
    for seed in seeds:
        for arm in arms:
            train, sample, evaluate = arm_stage_names(f"{arm}-s{seed}")
            costs[train] = preset["steps"] * step * (1.3 if arm != "vanilla" else 1.0)
            costs[sample] = preset["per_class"] * 8 * 0.1
            costs[evaluate] = 10.0 if not plan.eval_overrides.get("utility__enabled") else 40.0
    if sampler_row:
        for label, _, steps in row_samplers(args, preset):
            costs[f"sampler {label}"] = preset["sampler_row_per_class"] * 8 * 0.004 * steps
            costs[f"evaluate sampler {label}"] = 5.0
    if torch.cuda.is_available():  # the per-step and per-image costs above are CPU ones
        costs = {name: max(2.0, cost * 0.05) for name, cost in costs.items()}
    return costs


def run_bench(args) -> dict:
    from fadscale.pipeline import StageClock, evaluate_run, prepare, run_arm, sample_run

    preset = dict(PRESETS[args.preset])
    if args.quick:
        preset.update(QUICK)
        preset["expert"] = [*preset["expert"], *QUICK_EXPERT]
        if preset["source"].startswith("procedural:"):
            preset["source"] = re.sub(r"per_class=\d+", f"per_class={QUICK_PROCEDURAL_PER_CLASS}", preset["source"])
    if args.seeds is not None:
        preset["seeds"] = list(range(args.seeds))
    if args.steps is not None:
        preset["steps"] = args.steps
    if args.per_class is not None:
        preset["per_class"] = args.per_class
    if args.sampler_row_per_class is not None:
        preset["sampler_row_per_class"] = args.sampler_row_per_class
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
    ablations = {name: ABLATIONS[name] for name in (args.ablations or list(ABLATIONS))} if args.ablate else {}
    ablation_seeds = seeds[:args.ablate_seeds] if args.ablate_seeds else seeds
    all_arms = {**arms, **ablations}
    plan.arms = dict(arms)
    sampler_row = not args.no_sampler_row
    expected = expected_costs(args, plan, preset, seeds, arms, sampler_row, all_arms)
    for seed in ablation_seeds:
        for name in ablations:
            for stage, cost in zip((f"train {name}-s{seed}", f"sample {name}-s{seed}", f"evaluate {name}-s{seed}"),
                                   (preset["steps"] * 0.35, preset["per_class"] * 0.4, 10.0)):
                expected[stage] = cost
    clock = StageClock(expected)
    started = time.perf_counter()
    # Caches for every arm (ablation ones too) are built once, up front.
    prepared = prepare(plan, clock, all_arms)

    runs = []
    for seed in seeds:
        for arm, extra in arms.items():
            result = run_arm(plan, prepared, arm, extra, seed=seed, tag=f"{arm}-s{seed}", clock=clock)
            runs.append(_record(result, arm, seed))
    for seed in ablation_seeds:
        for arm, extra in ablations.items():
            result = run_arm(plan, prepared, arm, extra, seed=seed, tag=f"{arm}-s{seed}", clock=clock)
            runs.append(_record(result, arm, seed))

    sampler = None
    if sampler_row:
        fad_arm = next((a for a in arms if a != "vanilla"), "vanilla")
        run_dir = out / f"{fad_arm}-s{seeds[0]}"
        rows = {}
        for label, scheduler, steps in row_samplers(args, preset):
            samples = out / f"samplerrow-{label}"
            manifest = clock.run(f"sampler {label}", lambda: sample_run(
                plan, run_dir, samples, seed=seeds[0], sample__scheduler=scheduler, sample__steps=steps,
                sample__per_class=preset["sampler_row_per_class"]))
            rows[label] = {"scheduler": scheduler, "steps": steps, "images": manifest["count"],
                           "arms_sampler": (scheduler, steps) == (args.scheduler, args.sampler_steps),
                           "s_per_image": manifest["timing"]["s_per_image"], "wall_s": manifest["timing"]["wall_s"],
                           "samples": str(samples)}
        for label in rows:
            report = clock.run(f"evaluate sampler {label}", lambda: evaluate_run(
                plan, prepared, out / f"samplerrow-{label}", out / f"eval-samplerrow-{label}", seed=seeds[0]))
            rows[label]["metrics"] = metrics_of(report)
        sampler = {"run": str(run_dir), "arm": fad_arm, "seed": seeds[0],
                   "per_class": preset["sampler_row_per_class"], "rows": rows}

    total = time.perf_counter() - started
    return assemble(args, preset, plan, prepared, runs, arms, ablations, sampler, clock.timings, total)


def _record(result: dict, arm: str, seed: int) -> dict:
    report, manifest = result["report"], result["manifest"]
    card = json.loads((Path(result["run"]) / "final" / "run_card.json").read_text())
    final = card.get("final_metrics", {})
    return {"arm": arm, "seed": seed, "metrics": metrics_of(report),
            "real": {"diversity": report_value(report, ("diversity", "mean", "real")),
                     "evaluator_accuracy": report_value(report, ("real_accuracy", "overall")),
                     "utility_real_only": report_value(report, ("utility", "setups", "real", "overall"))},
            "train_s": result["timings"].get(f"train {arm}-s{seed}"),
            "final_noise_loss": final.get("loss/noise"),
            "final_align_cosine": final.get("align/cosine"),
            # ~1: the alignment targets of different tiles point one way (a collapsed seed projector).
            "final_target_similarity": final.get("align/target_similarity"),
            "unet": card.get("config", {}).get("model", {}).get("preset"),
            "sample_s_per_image": manifest["timing"]["s_per_image"], "generated": manifest["count"],
            "run": str(result["run"])}


def assemble(args, preset, plan, prepared, runs, arms, ablations, sampler, timings, total) -> dict:
    def of(arm):
        return sorted((r for r in runs if r["arm"] == arm), key=lambda r: r["seed"])

    per_arm = {}
    for arm in [*arms, *ablations]:
        rows = of(arm)
        per_arm[arm] = {key: {**summary([r["metrics"][key] for r in rows]), "per_seed": [r["metrics"][key] for r in rows]}
                        for key, _, _, _ in METRICS}
        per_arm[arm]["train_s"] = summary([r["train_s"] for r in rows])
        per_arm[arm]["final_noise_loss"] = summary([r["final_noise_loss"] for r in rows])
        per_arm[arm]["final_align_cosine"] = summary([r["final_align_cosine"] for r in rows])
        per_arm[arm]["final_target_similarity"] = summary([r.get("final_target_similarity") for r in rows])
        per_arm[arm]["seeds"] = [r["seed"] for r in rows]
    vanilla_by_seed = {r["seed"]: r["metrics"] for r in of("vanilla")}
    differences = {}
    for arm in [a for a in [*arms, *ablations] if a != "vanilla"]:
        rows = [r for r in of(arm) if r["seed"] in vanilla_by_seed]
        differences[arm] = paired([r["metrics"] for r in rows], [vanilla_by_seed[r["seed"]] for r in rows])
        differences[arm]["seeds"] = [r["seed"] for r in rows]
    arrays = {}
    for spatial, folder in prepared.caches.items():
        shapes = json.loads((Path(folder) / "manifest.json").read_text())["cache"]["arrays"]
        arrays.update({key.removesuffix(".npy"): value["shape"] for key, value in shapes.items()})
    cards = {name: json.loads(Path(path).read_text()) for name, path in
             (("alignment_expert", prepared.alignment_expert), ("evaluator", prepared.evaluator))}
    first = runs[0]["real"] if runs else {}
    verdict = {}
    for arm, diff in differences.items():
        acc, fd = diff["gen_acc"], diff["frechet"]
        n = acc.get("n", 0)
        helps = acc.get("consistent") and acc["mean"] > 0 and fd.get("mean") is not None and fd["mean"] <= 0
        hurts = acc.get("consistent") and acc["mean"] < 0
        verdict[arm] = ("helps" if helps else "hurts" if hurts else "no consistent effect") + \
            f" (generation accuracy {_pm(acc, 3, True)}, better in {acc.get('better', 0)}/{n} seeds; " \
            f"Frechet {_pm(fd, 2, True)}, lower in {fd.get('better', 0)}/{fd.get('n', 0)})"
    return {
        "bench": "quality",
        "preset": args.preset, "quick": bool(args.quick),
        "setup": {"source": plan.source, "image_size": plan.image_size, "seeds": preset["seeds"],
                  "steps": preset["steps"], "batch": preset["batch"], "per_class_generated": preset["per_class"],
                  "sampler": {"scheduler": args.scheduler, "steps": args.sampler_steps},
                  "utility": bool(args.utility), "fad_overrides": plan.fad_overrides,
                  "expert_overrides": plan.expert_overrides, "arms": {**arms, **ablations},
                  "unet": runs[0]["unet"] if runs else None, "layer": LAYER,
                  "cached_expert_arrays": arrays,  # per tile: [8 views, D] pooled, [8, D, h, w] spatial
                  "device": "cuda" if torch.cuda.is_available() else "cpu", "threads": torch.get_num_threads(),
                  "out": str(plan.out)},
        "experts": {name: {"arch": card.get("arch"), "val_accuracy": card.get("val_accuracy"),
                           "subset": "A" if name == "alignment_expert" else "B"} for name, card in cards.items()},
        "reference": {"real_val_diversity": first.get("diversity"),
                      "evaluator_accuracy_on_real_val": first.get("evaluator_accuracy"),
                      "utility_real_only": first.get("utility_real_only")},
        "runs": runs, "arms": per_arm, "differences": differences, "sampler": sampler, "verdict": verdict,
        "timings_s": {k: round(v, 2) for k, v in timings.items()}, "total_s": round(total, 1),
    }


# ------------------------------------------------------------------------------------------ printing


def print_table(result: dict) -> None:
    setup = result["setup"]
    keys = [(k, label) for k, label, _, _ in METRICS
            if any(a[k]["mean"] is not None for a in result["arms"].values())]
    print(f"bench_quality preset {result['preset']}{' (quick)' if result['quick'] else ''}: {setup['source']}, "
          f"{setup['image_size']} px, seeds {setup['seeds']}, {setup['steps']} steps x batch {setup['batch']}, "
          f"{setup['per_class_generated']}/class sampled with {setup['sampler']['scheduler']}-"
          f"{setup['sampler']['steps']}; {setup['device']}, {setup['threads']} threads; total {result['total_s']:.0f} s")
    ex = result["experts"]
    ref = result["reference"]
    print(f"alignment expert (A) val acc {_num(ex['alignment_expert']['val_accuracy'])}, evaluator (B) val acc "
          f"{_num(ex['evaluator']['val_accuracy'])}; evaluator on real val tiles {_num(ref['evaluator_accuracy_on_real_val'])}, "
          f"real SSIM diversity {_num(ref['real_val_diversity'])}"
          + (f", real-only utility {_num(ref['utility_real_only'])}" if ref.get("utility_real_only") is not None else ""))
    print()
    width = 24
    header = f"{'arm':<18}" + "".join(f"{label:>{width}}" for _, label in keys) + f"{'train s':>{width}}" \
        + f"{'align target sim.':>{width}}"
    print(f"per arm: mean +/- std over seeds ({setup['unet']} UNet; align target sim. ~1: the alignment targets "
          "of different tiles coincide)")
    print(header)
    for arm, entry in result["arms"].items():
        print(f"{arm:<18}" + "".join(f"{_pm(entry[k], _digits(k)):>{width}}" for k, _ in keys)
              + f"{_pm(entry['train_s'], 1):>{width}}" + f"{_pm(entry['final_target_similarity'], 3):>{width}}")
    print()
    print("paired FAD - vanilla (same seed): mean +/- std [seeds better / n]")
    print(f"{'arm':<18}" + "".join(f"{label:>{width}}" for _, label in keys))
    for arm, diff in result["differences"].items():
        cells = []
        for k, _ in keys:
            d = diff[k]
            tag = f" [{d['better']}/{d['n']}]" if "better" in d else ""
            cells.append(f"{_pm(d, _digits(k), True) + tag:>{width}}")
        print(f"{arm:<18}" + "".join(cells))
    if result["sampler"]:
        s = result["sampler"]
        print()
        print(f"sampler row: {s['arm']} seed {s['seed']}, {s['per_class']}/class")
        print(f"{'sampler':<18}{'s/image':>{width}}" + "".join(f"{label:>{width}}" for _, label in keys))
        for label, row in s["rows"].items():
            print(f"{label + (' (arms)' if row.get('arms_sampler') else ''):<18}{row['s_per_image']:>{width}.4f}"
                  + "".join(f"{_num(row['metrics'][k], _digits(k)):>{width}}" for k, _ in keys))
    print()
    for arm, text in result["verdict"].items():
        print(f"{arm}: {text}")
    print()


def main(argv=None) -> None:
    """Sizing of the cpu preset, from fadscale.demo's stage costs on 2 idle cores (200 cpu-small steps
    ~60-70 s, 128 tiles x 20 DDIM steps ~10 s, a tiny expert ~20-40 s): 9 runs of 300 steps ~15-17 min,
    sampling 9 x 192 tiles x 25 steps ~3 min, evaluations (no utility) ~1.5 min, experts and caches
    ~1.5 min, the sampler row (64 tiles with DDPM-1000) ~4 min: ~25-30 min. Estimates, not a measurement;
    on a shared machine it takes several times longer."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--quick", action="store_true", help="1 seed, few steps, few tiles: a smoke test")
    parser.add_argument("--out", help="output folder (default runs/bench-quality-<preset>)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--seeds", type=int, help="number of seeds (0..N-1); default: the preset's")
    parser.add_argument("--steps", type=int, help="training steps per run; default: the preset's")
    parser.add_argument("--per-class", type=int, help="generated tiles per class; default: the preset's")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--scheduler", choices=["ddpm", "ddim", "dpm++"], default="ddim",
                        help="sampler of every arm (default ddim: see the module docstring on dpm++)")
    parser.add_argument("--sampler-steps", type=int, default=25)
    parser.add_argument("--no-sampler-row", action="store_true", help="skip the DDPM-1000 vs DPM-Solver++-25 row")
    parser.add_argument("--sampler-row-per-class", type=int, help="tiles per class in the sampler row")
    parser.add_argument("--utility", action="store_true", help="also train-on-synthetic utility (slower)")
    parser.add_argument("--ablate", action="store_true", help="also the FAD variants (weight, layer, target)")
    parser.add_argument("--ablations", nargs="+", choices=list(ABLATIONS), help="which variants (default all)")
    parser.add_argument("--ablate-seeds", type=int, help="variants on the first N seeds only (default all)")
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads (default: torch's choice; 1 is much faster on a busy machine)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra FadConfig override for every arm, e.g. --set optim.lr=5e-4")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    # Library output (stage lines, per-stage logs) goes to stderr; stdout holds the table and the JSON.
    with contextlib.redirect_stdout(sys.stderr):
        result = run_bench(args)
    print_table(result)
    print(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
