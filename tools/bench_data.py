"""Benchmark: the streaming WebDataset loader against the reference's decode-everything-first loader.

The reference repo reads a class-per-folder tree by decoding every file with PIL into one in-memory
numpy array before the first batch, then batches from that array. fadscale streams tar shards
(resampled, shuffled, decoded, one of 8 views per sample) through DataLoader workers, or in the main
process, which keeps the tiles it decoded (`DECODED_TILES`) for the epochs after. This measures,
on the same tiles, the time to the first batch and the steady throughput (tiles/s after the first
batch) of both, each run `--repeats` times (median reported), and prints them as ratios.

    python tools/bench_data.py                 # 8 x 250 procedural 64px RGB tiles (~1-2 min)
    python tools/bench_data.py --quick         # 8 x 60 tiles, a smoke run (~20 s)
    python tools/bench_data.py --data DIR      # your own class-per-folder tree (sharded into a temp dir)
    python tools/bench_data.py --data DIR --image-size 32 --batch-size 16 --workers 0 \
        --train-steps 400 --expert CARD          # and training itself with the decoded-tile cache off / on

`--train-steps` trains configs/kather16/vanilla.yaml (or `--train-config`) on the same shards that many steps,
cache off and on, interleaved `--repeats` times, in this process; its config needs an expert card for its
class names (`--expert`, any expert trained on these classes).

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

import numpy as np
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the training arm builds its UNet from a config, never a download

from fadscale.data.loader import DECODED_TILES, NUM_VIEWS, apply_view, train_loader
from fadscale.data.procedural import ProceduralSpec, iter_spec
from fadscale.data.shard import load_manifest, shard_dataset

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}


def write_procedural_tree(root: Path, per_class: int, size: int, grayscale: bool) -> int:
    """Procedural tiles as PNG files in class folders (01_TUMOR/proc_000000.png, ...)."""
    count = 0
    for name, _, tile in iter_spec(ProceduralSpec(per_class=per_class, size=size, seed=0, grayscale=grayscale)):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(tile).save(path, format="PNG", compress_level=3)
        count += 1
    return count


def list_tree(root: Path) -> list[tuple[Path, int]]:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    return [(f, label) for label, folder in enumerate(folders)
            for f in sorted(folder.rglob("*")) if f.suffix.lower() in IMAGE_SUFFIXES]


# ----------------------------------------------------------------------------------- reference


def reference_run(files: list[tuple[Path, int]], *, size: int, channels: int, batch_size: int, tiles: int,
                  seed: int) -> dict:
    """Decode every file into one uint8 array (as the reference does), then batch from memory with the
    same output as the streaming loader: [-1, 1] float tensors, one random view per sample."""
    started = time.perf_counter()
    mode = "L" if channels == 1 else "RGB"
    arrays = []
    for path, _ in files:
        with Image.open(path) as img:
            img = img.convert(mode)
            if img.size != (size, size):
                img = img.resize((size, size), Image.Resampling.LANCZOS)
            arrays.append(np.asarray(img, dtype=np.uint8))
    data = np.stack(arrays)
    if channels == 1:
        data = data[..., None]
    labels = torch.tensor([label for _, label in files], dtype=torch.long)
    loaded = time.perf_counter()
    rng = np.random.default_rng(seed)
    produced, first, batches = 0, None, tiles // batch_size
    order = np.empty(0, dtype=np.int64)
    for _ in range(batches):
        if len(order) < batch_size:
            order = np.concatenate([order, rng.permutation(len(data))])
        index, order = order[:batch_size], order[batch_size:]
        images = torch.from_numpy(data[index]).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        views = rng.integers(0, NUM_VIEWS, batch_size)
        images = torch.stack([apply_view(image, int(v)) for image, v in zip(images, views)])
        _ = labels[torch.from_numpy(index)]
        produced += batch_size
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    return {"load_s": loaded - started, "first_batch_s": first - started,
            "tiles_per_s": (produced - batch_size) / max(end - first, 1e-9), "tiles": produced,
            "memory_mb": data.nbytes / 2**20}


# ----------------------------------------------------------------------------------- streaming


def stream_run(shards: Path, *, size: int, channels: int, batch_size: int, tiles: int, workers: int, seed: int,
               shuffle_buffer: int) -> dict:
    started = time.perf_counter()
    loader = train_loader(shards, batch_size=batch_size, image_size=size, channels=channels, seed=seed,
                          workers=workers, shuffle_buffer=shuffle_buffer, samples_per_epoch=tiles)
    produced, first = 0, None
    for batch in loader:
        produced += batch["image"].shape[0]
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    return {"first_batch_s": first - started, "tiles_per_s": (produced - batch_size) / max(end - first, 1e-9),
            "tiles": produced}


@contextlib.contextmanager
def decoded_tile_cache(on: bool):
    """The main process's decoded-tile cache, empty, on (its usual budget) or off (no room), for one run."""
    budget = DECODED_TILES.budget_bytes
    DECODED_TILES.clear()
    DECODED_TILES.budget_bytes = budget if on else 0
    try:
        yield DECODED_TILES
    finally:
        DECODED_TILES.budget_bytes = budget
        DECODED_TILES.clear()


