"""Benchmark the training step the FAD trainer runs, side by side: vanilla, FAD with the feature cache, and
FAD without it (the expert on every noisy batch, as the reference does); fp32 and bf16; gradient
checkpointing off and on.

    python tools/bench_step.py --threads 2                                   # cpu-base, 32 px, batch 16 (CPU)
    python tools/bench_step.py --preset tiny-sd --size 64 --batches 4 --reps 3 --threads 2
    python tools/bench_step.py --preset tiny-sd --size 64 --batches 64 128   # on a GPU: images/s and MFU too

What is timed is `Trainer.step` of fadscale.training on a `FadTask` (fadscale.train_fad), the same code a
training run executes: loss from fadscale.core.objective, backward, clipping, AdamW, schedule, EMA. Setup (once,
in --work): procedural shards, an expert card with random weights (`--expert` at `--input-size`; the
timing does not depend on the weights) and its feature cache. Each arm runs in its own process (clean
peak memory) with the same torch thread count: one untimed warm-up step, then the median of --reps steps.

Arms:
- vanilla: align.enabled false.
- fad: the cached target (what training reads from the feature cache).
- fad-online: align.target noisy-online: the expert runs on each noisy batch (no cache).
Ratios, measured in one run: fad / vanilla (what alignment costs with the cache), fad-online / fad (what
the cache removes), bf16 / fp32 per arm (the precision change), ckpt on / off.

CPU step options (`--options`, each against today's default step of one arm, `--options-arm` at
`--options-precision`, the demo's fad / bf16; the arms grid above is then skipped unless --arms is given):

    python tools/bench_step.py --threads 2 --options all                     # ~8-12 min on 2 cores
    python tools/bench_step.py --threads 2 --options compile channels-last --rounds 2

- default: the step as a training run takes it today (the baseline of every ratio).
- compile: model.compile true (torch.compile of the UNet, inductor; the compile is the warm-up, reported apart).
- channels-last: model.channels_last true.
- adamw-foreach / adamw-fused: AdamW(foreach=True) / AdamW(fused=True) instead of the CPU default (the
  per-parameter loop); the benchmark passes the flag to torch.optim.AdamW for that process only.
- threads-1 / threads-2: one / two intra-op threads instead of --threads (interop threads untouched); the
  one equal to --threads is skipped.
- interop-1: torch.set_num_interop_threads(1) with --threads intra-op threads.
- data: this arm times what a step also pays for its batch with the default data.workers 0, reading the
  feature cache (PNG decode, or the decoded-tile cache for a tile seen before; views, cached features),
  and reports that share of step + load.
Each option runs in its own process; `--rounds` repeats the whole set, interleaved (default, a, b, ...,
default, a, b, ...). Ratio = the median over rounds of (option median / that round's default median); the
per-round ratios are printed too. Every arm also records the machine's other load (CPUs busy outside it,
from /proc/stat): on a shared 2-core machine one busy neighbour thread slows a 2-thread step 20-40x (OpenMP
threads wait for a core), so the "uncont." column repeats the ratio over the rounds in which neither arm's
threads + other load exceeded the CPUs. An option pays when that ratio is below 0.9 in every such round and
the A/A arm (data, the default step again) stays near 1.

The last line printed is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

from fadscale.runtime.cpu_load import OtherLoad  # noqa: E402

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
ARMS = {"vanilla": {"align": {"enabled": False}},
        "fad": {"align": {"enabled": True, "target": "cached"}},
        "fad-online": {"align": {"enabled": True, "target": "noisy-online"}}}
# CPU step options: what each changes in the child process (config sections, torch settings, optimizer flags).
OPTIONS = {"default": {},
           "compile": {"model": {"compile": True}},
           "channels-last": {"model": {"channels_last": True}},
           "adamw-foreach": {"adamw": {"foreach": True}},
           "adamw-fused": {"adamw": {"fused": True}},
           "threads-1": {"threads": 1},
           "threads-2": {"threads": 2},
           "interop-1": {"interop": 1},
           "data": {"data": True}}


def random_expert(out: Path, arch: str, input_size: int, classes: list[str]) -> Path:
    """An expert card with random weights (timing and storage do not depend on them); returns the card path."""
    from fadscale import __version__
    from fadscale.core.models.expert import CARD_NAME, Expert, save_expert

    torch.manual_seed(0)
    model = Expert(arch, len(classes), 1, input_size, head="linear")
    save_expert(out, model, {"arch": arch, "head": "linear", "classes": classes, "in_chans": 1,
                             "input_size": input_size, "normalization": {"mean": [0.5], "std": [0.5]},
                             "feature_dim": model.feature_dim, "spatial_feature_dim": model.spatial_dim,
                             "val_accuracy": None, "note": "random weights (a benchmark)",
                             "fadscale_version": __version__})
    return out / CARD_NAME


def prepare(work: Path, size: int, tiles: int, expert: str, input_size: int) -> dict:
    """Shards, a random-weight expert and its pooled feature cache under `work` (reused when present)."""
    from fadscale.data.procedural import CLASS_NAMES
    from fadscale.data.shard import shard_dataset

    shards, expert_dir, cache = work / "shards", work / f"expert-{expert}-{input_size}", work / f"cache-{expert}-{input_size}"
    if not (shards / "manifest.json").is_file():
        shard_dataset(f"procedural:per_class={tiles},size={size},seed=0", shards, val_fraction=0.0, grayscale=True,
                      progress=False, overwrite=True)
    card = expert_dir / "expert.json"
    if not card.is_file():
        random_expert(expert_dir, expert, input_size, list(CLASS_NAMES))
    paths = {"shards": str(shards), "expert": str(card), "cache": str(cache)}
    if not (cache / "manifest.json").is_file():
        from fadscale.cache_features import build_cache

        build_cache(config({**paths, "arm": "fad", "preset": "cpu-tiny", "size": size, "batch": 2,
                            "precision": "fp32", "ckpt": False}, work / "setup"))
    return paths


def config(spec: dict, out: Path):
    from fadscale.config import FadConfig, build_config

    arm = ARMS[spec["arm"]]
    return build_config(FadConfig, {
        "run": {"out_dir": str(out), "seed": 0, "resume": "never"},
        "data": {"shards": spec["shards"], "image_size": spec["size"], "channels": 1, "batch_size": spec["batch"]},
        "expert": spec["expert"], "cache": {"dir": spec["cache"], "batch_size": 32},
        "model": {"preset": spec["preset"], "gradient_checkpointing": spec["ckpt"],
                  **OPTIONS[spec.get("option", "default")].get("model", {})},
        "align": arm["align"],
        "train": {"max_steps": 10_000, "mixed_precision": "bf16" if spec["precision"] == "bf16" else "no",
                  "log_every": 10_000},
        "checkpoint": {"every": 10_000},
    }, "bench_step")


def time_loader(trainer, batches: int) -> float:
    """Seconds per batch of the trainer's own loader, whole epochs (shard opening and shuffle fill included, as
    a run pays them), at least `batches` batches."""
    count, epoch, start = 0, 0, time.perf_counter()
    while count < batches:
        for _ in trainer.task.loader(epoch, 0):
            count += 1
        epoch += 1
    return (time.perf_counter() - start) / count


def measure(spec: dict) -> dict:
    """Time `Trainer.step` for one arm (run in a child process)."""
    from fadscale.runtime.distributed import set_cpu_threads
    from fadscale.train_fad import fad_trainer

    option = OPTIONS[spec.get("option", "default")]
    if "interop" in option:  # before any parallel work, or torch refuses
        torch.set_num_interop_threads(option["interop"])
    set_cpu_threads(spec["threads"])
    if "adamw" in option:  # this process only: the trainer builds torch.optim.AdamW(...) with these flags added
        torch.optim.AdamW = functools.partial(torch.optim.AdamW, **option["adamw"])
    with tempfile.TemporaryDirectory() as tmp:
        trainer = fad_trainer(config(spec, Path(tmp) / "run"))
        batches = iter(trainer.task.loader(0, 0))
        batch = next(batches)
        device = trainer.backend.device
        warm = []
        for _ in range(spec.get("warmup", 1)):  # warm-up (allocator, kernels, lazy init; torch.compile compiles)
            start = time.perf_counter()
            trainer.step(batch)
            warm.append(time.perf_counter() - start)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(spec["reps"]):
            start = time.perf_counter()
            trainer.step(batch)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        result = {**spec, "s_per_step": statistics.median(times), "times": times, "device": device.type,
                  "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
                  "warmup_s": warm}
        if option.get("data"):
            result["load_s_per_batch"] = time_loader(trainer, spec["reps"] * 2)
        if device.type == "cuda":
            from torch.utils.flop_counter import FlopCounterMode

            result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            counter = FlopCounterMode(display=False)
            with counter:
                trainer.step(batch)
            result["flops_per_step"] = float(counter.get_total_flops())
        else:
            result["peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    result["images_per_s"] = spec["batch"] / result["s_per_step"]
    return result




def run_arm(spec: dict) -> dict:
    """`measure(spec)` in a child process (clean peak memory, its own thread count). Also records the
    machine's other load while it ran (CPUs busy outside this child): on a shared machine a neighbour's burst
    can slow a 2-thread step 5-30x, and this says which arms it hit."""
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}  # OpenMP's pool matches torch's threads
    repo = str(Path(__file__).resolve().parents[1])  # this checkout's fadscale, also when not installed
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with OtherLoad(children=True) as load:
        proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True,
                              text=True, env=env)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"arm {spec['arm']} failed")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["other_load_cpus"] = load.cpus
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--preset", default="cpu-base")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batches", type=int, nargs="+", default=[16])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=None,
                        help="the arms grid (default: all; with --options: none unless given)")
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    parser.add_argument("--ckpt", nargs="+", choices=["off", "on"], default=["off"])
    parser.add_argument("--expert", default="resnet50", help="timm name of the (random-weight) expert")
    parser.add_argument("--input-size", type=int, default=224, help="the expert's input size")
    parser.add_argument("--tiles", type=int, default=4, help="procedural tiles per class in the setup shards")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per arm (default: all CPUs)")
    parser.add_argument("--work", help="setup folder, reused between runs (default: a temporary one)")
    parser.add_argument("--options", nargs="+", choices=["all", *OPTIONS], default=[],
                        help="CPU step options, each timed against the default step in the same run ('all': every one)")
    parser.add_argument("--options-arm", choices=list(ARMS), default="fad", help="the arm the options change")
    parser.add_argument("--options-precision", choices=["fp32", "bf16"], default="bf16",
                        help="the options' precision (the demo trains under bf16 autocast)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved repeats of the options set")
    parser.add_argument("--quiet", type=float, default=0.25,
                        help="slack: an arm is uncontended when its threads + other load <= CPUs + this")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arms is None:
        args.arms = [] if args.options else list(ARMS)
    options = list(OPTIONS) if "all" in args.options else ["default", *[o for o in OPTIONS if o in args.options
                                                                        and o != "default"]]
    if not args.options:
        options = []
    from fadscale.runtime.distributed import cpu_threads

    threads = args.threads or cpu_threads()
    options = [o for o in options if OPTIONS[o].get("threads") != threads]  # that one is the default step
    if args.one:
        print(json.dumps(measure(json.loads(args.one))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        paths = prepare(work, args.size, args.tiles, args.expert, args.input_size)
        results = []
        for batch in args.batches:
            for precision in args.precisions:
                for ckpt in args.ckpt:
                    for arm in args.arms:
                        spec = dict(arm=arm, preset=args.preset, size=args.size, batch=batch, precision=precision,
                                    ckpt=ckpt == "on", reps=args.reps, threads=threads, **paths)
                        result = run_arm(spec)
                        results.append(result)
                        print(f"batch {batch:3d} {precision:4s} ckpt {ckpt:3s} {arm:10s} {result['s_per_step']:8.3f} "
                              f"s/step {result['images_per_s']:8.1f} img/s  peak {result['peak_gib']:6.2f} GiB",
                              flush=True)
        option_runs = run_options(args, options, paths, threads)

    def find(arm, batch, precision, ckpt):
        return next((r for r in results if (r["arm"], r["batch"], r["precision"], r["ckpt"]) ==
                     (arm, batch, precision, ckpt)), None)

    def ratio(name, a, b):
        if a and b:
            ratios[name] = a["s_per_step"] / b["s_per_step"]

    ratios: dict[str, float] = {}
    for batch in args.batches:
        for ckpt in {c == "on" for c in args.ckpt}:
            tag = f"b{batch}/ckpt_{'on' if ckpt else 'off'}"
            for precision in args.precisions:
                ratio(f"fad_over_vanilla/{tag}/{precision}", find("fad", batch, precision, ckpt),
                      find("vanilla", batch, precision, ckpt))
                ratio(f"uncached_over_cached/{tag}/{precision}", find("fad-online", batch, precision, ckpt),
                      find("fad", batch, precision, ckpt))
            for arm in args.arms:
                ratio(f"bf16_over_fp32/{tag}/{arm}", find(arm, batch, "bf16", ckpt), find(arm, batch, "fp32", ckpt))
        for precision in args.precisions:
            for arm in args.arms:
                ratio(f"ckpt_on_over_off/b{batch}/{precision}/{arm}", find(arm, batch, precision, True),
                      find(arm, batch, precision, False))
    gpu_name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if gpu_name and k in gpu_name), None)
    if peak:
        for r in results:
            if "flops_per_step" in r:
                r["mfu"] = r["flops_per_step"] / r["s_per_step"] / (peak * 1e12)
    print()
    for key, value in ratios.items():
        print(f"{key:50s} {value:6.2f}")
    option_table = summarise_options(args, options, option_runs, threads)
    print(json.dumps({"bench": "step", "preset": args.preset, "size": args.size, "expert": args.expert,
                      "expert_input_size": args.input_size, "device": gpu_name or "cpu", "torch_threads": threads,
                      "ratios": ratios, "results": [{k: v for k, v in r.items() if k != "times"} for r in results],
                      "options": option_table}))


def run_options(args, options: list[str], paths: dict, threads: int) -> list[dict]:
    """Every option in its own process, the whole set repeated `--rounds` times, interleaved."""
    runs = []
    batch = args.batches[0]
    for round_ in range(args.rounds if options else 0):
        for option in options:
            spec = dict(arm=args.options_arm, preset=args.preset, size=args.size, batch=batch,
                        precision=args.options_precision, ckpt=args.ckpt[0] == "on", reps=args.reps,
                        threads=OPTIONS[option].get("threads", threads), option=option,
                        warmup=2 if option == "compile" else 1, **paths)  # a compiled step may recompile once
            result = run_arm(spec)
            result["round"], result["quiet"] = round_, args.quiet
            runs.append(result)
            extra = f"  load {result['load_s_per_batch']:.3f} s/batch" if "load_s_per_batch" in result else ""
            print(f"round {round_} option {option:14s} {result['s_per_step']:8.3f} s/step  warm-up "
                  f"{sum(result['warmup_s']):6.1f} s  other load {result['other_load_cpus']:.2f} CPUs{extra}",
                  flush=True)
    return runs


def contended(run: dict) -> bool:
    """Whether the machine's other load left this arm fewer CPUs than its threads (--quiet of slack)."""
    return run["threads"] + run["other_load_cpus"] > (os.cpu_count() or 1) + run["quiet"]


