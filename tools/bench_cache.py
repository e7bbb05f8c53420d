"""Benchmark the feature cache: what building it costs, what it stores, and what it removes from each step.

    python tools/bench_cache.py --threads 2    # ResNet50 @224 build; tiny-sd step with and without the cache
    python tools/bench_cache.py --quick        # resnet18 @64 build, cpu-base step at batch 2: a smoke run
    python tools/bench_cache.py --batches 4 8  # the step part at batch 8 too
    python tools/bench_cache.py --skip-build   # only the per-step part (--skip-step: only the build)

1. Build: procedural grayscale tiles (`--tiles` per class, 8 classes, `--size` px) are sharded, all into
   the train split; a random-weight expert card is saved (`--expert` at `--input-size`); `build_cache`
   runs on them pooled-only and with spatial maps, `--repeats` times each (median). tiles/s is
   tiles_built / build_seconds from the cache manifest (the encode loop: decode, 8 views, expert forward,
   fp16 .npy, tar write; the model load is excluded, the wall time with it is reported too); bytes/tile is
   the manifest's bytes_per_tile (tile PNG + cached arrays + tar framing).
2. Per-step cost the cache removes: the trainer's real step (tools/bench_step.py, `Trainer.step` of the
   FAD task) with the cache and without it (align.target noisy-online: the expert, at 224 px, runs on every
   noisy batch, as the reference does), for each expert in `--experts` (random weights; ResNet50 and
   ViT-L/16 by default). Ratios per expert and batch: uncached / cached step time, and the share of the
   uncached step the cache removes. (The reference also runs the CLIP text tower every step; fadscale
   computes the class tokens once, in the cache, so no step of either arm has it.)

A readable table, then one JSON object on the last line with every number.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # no progress bars in the benchmark's output

import torch  # noqa: E402

import bench_step  # noqa: E402
from fadscale.artifacts import EXPERT_CARD  # noqa: E402  (the FAD step measured here is bench_step's `fad` arm; the same folder)

TEXT_TOKENS = 77


# ------------------------------------------------------------------------------------------ build


def cache_config(shards: Path, card: Path, cache: Path, spatial: bool, batch_size: int, size: int):
    from fadscale.config import FadConfig, build_config

    return build_config(FadConfig, {
        "run": {"out_dir": str(cache.parent / "run"), "seed": 0},
        "data": {"shards": str(shards), "image_size": size, "channels": 1, "batch_size": 4},
        "expert": str(card),
        "cache": {"dir": str(cache), "batch_size": batch_size, "spatial": spatial},
        "model": {"preset": "cpu-tiny"},
    })


def array_bytes(arrays: dict) -> dict:
    """Raw bytes of each cached array per tile (fp16, without the .npy header)."""
    out = {}
    for key, info in arrays.items():
        count = 1
        for dim in info["shape"]:
            count *= dim
        out[key] = count * (2 if info["dtype"] == "float16" else 4)
    return out


def bench_build(args, root: Path) -> dict:
    from fadscale import cache_features
    from fadscale.data.shard import shard_dataset

    shards = root / "shards"
    source = shard_dataset(f"procedural:per_class={args.tiles},size={args.size},seed=0", shards, val_fraction=0.0,
                           grayscale=True, progress=False)
    train = source["splits"]["train"]
    png_per_tile = sum(s["bytes"] for s in train["shards"]) / train["count"]
    classes = [c["name"] for c in source["classes"]]
    card = EXPERT_CARD.read(bench_step.random_expert(root / "expert", args.expert, args.input_size, classes))
    result = {"expert": args.expert, "input_size": args.input_size, "feature_dim": card["feature_dim"],
              "spatial_feature_dim": card["spatial_feature_dim"], "tile_size": args.size, "tiles": train["count"],
              "cache_batch_tiles": args.cache_batch, "repeats": args.repeats,
              "source_bytes_per_tile": png_per_tile, "modes": {}}
    for mode in args.modes:
        runs = []
        for repeat in range(args.repeats):
            cache = root / f"cache-{mode}-{repeat}"
            cfg = cache_config(shards, root / "expert" / "expert.json", cache, mode == "spatial", args.cache_batch,
                               args.size)
            start = time.perf_counter()
            with contextlib.redirect_stdout(sys.stderr):
                manifest = cache_features.build_cache(cfg, overwrite=True, progress=False)
            wall = time.perf_counter() - start
            meta = manifest["cache"]
            runs.append({"tiles_built": meta["tiles_built"], "build_seconds": meta["build_seconds"],
                         "wall_seconds": wall, "bytes_per_tile": meta["bytes_per_tile"], "arrays": meta["arrays"]})
            shutil.rmtree(cache, ignore_errors=True)  # spatial caches are large
            print(f"  build {mode:7s} repeat {repeat + 1}/{args.repeats}: {meta['tiles_built']} tiles in "
                  f"{meta['build_seconds']:.1f} s (wall {wall:.1f} s)", file=sys.stderr, flush=True)
        tiles_per_s = statistics.median(r["tiles_built"] / r["build_seconds"] for r in runs)
        bytes_per_tile = statistics.median(r["bytes_per_tile"] for r in runs)
        result["modes"][mode] = {
            "tiles_per_s": tiles_per_s,
            "expert_images_per_s": tiles_per_s * 8,  # 8 views per tile
            "build_seconds": statistics.median(r["build_seconds"] for r in runs),
            "wall_seconds": statistics.median(r["wall_seconds"] for r in runs),
            "bytes_per_tile": bytes_per_tile,
            "array_bytes_per_tile": array_bytes(runs[0]["arrays"]),
            "arrays": runs[0]["arrays"],
            "gib_per_100k_tiles": bytes_per_tile * 1e5 / 2**30,
            "runs": [{k: v for k, v in r.items() if k != "arrays"} for r in runs],
        }
    return result


# ------------------------------------------------------------------------------------------- step


def bench_step_cost(args) -> dict:
    """The trainer's step with the cache (`fad`) and without it (`fad-online`: the expert on every noisy
    batch), for each expert, timed by tools/bench_step.py (Trainer.step of the FAD task)."""
    from fadscale.runtime.distributed import cpu_threads

    threads = args.threads or cpu_threads()
    precision = args.step_precision
    if precision == "auto":  # the trainer's own rule: bf16 on a GPU or a CPU with native bf16, else fp32
        from fadscale.training.backend import resolve_precision

        precision = "bf16" if resolve_precision("auto") == "bf16" else "fp32"
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench_cache_step_") as tmp:
        for arch in args.experts:
            paths = bench_step.prepare(Path(tmp), args.step_size, 2, arch, 224)
            for batch in args.batches:
                arms = {}
                for arm in ("fad", "fad-online"):
                    spec = dict(arm=arm, preset=args.unet_preset, size=args.step_size, batch=batch,
                                precision=precision, ckpt=False, reps=args.reps, threads=threads, **paths)
                    arms[arm] = bench_step.run_arm(spec)
                    print(f"  step {arch} batch {batch} {arm}: {arms[arm]['s_per_step']:.3f} s", file=sys.stderr,
                          flush=True)
                cached, uncached = arms["fad"]["s_per_step"], arms["fad-online"]["s_per_step"]
                results.setdefault(str(batch), {})[arch] = {
                    "cached_s": cached, "uncached_s": uncached, "uncached_over_cached": uncached / cached,
                    "removed_share_of_uncached_step": 1 - cached / uncached}
    return {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "unet_preset": args.unet_preset, "step_size": args.step_size, "step_precision": precision,
            "experts": args.experts, "reps": args.reps, "threads": threads, "batches": results}


# ------------------------------------------------------------------------------------------- main


def print_build(build: dict) -> None:
    print(f"build: expert {build['expert']} @{build['input_size']} (random weights, feature {build['feature_dim']}, "
          f"map {build['spatial_feature_dim']} ch), {build['tiles']} tiles x 8 views, {build['tile_size']}px "
          f"grayscale, {build['cache_batch_tiles']} tiles per forward, median of {build['repeats']}")
    print(f"  {'mode':8s} {'tiles/s':>8s} {'views/s':>8s} {'encode s':>9s} {'wall s':>7s} {'bytes/tile':>11s} "
          f"{'arrays B/tile':>14s} {'GiB/100k tiles':>15s}")
    for mode, m in build["modes"].items():
        print(f"  {mode:8s} {m['tiles_per_s']:8.2f} {m['expert_images_per_s']:8.1f} {m['build_seconds']:9.1f} "
              f"{m['wall_seconds']:7.1f} {m['bytes_per_tile']:11.0f} {sum(m['array_bytes_per_tile'].values()):14d} "
              f"{m['gib_per_100k_tiles']:15.3f}")
    for mode, m in build["modes"].items():
        shapes = ", ".join(f"{k} {v['shape']} {v['dtype']}" for k, v in m["arrays"].items())
        print(f"  {mode:8s} arrays: {shapes}; the source shards hold {build['source_bytes_per_tile']:.0f} B/tile")


def print_step(step: dict) -> None:
    print(f"per-step cost the cache removes ({step['device']}; Trainer.step of the FAD task, {step['unet_preset']} "
          f"UNet at {step['step_size']}px, {step['step_precision']}, {step['threads']} threads; median of "
          f"{step['reps']} steps; uncached = align.target noisy-online: the expert @224 on each noisy batch)")
    print(f"  {'batch':>5s} {'expert':24s} {'cached s':>9s} {'uncached s':>11s} {'uncached/cached':>16s} "
          f"{'removed share':>14s}")
    for batch, per_arch in step["batches"].items():
        for arch, q in per_arch.items():
            print(f"  {batch:>5s} {arch:24s} {q['cached_s']:9.3f} {q['uncached_s']:11.3f} "
                  f"{q['uncached_over_cached']:16.2f} {q['removed_share_of_uncached_step']:13.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="resnet18 @64 build on 16 tiles, cpu-small step, batch 2 (a smoke run, ~2 min)")
    parser.add_argument("--tiles", type=int, help="tiles per class (8 classes); default 2")
    parser.add_argument("--size", type=int, default=64, help="tile size of the shards (px)")
    parser.add_argument("--expert", help="timm arch of the build's expert; default resnet50, quick resnet18")
    parser.add_argument("--input-size", type=int, help="the build expert's input size; default 224, quick 64")
    parser.add_argument("--cache-batch", type=int, default=8, help="tiles per expert forward (x8 views)")
    parser.add_argument("--repeats", type=int, help="builds per mode (median); default 1, quick 3")
    parser.add_argument("--modes", nargs="+", default=["pooled", "spatial"], choices=["pooled", "spatial"])
    parser.add_argument("--experts", nargs="+", help="timm archs of the step part (at 224, in_chans 1); default "
                        "resnet50 vit_large_patch16_224, quick resnet18")
    parser.add_argument("--unet-preset", help="default tiny-sd, quick cpu-base")
    parser.add_argument("--step-size", type=int, default=64, help="tile size of the training step (px)")
    parser.add_argument("--batches", type=int, nargs="+",
                        help="default 4 8 on a GPU, 4 on CPU (a tiny-sd step at 64px is minutes there); quick 2")
    parser.add_argument("--reps", type=int, default=3, help="timed reps per arm and batch (median)")
    parser.add_argument("--step-precision", choices=["auto", "fp32", "bf16"], default="auto",
                        help="the step's precision (auto: the trainer's rule)")
    parser.add_argument("--threads", type=int, help="torch threads (default: all CPUs)")
    parser.add_argument("--skip-build", action="store_true")
    parser.add_argument("--skip-step", action="store_true")
    parser.add_argument("--keep", help="build in this folder and keep it (default: a temporary folder)")
    args = parser.parse_args()
    q = args.quick
    args.tiles = args.tiles or 2
    args.expert = args.expert or ("resnet18" if q else "resnet50")
    args.input_size = args.input_size or (64 if q else 224)
    args.repeats = args.repeats or (3 if q else 1)
    args.unet_preset = args.unet_preset or ("cpu-base" if q else "tiny-sd")
    args.batches = args.batches or ([2] if q else [4, 8] if torch.cuda.is_available() else [4])
    args.experts = args.experts or (["resnet18"] if q else ["resnet50", "vit_large_patch16_224"])

    from fadscale.runtime.distributed import set_cpu_threads

    set_cpu_threads(args.threads)
    started = time.perf_counter()
    load_start = os.getloadavg()[0]
    summary = {"bench": "cache", "quick": q, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    build = step = None
    if not args.skip_build:
        if args.keep:
            root = Path(args.keep)
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(root / "shards", ignore_errors=True)
            build = bench_build(args, root)
        else:
            with tempfile.TemporaryDirectory(prefix="bench_cache_") as tmp:
                build = bench_build(args, Path(tmp))
    if not args.skip_step:
        step = bench_step_cost(args)

    print()
    if build:
        print_build(build)
        summary["build"] = build
    if step:
        if build:
            print()
        print_step(step)
        summary["step"] = step
    summary["load_average_1min"] = {"start": load_start, "end": os.getloadavg()[0]}
    summary["total_seconds"] = time.perf_counter() - started
    print(f"\ntotal {summary['total_seconds']:.0f} s; 1-min load average {load_start:.1f} at start, "
          f"{summary['load_average_1min']['end']:.1f} at end ({os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} threads)")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