def cached_stream_run(shards: Path, cache: bool, **kwargs) -> dict:
    """A main-process stream (0 workers) with the decoded-tile cache off, or on and warmed by one untimed
    pass over the same draws first, so every timed read hits: the cache's best case, which a long run on a
    small data set approaches (its first epoch misses)."""
    with decoded_tile_cache(cache):
        if cache:
            stream_run(shards, workers=0, **kwargs)
        return stream_run(shards, workers=0, **kwargs)


def train_run(shards: Path, out: Path, *, config: Path, expert: Path, steps: int, cache: bool) -> dict:
    """Train a recipe `steps` steps on the shards, the decoded-tile cache off or on (empty at the start)."""
    from fadscale.config import load_config
    from fadscale.config.schema import FadConfig
    from fadscale.train_fad import fad_trainer

    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(FadConfig, config, [f"run.out_dir={out}", f"data.shards={shards}", f"expert={expert}",
                                          f"train.max_steps={steps}", f"checkpoint.every={steps}", "run.resume=never",
                                          f"train.log_every={steps}", "eval.every=null"])
    with decoded_tile_cache(cache) as tiles:
        started = time.perf_counter()
        fad_trainer(cfg).run()
        return {"train_s": time.perf_counter() - started, "hits": tiles.hits, "misses": tiles.misses}


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="a class-per-folder tree of tiles (default: procedural tiles)")
    parser.add_argument("--per-class", type=int, default=250, help="procedural tiles per class (8 classes)")
    parser.add_argument("--size", type=int, default=64, help="procedural tile size in pixels")
    parser.add_argument("--grayscale", action="store_true", help="grayscale tiles and 1-channel tensors")
    parser.add_argument("--image-size", type=int, help="model input size (default: the tile size)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--tiles", type=int, help="tiles per measured run (default: 2x the data set)")
    parser.add_argument("--workers", default="0,1,2", help="comma-separated DataLoader worker counts to measure "
                        "(0: in the main process, with the decoded-tile cache off and on)")
    parser.add_argument("--shuffle-buffer", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="8 x 60 tiles: a smoke run")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--train-steps", type=int, help="also train this many steps, decoded-tile cache off / on")
    parser.add_argument("--train-config", type=Path, default=Path(__file__).resolve().parents[1] / "configs" /
                        "kather16" / "vanilla.yaml")
    parser.add_argument("--expert", type=Path, help="an expert card for --train-steps (its class names)")
    args = parser.parse_args(argv)
    if args.train_steps and args.expert is None:
        parser.error("--train-steps needs --expert (an expert card on these classes)")
    torch.set_num_threads(args.threads)
    if args.quick:
        args.per_class = min(args.per_class, 60)
    workers_list = [int(w) for w in args.workers.split(",") if w.strip()]
    channels = 1 if args.grayscale else 3

    with tempfile.TemporaryDirectory(prefix="fadscale-bench-") as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        if args.data is None:
            tree = tmp / "tiles"
            write_procedural_tree(tree, args.per_class, args.size, args.grayscale)
            source = f"procedural {args.per_class} x 8 at {args.size}px {'gray' if args.grayscale else 'RGB'}"
        else:
            tree = args.data
            source = str(args.data)
        files = list_tree(tree)
        if not files:
            print(f"error: no image files in class folders under {tree}", file=sys.stderr)
            return 2
        written = time.perf_counter()
        shards = tmp / "shards"
        shard_dataset(tree, shards, val_fraction=0.0, grayscale=args.grayscale, workers=min(2, os.cpu_count() or 1),
                      progress=False)
        sharded = time.perf_counter()
        manifest = load_manifest(shards)
        with Image.open(files[0][0]) as first_image:
            size = args.image_size or first_image.size[0]
        tiles = args.tiles or 2 * len(files)
        tiles = max(tiles, 2 * args.batch_size)
        on_disk = {"tree_mb": sum(f.stat().st_size for f, _ in files) / 2**20,
                   "shards_mb": sum(s["bytes"] for s in manifest["splits"]["train"]["shards"]) / 2**20}

        results: dict[str, list[dict]] = {"reference": []}
        variants = [v for w in workers_list for v in (("stream_w0_decode", "stream_w0_cached") if w == 0
                                                          else (f"stream_w{w}",))]
        results.update({v: [] for v in variants})
        # Interleaved, so a burst of load from other processes hits every variant alike.
        for repeat in range(args.repeats):
            results["reference"].append(reference_run(files, size=size, channels=channels,
                                                      batch_size=args.batch_size, tiles=tiles, seed=repeat))
            common = dict(size=size, channels=channels, batch_size=args.batch_size, tiles=tiles, seed=repeat,
                          shuffle_buffer=args.shuffle_buffer)
            for variant in variants:
                if variant.startswith("stream_w0_"):
                    run = cached_stream_run(shards, variant.endswith("cached"), **common)
                else:
                    run = stream_run(shards, workers=int(variant.removeprefix("stream_w")), **common)
                results[variant].append(run)
            if args.train_steps:
                for cache in ((False, True) if repeat % 2 == 0 else (True, False)):  # alternate who goes first
                    results.setdefault(f"train_cache_{'on' if cache else 'off'}", []).append(train_run(
                        shards, tmp / "run", config=args.train_config, expert=args.expert, steps=args.train_steps,
                        cache=cache))

    ref_first, ref_rate = median_of(results["reference"], "first_batch_s"), median_of(results["reference"], "tiles_per_s")
    summary = {
        "data": source, "files": len(files), "image_size": size, "channels": channels,
        "batch_size": args.batch_size, "tiles_per_run": tiles, "repeats": args.repeats,
        "shuffle_buffer": args.shuffle_buffer, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "prepare_s": {"write_tree": written - started, "shard": sharded - written}, **on_disk,
        "reference": {"first_batch_s": ref_first, "tiles_per_s": ref_rate,
                      "load_s": median_of(results["reference"], "load_s"),
                      "memory_mb": results["reference"][0]["memory_mb"]},
        "stream": {},
        "runs": results,
    }
    rows = [("reference (decode all, PIL)", ref_first, ref_rate, 1.0, 1.0)]
    names = {"stream_w0_decode": "stream, main process", "stream_w0_cached": "stream, main process, cache warm"}
    for variant in variants:
        runs = results[variant]
        first, rate = median_of(runs, "first_batch_s"), median_of(runs, "tiles_per_s")
        summary["stream"]["workers_" + variant.removeprefix("stream_w")] = {
            "first_batch_s": first, "tiles_per_s": rate,
            "first_batch_ratio_vs_reference": first / ref_first,
            "throughput_ratio_vs_reference": rate / ref_rate,
        }
        w = variant.removeprefix("stream_w")
        rows.append((names.get(variant, f"stream, {w} worker{'s' if w != '1' else ''}"), first, rate,
                     first / ref_first, rate / ref_rate))
    if "stream_w0_cached" in results:
        summary["stream"]["cache_throughput_ratio"] = (summary["stream"]["workers_0_cached"]["tiles_per_s"]
                                                       / summary["stream"]["workers_0_decode"]["tiles_per_s"])

    print(f"data: {source}: {len(files)} files ({on_disk['tree_mb']:.1f} MB; shards {on_disk['shards_mb']:.1f} MB), "
          f"model size {size}, {channels} channel(s), batch {args.batch_size}, {tiles} tiles per run, "
          f"median of {args.repeats}, {os.cpu_count()} CPUs")
    print(f"{'loader':<34} {'first batch s':>14} {'tiles/s':>10} {'first/ref':>10} {'rate/ref':>9}")
    for name, first, rate, first_ratio, rate_ratio in rows:
        print(f"{name:<34} {first:>14.3f} {rate:>10.0f} {first_ratio:>10.3f} {rate_ratio:>9.2f}")
    if args.train_steps:
        off, on = results["train_cache_off"], results["train_cache_on"]
        summary["train"] = {"steps": args.train_steps, "config": str(args.train_config),
                            "train_s_cache_off": median_of(off, "train_s"), "train_s_cache_on": median_of(on, "train_s"),
                            "ratios": [b["train_s"] / a["train_s"] for a, b in zip(off, on)],
                            "hit_share": statistics.median(r["hits"] / max(1, r["hits"] + r["misses"]) for r in on)}
        t = summary["train"]
        print(f"training {args.train_steps} steps ({args.train_config.name}, {args.threads} thread(s)): "
              f"{t['train_s_cache_off']:.1f} s decoding every tile, {t['train_s_cache_on']:.1f} s with the cache "
              f"(per-round ratios {' '.join(f'{r:.2f}' for r in t['ratios'])}; {100 * t['hit_share']:.0f}% of reads hit)")
    if "stream_w0_cached" in results:
        print(f"decoded-tile cache (main process): throughput {summary['stream']['cache_throughput_ratio']:.2f}x "
              "the same stream decoding every tile")
    print(json.dumps(summary, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
