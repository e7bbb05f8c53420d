"""Benchmark the training step the FAD trainer runs, side by side: vanilla, FAD with the feature cache, and
FAD without it (the expert on every noisy batch, as the reference does); fp32 and bf16; gradient
checkpointing off and on.

    python tools/bench_step.py --threads 2                                   # cpu-base, 32 px, batch 16 (CPU)
    python tools/bench_step.py --preset tiny-sd --size 64 --batches 4 --reps 3 --threads 2
    python tools/bench_step.py --preset tiny-sd --size 64 --batches 64 128   # on a GPU: images/s and MFU too

What is timed is `Trainer.step` of fadscale.training on a `FadTask` (fadscale.train_fad), the same code a
training run executes: loss from fadscale.objective, backward, clipping, AdamW, schedule, EMA. Setup (once,
in --work): procedural shards, an expert card with random weights (`--expert` at `--input-size`; the
timing does not depend on the weights) and its feature cache. Each arm runs in its own process (clean
peak memory) with the same torch thread count: one untimed warm-up step, then the median of --reps steps.

Arms:
- vanilla: align.enabled false.
- fad: the cached target (what training reads from the feature cache).
- fad-online: align.target noisy-online: the expert runs on each noisy batch (no cache).
Ratios, measured in one run: fad / vanilla (what alignment costs with the cache), fad-online / fad (what
the cache removes), bf16 / fp32 per arm (the precision change), ckpt on / off.

The last line printed is one JSON object with every number.
"""

from __future__ import annotations

import argparse
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

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
ARMS = {"vanilla": {"align": {"enabled": False}},
        "fad": {"align": {"enabled": True, "target": "cached"}},
        "fad-online": {"align": {"enabled": True, "target": "noisy-online"}}}


def random_expert(out: Path, arch: str, input_size: int, classes: list[str]) -> Path:
    """An expert card with random weights (timing and storage do not depend on them); returns the card path."""
    from fadscale import __version__
    from fadscale.models.expert import CARD_NAME, Expert, save_expert

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
        "model": {"preset": spec["preset"], "gradient_checkpointing": spec["ckpt"]},
        "align": arm["align"],
        "train": {"max_steps": 10_000, "mixed_precision": "bf16" if spec["precision"] == "bf16" else "no",
                  "log_every": 10_000},
        "checkpoint": {"every": 10_000},
    }, "bench_step")


def measure(spec: dict) -> dict:
    """Time `Trainer.step` for one arm (run in a child process)."""
    from fadscale.runtime.distributed import set_cpu_threads
    from fadscale.train_fad import fad_trainer

    set_cpu_threads(spec["threads"])
    with tempfile.TemporaryDirectory() as tmp:
        trainer = fad_trainer(config(spec, Path(tmp) / "run"))
        batches = iter(trainer.task.loader(0, 0))
        batch = next(batches)
        device = trainer.backend.device
        trainer.step(batch)  # warm-up (allocator, kernels, lazy init)
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
                  "threads": torch.get_num_threads()}
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
    """`measure(spec)` in a child process (clean peak memory, its own thread count)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
    repo = str(Path(__file__).resolve().parents[1])  # this checkout's fadscale, also when not installed
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True,
                          env=env)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"arm {spec['arm']} failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--preset", default="cpu-base")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batches", type=int, nargs="+", default=[16])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    parser.add_argument("--ckpt", nargs="+", choices=["off", "on"], default=["off"])
    parser.add_argument("--expert", default="resnet50", help="timm name of the (random-weight) expert")
    parser.add_argument("--input-size", type=int, default=224, help="the expert's input size")
    parser.add_argument("--tiles", type=int, default=4, help="procedural tiles per class in the setup shards")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per arm (default: all CPUs)")
    parser.add_argument("--work", help="setup folder, reused between runs (default: a temporary one)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(json.loads(args.one))))
        return
    from fadscale.runtime.distributed import cpu_threads

    threads = args.threads or cpu_threads()
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
    print(json.dumps({"bench": "step", "preset": args.preset, "size": args.size, "expert": args.expert,
                      "expert_input_size": args.input_size, "device": gpu_name or "cpu", "torch_threads": threads,
                      "ratios": ratios, "results": [{k: v for k, v in r.items() if k != "times"} for r in results]}))


if __name__ == "__main__":
    main()
