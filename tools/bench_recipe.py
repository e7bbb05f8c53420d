"""What each change of the demo's recipe bought: the old demo's settings, then one change at a time, up to
today's configs/tiny recipe, each trained, sampled and scored the same way (vanilla, one seed).

    python tools/bench_recipe.py --threads 2            # the demo's data and evaluator; ~20 min on 2 cores

Steps of the ladder (each includes the ones above it):
  old-demo        cpu-tiny UNet, one cross-attention token per class, epsilon prediction, 200 steps at lr 1e-3,
                  fp32, sampled with DDIM-20 on leading timesteps (the demo before this change)
  +longer         800 steps at lr 2e-3
  +class-embed    a class embedding added to the timestep embedding (conditioning.class_embedding)
  +v-pred         v-prediction (noise.prediction_type)
  +sampler        trailing timesteps (noise.timestep_spacing) and DPM-Solver++ 25 steps
  today           the cpu-base UNet and bf16 autocast (configs/tiny/fad.yaml as shipped)

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

from fadscale.evaluate import report_value  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OLD_SAMPLER = {"sample__scheduler": "ddim", "sample__steps": 20}
NEW_SAMPLER = {"sample__scheduler": "dpm++", "sample__steps": 25}
OLD = ["model.preset=cpu-tiny", "conditioning.class_embedding=false", "noise.prediction_type=epsilon",
       "noise.timestep_spacing=leading", "train.mixed_precision=no"]
LADDER = {  # name -> (FadConfig overrides, sampler)
    "old-demo": (OLD + ["train.max_steps=200", "optim.lr=1e-3"], OLD_SAMPLER),
    "+longer": (OLD, OLD_SAMPLER),
    "+class-embed": ([o for o in OLD if not o.startswith("conditioning")], OLD_SAMPLER),
    "+v-pred": (["model.preset=cpu-tiny", "noise.timestep_spacing=leading", "train.mixed_precision=no"], OLD_SAMPLER),
    "+sampler": (["model.preset=cpu-tiny", "train.mixed_precision=no"], NEW_SAMPLER),
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
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from fadscale.pipeline import Plan, StageClock, prepare, run_arm
    from fadscale.runtime.distributed import set_cpu_threads

    threads = set_cpu_threads(args.threads)
    out = Path(args.out)
    plan = Plan(out=out, seed=args.seed, arms={"vanilla": ["align.enabled=false"]})
    rows = {}
    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        clock = StageClock({})
        prepared = prepare(plan, clock)
        for name in args.steps:
            overrides, sampler = LADDER[name]
            plan.sample_overrides = dict(sampler)
            tag = name.strip("+")
            result = run_arm(plan, prepared, "vanilla", ["align.enabled=false", *overrides], seed=args.seed, tag=tag,
                             clock=clock)
            rows[name] = {**{k: report_value(result["report"], path) for k, path in METRICS.items()},
                          "train_s": result["timings"][f"train {tag}"], "overrides": overrides, "sampler": sampler}
    real = report_value(result["report"], ("real_accuracy", "overall"))
    print(f"bench_recipe: vanilla, seed {args.seed}, {threads} threads; evaluator on real val tiles {real:.3f}; "
          f"total {time.perf_counter() - started:.0f} s")
    print(f"{'step':<14}{'gen. accuracy':>15}{'Frechet':>10}{'ratio':>8}{'intensity gap':>15}{'util. syn.':>12}"
          f"{'train s':>9}")
    for name, r in rows.items():
        print(f"{name:<14}{r['gen_acc']:>15.3f}{r['frechet']:>10.2f}{r['frechet_ratio']:>8.2f}"
              f"{r['intensity_gap']:>15.3f}{r['util_syn']:>12.3f}{r['train_s']:>9.1f}")
    print(json.dumps({"bench": "recipe", "seed": args.seed, "threads": threads, "evaluator_real_accuracy": real,
                      "rows": rows}))


if __name__ == "__main__":
    main()
