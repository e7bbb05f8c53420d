"""Benchmark: the streaming WebDataset loader against the reference's decode-everything-first loader.

The reference repo reads a class-per-folder tree by decoding every file with PIL into one in-memory
numpy array before the first batch, then batches from that array. fadscale streams tar shards
(resampled, shuffled, decoded, one of 8 views per sample) through DataLoader workers. This measures,
on the same tiles, the time to the first batch and the steady throughput (tiles/s after the first
batch) of both, each run `--repeats` times (median reported), and prints them as ratios.

    python tools/bench_data.py                 # 8 x 250 procedural 64px RGB tiles (~1-2 min)
    python tools/bench_data.py --quick         # 8 x 60 tiles, a smoke run (~20 s)
    python tools/bench_data.py --data DIR      # your own class-per-folder tree (sharded into a temp dir)

A readable table, then one JSON object on the last line with every number.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fadscale.data.loader import NUM_VIEWS, apply_view, train_loader
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
    parser.add_argument("--workers", default="1,2", help="comma-separated DataLoader worker counts to measure")
    parser.add_argument("--shuffle-buffer", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="8 x 60 tiles: a smoke run")
    args = parser.parse_args(argv)
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
        results.update({f"stream_w{w}": [] for w in workers_list})
        # Interleaved, so a burst of load from other processes hits every variant alike.
        for repeat in range(args.repeats):
            results["reference"].append(reference_run(files, size=size, channels=channels,
                                                      batch_size=args.batch_size, tiles=tiles, seed=repeat))
            for w in workers_list:
                results[f"stream_w{w}"].append(stream_run(shards, size=size, channels=channels,
                                                          batch_size=args.batch_size, tiles=tiles, workers=w,
                                                          seed=repeat, shuffle_buffer=args.shuffle_buffer))

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
    for w in workers_list:
        runs = results[f"stream_w{w}"]
        first, rate = median_of(runs, "first_batch_s"), median_of(runs, "tiles_per_s")
        summary["stream"][f"workers_{w}"] = {
            "first_batch_s": first, "tiles_per_s": rate,
            "first_batch_ratio_vs_reference": first / ref_first,
            "throughput_ratio_vs_reference": rate / ref_rate,
        }
        rows.append((f"stream, {w} worker{'s' if w != 1 else ''}", first, rate, first / ref_first, rate / ref_rate))

    print(f"data: {source}: {len(files)} files ({on_disk['tree_mb']:.1f} MB; shards {on_disk['shards_mb']:.1f} MB), "
          f"model size {size}, {channels} channel(s), batch {args.batch_size}, {tiles} tiles per run, "
          f"median of {args.repeats}, {os.cpu_count()} CPUs")
    print(f"{'loader':<30} {'first batch s':>14} {'tiles/s':>10} {'first/ref':>10} {'rate/ref':>9}")
    for name, first, rate, first_ratio, rate_ratio in rows:
        print(f"{name:<30} {first:>14.3f} {rate:>10.0f} {first_ratio:>10.3f} {rate_ratio:>9.2f}")
    print(json.dumps(summary, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
