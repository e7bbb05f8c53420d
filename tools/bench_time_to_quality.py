"""Time to quality on real tiles: the real-tile recipe (configs/kather16, vanilla) beside a plain
class-conditional DDPM of the same size, trained the same way, scored in full at a ladder of points.

    python tools/bench_time_to_quality.py --from-demo real-demo --points 1000 2000 4000 8000 --threads 2
    python tools/bench_time_to_quality.py --from-demo real-demo --arms plain --threads 1   # one arm per core
    python tools/bench_time_to_quality.py --from-demo real-demo --arms recipe --points 1500 --split val \
        --set noise.min_snr_gamma=5 --tag=-minsnr                 # a recipe change, judged on val tiles

Each arm is one run trained in stages: to the first point, then resumed to the next (the trainer continues a
run when max_steps grows), so every point is the same run further on. The learning rate is constant after
warm-up in both arms (a cosine decay would tie each point's weights to where the schedule ends). At every
point the run's EMA weights are sampled (32 tiles per class, DPM-Solver++ 25, the demo's sampler when this curve was measured) and
evaluated against the shards' test part exactly as the demo is: every figure of the real-tile bar, recall,
orientation per class, and the grid (`<out>/eval-<arm>-<step>/grids/`).

Arms (the same cpu-base UNet, batch, learning rate, class embedding, EMA and sampler):
  recipe   configs/kather16/vanilla.yaml: v-prediction, timesteps drawn as T u^2 (more low-noise steps), 24 px windows
  plain    a plain DDPM: epsilon prediction, uniform timesteps, sampled on leading timesteps, whole tiles

Time: each stage's training seconds (measured: its own process, at --threads, beside whatever else ran; the
"other load" column says how many CPUs other processes kept busy meanwhile). The last line is one JSON object
with every number; `<out>/time_to_quality.csv` has one row per arm and point.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

REPO = Path(__file__).resolve().parents[1]
CONSTANT_LR = ["optim.schedule=constant"]
ARMS = {
    "recipe": CONSTANT_LR,
    # Leading timesteps, as DDPM samples: trailing ones start at t = T - 1, where an epsilon model's x0
    # estimate divides by sqrt(alpha_bar) ~ 0.006 and the tiles blow up (v-prediction has no such step).
    "plain": CONSTANT_LR + ["train.crop=null", "noise.prediction_type=epsilon", "noise.timestep_power=1", "noise.timestep_spacing=leading"],
}
SAMPLER = ["sample.scheduler=dpm++", "sample.steps=25"]
FIGURES = ["generation_accuracy", "frechet_ratio", "syn_over_real", "copy_share", "colour_gap", "recall"]


def point_figures(report: dict) -> dict:
    """The numbers of one evaluation that the bar and the curve need."""
    from fadscale.pipeline.demo import quality_bar
    from fadscale.core.evaluation.report import report_value

    bar = quality_bar(report, real_tiles=True)
    orientation = {name: entry.get("generated") for name, entry in report["orientation"]["per_class"].items()}
    return {"generation_accuracy": bar[0][1], "evaluator_real_accuracy": report_value(report, ("real_accuracy", "overall")),
            "frechet_ratio": bar[1][1], "syn_over_real": bar[2][1], "copy_share": bar[3][1], "colour_gap": bar[4][1],
            "recall": report_value(report, ("distances", "overall", "recall")),
            "recall_reference": report_value(report, ("distances", "reference", "recall")),
            "orientation": orientation,
            "orientation_real": {name: entry.get("real") for name, entry in report["orientation"]["per_class"].items()},
            "passed": {label: passed for label, _, _, passed in bar}}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--from-demo", dest="from_demo", required=True,
                        help="a real-tile demo folder (fadscale demo --data DIR): its shards, experts and cache")
    parser.add_argument("--out", default=str(REPO / "runs" / "bench-time-to-quality"))
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--points", nargs="+", type=int, default=[1000, 2000, 4000, 8000])
    parser.add_argument("--threads", type=int)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override added to every arm (a recipe change to try)")
    parser.add_argument("--tag", default="", help="appended to each arm's folder names (runs with other --set)")
    parser.add_argument("--split", default="test", choices=["test", "val"],
                        help="the real tiles scored: test (the benchmark), or val (to pick a setting: never on test)")
    parser.add_argument("--sample", action="append", default=[], metavar="KEY=VALUE",
                        help="a sampling override (e.g. sample.scheduler=dpm++-sde, the real-tile demo's sampler)")
    args = parser.parse_args(argv)
    from bench_recipe import reuse_demo

    from fadscale.pipeline.plan import Plan, Prepared, evaluate_run, sample_run, train_run
    from fadscale.runtime.cpu_load import OtherLoad
    from fadscale.runtime.distributed import set_cpu_threads

    threads = set_cpu_threads(args.threads)
    out = Path(args.out)
    prepared = reuse_demo(Path(args.from_demo), out, Prepared)
    plan = Plan(out=out, recipe="kather16", channels=3, sample_overrides=[*SAMPLER, *args.sample], eval_every=None)
    rows: list[dict] = []
    for arm in args.arms:
        seconds = 0.0
        for step in sorted(args.points):
            overrides = ["align.enabled=false", *ARMS[arm], *args.set, f"train.max_steps={step}",
                         "checkpoint.every=1000000"]
            with contextlib.redirect_stdout(sys.stderr):
                with OtherLoad() as load:
                    run_dir = train_run(plan, prepared, "vanilla", overrides, tag=arm + args.tag)
                seconds += load.wall
                tag = f"{arm}{args.tag}-{step}"
                sample_run(plan, run_dir, out / f"samples-{tag}")
                report = evaluate_run(plan, prepared, out / f"samples-{tag}", out / f"eval-{tag}",
                                      overrides=[f"real.split={args.split}"])
            row = {"arm": arm + args.tag, "settings": args.set, "sampling": args.sample, "split": args.split, "step": step, "train_seconds": round(seconds, 1), "threads": threads,
                   "other_load_cpus": round(load.cpus, 2), **point_figures(report)}
            rows.append(row)
            print(f"{arm:<7} step {step:>6}  train {seconds:>7.0f} s  gen. acc {row['generation_accuracy']:.3f} "
                  f"(evaluator {row['evaluator_real_accuracy']:.3f})  Frechet ratio {row['frechet_ratio']:.2f}  "
                  f"syn/real {row['syn_over_real']:.2f}  copies {row['copy_share']:.3f}  colour gap "
                  f"{row['colour_gap']:.3f}  recall {row['recall']:.2f}  STROMA orientation "
                  f"{row['orientation'].get('STROMA', 0):.2f}  other load {row['other_load_cpus']:.2f}", flush=True)
    first_met = {}
    for arm in [arm + args.tag for arm in args.arms]:
        for label in rows[0]["passed"]:
            met = [r for r in rows if r["arm"] == arm and r["passed"][label]]
            first_met.setdefault(arm, {})[label] = {"step": met[0]["step"], "train_seconds": met[0]["train_seconds"]} \
                if met else None
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "time_to_quality.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["arm", "step", "train_seconds", "threads", "other_load_cpus", *FIGURES, "STROMA_orientation"])
        for r in rows:
            writer.writerow([r["arm"], r["step"], r["train_seconds"], r["threads"], r["other_load_cpus"],
                             *(f"{r[k]:.4f}" if r[k] is not None else "" for k in FIGURES),
                             f"{r['orientation'].get('STROMA') or 0:.4f}"])
    print(json.dumps({"bench": "time_to_quality", "threads": threads, "rows": rows, "first_met": first_met}))


if __name__ == "__main__":
    main()
