"""Sampling throughput: seconds per image of fadscale.core.sampling.generate, the loop `fadscale sample` and the
training grids run, at the demo's size, batched across classes; eager and torch.compile'd; against DDPM-1000.

    python tools/bench_sampling.py --threads 1                        # dpm++ 25 at batch 8/64/256 (compiled at 64), DDPM-1000 at 8
    python tools/bench_sampling.py --threads 2 --compile-batches 64 256 --reps 3
    python tools/bench_sampling.py --preset tiny-sd --size 64 --batches 64 256   # on a GPU

The UNet is built by fadscale.core.models.unet.build_unet with random weights (--preset, --size, 1 channel, the
class embedding for 8 classes + the null class) and a random class-token table; the time of a sampler step
does not depend on the weights. Batch b holds labels 0..7 repeated (a batch across classes, as `fadscale
sample` cuts its class-major order). fp32, as `sample.mixed_precision: auto` samples on a CPU.

Per batch size: one untimed warm-up call, then --reps calls of the whole sampler, eager and compiled
interleaved (eager, compiled, eager, ...) so a neighbour's load hits both; the median call / batch = s/image.
Each row also shows the most "other load" any of its calls saw (CPUs busy outside this process, from
/proc/stat): on a shared 2-core machine a neighbour's burst slows 2 threads several-fold.
The compiled arm is `torch.compile(unet)` (inductor) and its first call, the compile, is reported apart.
DDPM-1000 (the reference's sampler: one UNet call per training step, per-image noise) runs once on
--ddpm-batch images (it is 40x slower). Quality at equal settings comes from tools/bench_quality.py (docs/results/fad-vs-vanilla-procedural.md).

The last line printed is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from fadscale.runtime.cpu_load import OtherLoad  # noqa: E402

CLASSES = 8


def build(preset: str, size: int, seed: int = 0):
    """A random-weight UNet of the preset (1 channel, class embedding) and a class-token table."""
    from fadscale.core.models.unet import build_unet

    torch.manual_seed(seed)
    unet = build_unet(preset, 1, size, None, CLASSES + 1).eval().requires_grad_(False)
    table = torch.randn(CLASSES + 1, 1, unet.config.cross_attention_dim) * 0.02
    return unet, table




LOADS: list[float] = []  # other load (CPUs busy outside this process) during each timed call


def sample_call(unet, table, batch: int, scheduler: str, steps: int, size: int) -> float:
    """Seconds for one generate() of `batch` images across the classes; notes the machine's other load."""
    from fadscale.config import NoiseSection
    from fadscale.core.sampling import generate, make_scheduler, noise_config

    sched = make_scheduler(scheduler, noise_config(NoiseSection()))
    labels = torch.arange(batch) % CLASSES
    with OtherLoad() as load:
        generate(unet, table, labels, list(range(batch)), scheduler=sched, steps=steps, null_index=CLASSES,
                 image_size=size, channels=1, device=torch.device("cpu"))
    LOADS.append(load.cpus)
    return load.wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--preset", default="cpu-base")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--scheduler", default="dpm++", choices=["dpm++", "dpm++-sde", "ddim", "ddpm"])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 64, 256])
    parser.add_argument("--compile-batches", type=int, nargs="*", default=[64],
                        help="batch sizes that also get the torch.compile arm (none: eager only)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--ddpm-batch", type=int, default=8, help="DDPM-1000's batch (0: skip it)")
    parser.add_argument("--ddpm-steps", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all CPUs)")
    args = parser.parse_args()
    from fadscale.runtime.distributed import set_cpu_threads

    threads = set_cpu_threads(args.threads)
    unet, table = build(args.preset, args.size)
    compiled = None
    if args.compile_batches:
        # dynamic=False: each batch size gets its own graph (what a run with one sample.batch_size compiles)
        compiled = torch.compile(unet, dynamic=False)
    rows = {}
    for batch in args.batches:
        arms = {"eager": unet}
        if compiled is not None and batch in args.compile_batches:
            arms["compiled"] = compiled
        first = {name: sample_call(model, table, batch, args.scheduler, 2, args.size) for name, model in arms.items()}
        times, loads = {name: [] for name in arms}, []
        for _ in range(args.reps):
            for name, model in arms.items():
                times[name].append(sample_call(model, table, batch, args.scheduler, args.steps, args.size))
                loads.append(LOADS[-1])
        row = {"warmup_s": first, "times": times, "other_load_cpus_max": max(loads),
               "s_per_image": {name: statistics.median(t) / batch for name, t in times.items()}}
        if "compiled" in row["s_per_image"]:
            row["compiled_over_eager"] = row["s_per_image"]["compiled"] / row["s_per_image"]["eager"]
        rows[batch] = row
        line = "  ".join(f"{name} {v:.4f} s/img" for name, v in row["s_per_image"].items())
        extra = (f"  compiled/eager {row['compiled_over_eager']:.2f} (compile {first['compiled']:.0f} s)"
                 if "compiled_over_eager" in row else "")
        print(f"{args.scheduler}-{args.steps} batch {batch:4d}: {line}{extra}  (other load up to {max(loads):.2f} "
              "CPUs)", flush=True)
    ddpm = None
    if args.ddpm_batch:
        seconds = sample_call(unet, table, args.ddpm_batch, "ddpm", args.ddpm_steps, args.size)
        ddpm = {"batch": args.ddpm_batch, "steps": args.ddpm_steps, "s_per_image": seconds / args.ddpm_batch,
                "other_load_cpus": LOADS[-1]}
        print(f"ddpm-{args.ddpm_steps} batch {args.ddpm_batch:4d}: eager {ddpm['s_per_image']:.4f} s/img  (other load "
              f"{LOADS[-1]:.2f} CPUs)", flush=True)

    print(f"\nSampling, {args.preset} UNet (random weights), {args.size} px, 1 channel, fp32, {threads} threads; "
          f"median of {args.reps} calls")
    print(f"{'batch':>5s} {'eager s/img':>11s} {'compiled s/img':>14s} {'compiled/eager':>14s} {'compile s':>9s}"
          + (f" {'ddpm/this':>9s}" if ddpm else "") + "  other load")
    for batch, row in rows.items():
        s = row["s_per_image"]
        best = min(s.values())
        if ddpm:
            row["ddpm_over_this"] = ddpm["s_per_image"] / best
        print(f"{batch:5d} {s['eager']:11.4f} "
              + (f"{s['compiled']:14.4f} {row['compiled_over_eager']:14.2f} {row['warmup_s']['compiled']:9.0f}"
                 if "compiled" in s else f"{'-':>14s} {'-':>14s} {'-':>9s}")
              + (f" {row['ddpm_over_this']:9.1f}" if ddpm else "") + f"  {row['other_load_cpus_max']:.2f}")
    if ddpm:
        print(f"DDPM-{args.ddpm_steps} at batch {ddpm['batch']}: {ddpm['s_per_image']:.3f} s/img; ddpm/this: how many "
              f"times longer DDPM-{args.ddpm_steps} takes per image than {args.scheduler}-{args.steps} at that batch "
              "(the faster arm)")
    print(json.dumps({"bench": "sampling", "preset": args.preset, "size": args.size, "scheduler": args.scheduler,
                      "steps": args.steps, "threads": threads, "device": "cpu",
                      "rows": {str(b): {k: v for k, v in r.items() if k != "times"} for b, r in rows.items()},
                      "ddpm": ddpm}))


if __name__ == "__main__":
    main()