def summarise_options(args, options: list[str], runs: list[dict], threads: int) -> dict:
    """Per option: the median s/step over all rounds' steps; the ratio to the default step = the median of the
    per-round ratios (each against the default step of its own round); and the same ratio over the
    uncontended rounds only: those in which neither the option's process nor the round's default process had
    other load taking CPUs its threads needed (threads + other load <= CPUs + --quiet)."""
    if not runs:
        return {}

    def pick(option, round_=None):
        return [r for r in runs if r["option"] == option and round_ in (None, r["round"])]

    def median_steps(chosen):
        return statistics.median([t for r in chosen for t in r["times"]])

    rounds = sorted({r["round"] for r in runs})
    table = {}
    print(f"\nCPU step options: {args.options_arm}, {args.options_precision}, {args.preset} {args.size} px, batch "
          f"{args.batches[0]}, {threads} threads unless stated; median of {args.reps} steps per process, "
          f"{len(rounds)} interleaved rounds; {os.cpu_count()} CPUs")
    print(f"{'option':16s} {'s/step':>8s} {'ratio':>6s} {'uncont.':>7s} {'n':>2s}  per-round ratios (* contended)"
          f"{'':8s} other load (CPUs) per round   warm-up s")
    for option in options:
        per_round, clean, marks = [], [], []
        for k in rounds:
            mine, base = pick(option, k), pick("default", k)
            ratio = median_steps(mine) / median_steps(base)
            per_round.append(ratio)
            busy = any(contended(r) for r in mine + base)
            marks.append(f"{ratio:.2f}{'*' if busy else ''}")
            if not busy:
                clean.append(ratio)
        warm = statistics.median([sum(r["warmup_s"]) for r in pick(option)])
        loads = [pick(option, k)[0]["other_load_cpus"] for k in rounds]
        row = {"s_per_step": median_steps(pick(option)), "ratio": statistics.median(per_round),
               "uncontended_ratio": statistics.median(clean) if clean else None, "uncontended_rounds": len(clean),
               "per_round_ratios": per_round, "other_load_cpus": loads, "warmup_s": warm,
               "first_warmup_s": sum(pick(option, rounds[0])[0]["warmup_s"]),
               "threads": OPTIONS[option].get("threads", threads)}
        quiet_steps = [r for r in pick(option) if not contended(r)]
        row["uncontended_s_per_step"] = median_steps(quiet_steps) if quiet_steps else None
        load_batches = [r["load_s_per_batch"] for r in pick(option) if "load_s_per_batch" in r]
        if load_batches:
            step = row["uncontended_s_per_step"] or row["s_per_step"]
            load = statistics.median(load_batches)
            row.update(load_s_per_batch=load, load_share=load / (load + step))
        table[option] = row
        clean_text = f"{row['uncontended_ratio']:7.2f}" if clean else f"{'-':>7s}"
        print(f"{option:16s} {row['s_per_step']:8.3f} {row['ratio']:6.2f} {clean_text} {len(clean):2d}  "
              f"{' '.join(marks):38s} {' '.join(f'{x:.2f}' for x in loads):28s} {warm:6.1f}")
    if "data" in table:
        row = table["data"]
        print(f"data: loading a batch (workers 0, from the feature cache) {row['load_s_per_batch']:.4f} s = "
              f"{100 * row['load_share']:.1f}% of step + load. Its step ratio is "
              "an A/A check (the same step as default): how far noise alone moves a ratio")
    return table

if __name__ == "__main__":
    main()
