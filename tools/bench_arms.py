"""The demo's two arms one after the other (all threads each) against side by side (one process per arm, an
equal share of the threads each): the wall time of training, sampling and evaluating both, on the same
prepared shards, experts and cache, measured in one run.

    python tools/bench_arms.py --data ../shared/data/kather16 --steps 300 --threads 2   # real tiles, ~8 min
    python tools/bench_arms.py --steps 300 --threads 2                                  # built-in tiles

The plan is `fadscale demo --data DATA --steps STEPS`'s (the real-tile recipe for colour tiles), with the
experts trained one epoch (their quality does not change a step's cost). Each mode runs --repeats times,
alternating, into the same folders; the figures of both modes are checked equal at one thread per arm
(tests/test_demo.py), so only the time differs. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--data", default=None, help="a folder or zip of tiles (default: the built-in tiles)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-arms"))
    parser.add_argument("--steps", type=int, default=300, help="training steps per arm")
    parser.add_argument("--threads", type=int, required=True, help="the CPUs the demo may use")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)
    os.environ["FADSCALE_THREADS"] = str(args.threads)

    from fadscale.pipeline.demo import demo_plan
    from fadscale.pipeline.plan import StageClock, prepare, run_arms
    from fadscale.runtime.distributed import set_cpu_threads
    from fadscale.runtime.logging import log_line

    set_cpu_threads(args.threads)
    if args.out.exists():
        shutil.rmtree(args.out)
    plan = demo_plan(args.out, args.data, steps=args.steps)
    plan.expert_overrides = [*plan.expert_overrides, "train.epochs=1"]
    plan.evaluator_overrides = []
    prepared = prepare(plan)
    walls: dict[str, list[float]] = {"one after the other": [], "side by side": []}
    stages: dict[str, list[dict]] = {mode: [] for mode in walls}
    for _ in range(args.repeats):
        for mode, processes in (("one after the other", 1), ("side by side", len(plan.arms))):
            for arm in plan.arms:  # the same folders each time: a run that finds its final/ would not train
                for folder in (arm, f"samples-{arm}", f"eval-{arm}"):
                    shutil.rmtree(args.out / folder, ignore_errors=True)
            plan.arm_processes = processes
            clock = StageClock({})
            started = time.perf_counter()
            run_arms(plan, prepared, clock)
            walls[mode].append(time.perf_counter() - started)
            stages[mode].append(dict(clock.timings))
            log_line(f"{mode}: {walls[mode][-1]:.1f} s")
    seq, side = (statistics.median(walls[m]) for m in walls)
    result = {"bench": "arms", "data": args.data or "built-in", "steps": args.steps, "threads": args.threads,
              "arms": list(plan.arms), "wall_s": walls, "median_s": {"one after the other": seq, "side by side": side},
              "side_by_side_over_one_after_the_other": side / seq, "stage_s": stages}
    print(f"both arms, {args.steps} steps each, {args.threads} threads: one after the other {seq:.1f} s, side by "
          f"side {side:.1f} s, ratio {side / seq:.2f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
