"""What each change of the demo's recipe bought: the old demo's settings, then one change at a time, up to
today's configs/tiny recipe, each trained, sampled and scored the same way (vanilla, one seed).

    python tools/bench_recipe.py --threads 2            # the demo's data and evaluator; ~20 min on 2 cores
    python tools/bench_recipe.py --threads 1 --from-demo demo-out --steps +cpu-base +low-noise today --seeds 3
                                                        # two rungs over 3 seeds, paired, on a demo's experts

Steps of the ladder (each includes the ones above it):
  old-demo        cpu-tiny UNet, one cross-attention token per class, epsilon prediction, 200 steps at lr 1e-3,
                  fp32, sampled with DDIM-20 on leading timesteps (the demo before this change)
  +longer         800 steps at lr 2e-3
  +class-embed    a class embedding added to the timestep embedding (conditioning.class_embedding)
  +v-pred         v-prediction (noise.prediction_type)
  +sampler        trailing timesteps (noise.timestep_spacing) and DPM-Solver++ 25 steps
  +cpu-base       the cpu-base UNet and bf16 autocast
  +low-noise      more low-noise training steps: timesteps drawn as T u^2 (noise.timestep_power 2)
  today           1,200 steps instead of 800 (configs/tiny/fad.yaml as shipped)

With --seeds N every rung runs seeds 0..N-1, and each rung is compared with the rung before it, paired by
seed, under tools/bench_quality.py's rule (a metric is better or worse only if its paired 95% interval
excludes 0 on that side and most seeds agree; otherwise "no effect shown"). --from-demo reuses a
`fadscale demo` folder's shards, experts and feature cache (training stays deterministic only at the
thread count they were made with; the experts are not retrained).

Every run: the demo's shards (512 procedural 32 px tiles), experts A and B, 32 tiles per class, the demo's
evaluation (generation accuracy by the split-B evaluator, Frechet ratio, largest class intensity gap,
train-on-synthetic utility). The last line printed is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

from fadscale.core.evaluation.report import report_value  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OLD_SAMPLER = ["sample.scheduler=ddim", "sample.steps=20"]
NEW_SAMPLER = ["sample.scheduler=dpm++", "sample.steps=25"]
OLD = ["model.preset=cpu-tiny", "conditioning.class_embedding=false", "noise.prediction_type=epsilon",
       "noise.timestep_spacing=leading", "train.mixed_precision=no", "noise.timestep_power=1", "train.max_steps=800"]
LADDER = {  # name -> (FadConfig overrides, sampler)
    "old-demo": (OLD + ["train.max_steps=200", "optim.lr=1e-3"], OLD_SAMPLER),
    "+longer": (OLD, OLD_SAMPLER),
    "+class-embed": ([o for o in OLD if not o.startswith("conditioning")], OLD_SAMPLER),
    "+v-pred": (["model.preset=cpu-tiny", "noise.timestep_spacing=leading", "train.mixed_precision=no",
                 "noise.timestep_power=1", "train.max_steps=800"], OLD_SAMPLER),
    "+sampler": (["model.preset=cpu-tiny", "train.mixed_precision=no", "noise.timestep_power=1", "train.max_steps=800"],
                 NEW_SAMPLER),
    "+cpu-base": (["noise.timestep_power=1", "train.max_steps=800"], NEW_SAMPLER),
    "+low-noise": (["train.max_steps=800"], NEW_SAMPLER),
    "today": ([], NEW_SAMPLER),
}
METRICS = {"gen_acc": ("generation_accuracy", "overall"), "frechet": ("distances", "overall", "frechet"),
           "frechet_ratio": ("distances", "frechet_ratio"), "intensity_gap": ("intensity", "max_abs_gap"),
           "util_syn": ("utility", "setups", "synthetic", "overall")}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", default=str(REPO / "runs" / "bench-recipe"))
    parser.add_argument("--threads", type=int)
    parser.add_argument("--steps", nargs="+", choices=list(LADDER), default=list(LADDER))
    parser.add_argument("--seed", type=int, default=0, help="the seed (one seed; see --seeds)")
    parser.add_argument("--seeds", type=int, help="run seeds 0..N-1 and compare each rung with the one before, paired")
    parser.add_argument("--from-demo", dest="from_demo", help="reuse this demo folder's shards, experts and cache")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override added to every rung run (after the rung's own)")
    args = parser.parse_args(argv)
    from bench_quality import paired

    from fadscale.pipeline.plan import Plan, Prepared, StageClock, prepare, run_arm
    from fadscale.runtime.distributed import set_cpu_threads

    threads = set_cpu_threads(args.threads)
    out = Path(args.out)
    seeds = list(range(args.seeds)) if args.seeds else [args.seed]
    plan = Plan(out=out, seed=seeds[0], arms={"vanilla": ["align.enabled=false"]})
    runs: dict[str, list[dict]] = {}
    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        clock = StageClock({})
        prepared = reuse_demo(Path(args.from_demo), out, Prepared) if args.from_demo else prepare(plan, clock)
        for name in args.steps:
            overrides, sampler = LADDER[name]
            plan.sample_overrides = list(sampler)
            for seed in seeds:
                tag = name.strip("+") + (f"-s{seed}" if args.seeds else "")
                result = run_arm(plan, prepared, "vanilla", ["align.enabled=false", *overrides, *args.set], seed=seed,
                                 tag=tag, clock=clock)
                runs.setdefault(name, []).append({
                    **{k: report_value(result["report"], path) for k, path in METRICS.items()}, "seed": seed,
                    "train_s": result["timings"][f"train {tag}"], "overrides": [*overrides, *args.set], "sampler": sampler})
    real = report_value(result["report"], ("real_accuracy", "overall"))
    print(f"bench_recipe: vanilla, seeds {seeds}, {threads} threads; evaluator on real val tiles {real:.3f}; "
          f"total {time.perf_counter() - started:.0f} s")
    print(f"{'step':<14}{'seed':>5}{'gen. accuracy':>15}{'Frechet':>10}{'ratio':>8}{'intensity gap':>15}"
          f"{'util. syn.':>12}{'train s':>9}")
    for name, rows in runs.items():
        for r in rows:
            print(f"{name:<14}{r['seed']:>5}{r['gen_acc']:>15.3f}{r['frechet']:>10.2f}{r['frechet_ratio']:>8.2f}"
                  f"{r['intensity_gap']:>15.3f}{r['util_syn']:>12.3f}{r['train_s']:>9.1f}")
    comparisons = {}
    if len(seeds) > 1:
        names = list(runs)
        for before, after in zip(names, names[1:]):
            diff = paired(runs[after], runs[before], [("gen_acc", True), ("frechet", False)])
            comparisons[f"{after} vs {before}"] = diff
            print(f"{after} - {before} (paired over {len(seeds)} seeds, 95% interval): " + "; ".join(
                f"{key} {d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] {d['verdict']}"
                for key, d in diff.items()))
    print(json.dumps({"bench": "recipe", "seeds": seeds, "threads": threads, "evaluator_real_accuracy": real,
                      "runs": runs, "paired": comparisons}))


def reuse_demo(demo: Path, out: Path, prepared_type):
    """The shared stages of an earlier `fadscale demo --out DEMO` (linked into `out`, not retrained)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("shards", "expert-A", "expert-B", "cache"):
        if not (demo / name).exists():
            raise SystemExit(f"--from-demo {demo}: no {name}/ (not a finished demo folder)")
        if not (out / name).exists():
            (out / name).symlink_to((demo / name).resolve())
    return prepared_type(out, out / "shards", out / "expert-A" / "expert.json", out / "expert-B" / "expert.json",
                         {False: out / "cache"})


if __name__ == "__main__":
    main()
