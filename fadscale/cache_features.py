"""Precompute what the FAD step would otherwise run every step: expert features and class conditioning.

    fadscale cache-features --config configs/fad.yaml
    accelerate launch -m fadscale.cache_features --config configs/fad.yaml   (or torchrun)

For every tile of the train split and each of its 8 views (flips/rotations), the expert's pooled
feature of the *clean* tile at the expert's own input size (`pooled.npy`, fp16 [8, D]); when the repa
projector needs it, the expert's spatial map (`spatial.npy`, fp16 [8, D, h, w]); in latent space, the
VAE latent distribution (`latent.npy`, fp16 [8, 2C, h, w]: mean then log-variance). The cache shards
carry the same keys as the source shards, with the image passed through, so the trainer reads one stream.

Each rank builds its own source shards (shard i on rank i % world). A finished shard is renamed into
place and gets a `.done.json` receipt with the build's fingerprint; a re-run skips shards whose receipt
matches and rebuilds the rest. `manifest.json` is written last: a cache without it is incomplete.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from tqdm import tqdm

from fadscale import __version__
from fadscale.artifacts import CACHE_MANIFEST
from fadscale.artifacts.feature_cache import check_cache, fingerprint
from fadscale.core.conditioning import CONDITIONING_FILE, class_prompts, encode_prompts, save_table
from fadscale.config import FadConfig, needs_spatial
from fadscale.data.loader import DECODE_ERRORS, NUM_VIEWS, apply_view, check_shard, damaged, decode_image
from fadscale.data.shard import load_manifest
from fadscale.core.models.expert import expert_input, load_expert, read_card
from fadscale.core.models.vae import load_vae
from fadscale.runtime.distributed import barrier, detect_world, init_distributed
from fadscale.runtime.entry import run_entry
from fadscale.errors import FadscaleError
from fadscale.runtime.io import atomic_write_json, read_json, sha256_file
from fadscale.runtime.lock import RunLock
from fadscale.runtime.logging import log_line



@torch.no_grad()
def _encode_shard(url: str, digest: str | None, out_path: Path, expert, card: dict, cfg: FadConfig, vae, device,
                  progress: tqdm | None) -> int:
    """Write one cache shard (to a temporary name, renamed when complete), the source shard's sha256 checked
    first. Returns its sample count."""
    spatial = needs_spatial(cfg)
    tmp = out_path.with_name(f".{out_path.name}.partial")
    count = 0
    batch: list[dict] = []

    def decoded(sample: dict, channels: int, size: int) -> torch.Tensor | None:
        try:
            return decode_image(sample["png"], channels, size)
        except DECODE_ERRORS as exc:  # left out of the cache under data.on_corrupt=skip
            damaged(f"{url}: sample {sample['__key__']}", type(exc).__name__, cfg.data.on_corrupt)
            return None

    def flush(writer: wds.TarWriter) -> int:
        tiles = [decoded(s, card["in_chans"], card["input_size"]) for s in batch]
        batch[:] = [s for s, t in zip(batch, tiles) if t is not None]
        if not batch:
            return 0
        # [n, C, S, S] at the expert's input size -> [n * 8, C, S, S], views innermost.
        tiles = torch.stack([t for t in tiles if t is not None])
        views = torch.stack([apply_view(tiles, v) for v in range(NUM_VIEWS)], dim=1).flatten(0, 1).to(device)
        x = expert_input(views, card)
        if spatial:
            pooled, maps = expert.features_and_map(x, cfg.align.expert_stage)
            maps = maps.float()
        else:
            pooled, maps = expert.features(x), None
        pooled = pooled.float().view(len(batch), NUM_VIEWS, -1)
        latents = None
        if vae is not None:
            rgb = torch.stack([decode_image(s["png"], 3, cfg.data.image_size) for s in batch])
            rgb_views = torch.stack([apply_view(rgb, v) for v in range(NUM_VIEWS)], 1).flatten(0, 1).to(device)
            dist = vae.encode(rgb_views).latent_dist
            latents = torch.cat([dist.mean, dist.logvar], dim=1).float()
        for i, sample in enumerate(batch):
            record = {"__key__": sample["__key__"], "png": sample["png"], "cls": sample["cls"],
                      "pooled.npy": _npy(pooled[i])}
            if "json" in sample:
                record["json"] = sample["json"]
            if maps is not None:
                record["spatial.npy"] = _npy(maps.view(len(batch), NUM_VIEWS, *maps.shape[1:])[i])
            if latents is not None:
                record["latent.npy"] = _npy(latents.view(len(batch), NUM_VIEWS, *latents.shape[1:])[i])
            writer.write(record)
        if progress is not None:
            progress.update(len(batch))
        written = len(batch)
        batch.clear()
        return written

    check_shard(url, digest, cfg.data.on_corrupt)
    try:
        with open(tmp, "wb") as stream:
            writer = wds.TarWriter(stream)
            try:
                for sample in wds.tarfile_to_samples()([{"url": url}]):
                    batch.append(sample)
                    if len(batch) == cfg.cache.batch_size:
                        count += flush(writer)
                if batch:
                    count += flush(writer)
            finally:  # also on an error: closed before its file, not by the garbage collector after it
                writer.close()
        tmp.replace(out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a half-written shard must not keep the space a retry needs
        raise
    return count


def _npy(tensor: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, tensor.cpu().numpy().astype(np.float16), allow_pickle=False)
    return buffer.getvalue()


def build_cache(cfg: FadConfig, overwrite: bool = False, progress: bool = True) -> dict:
    """Collective over the current ranks (or a single process). Returns the cache manifest. `progress`: a
    progress bar on the main rank."""
    world = detect_world()
    device = init_distributed(world)
    out = Path(cfg.cache.dir)
    card = read_card(cfg.expert)
    source = load_manifest(cfg.data.shards)
    if [c["name"] for c in source["classes"]] != card["classes"]:
        raise FadscaleError(f"{cfg.expert}: the expert's classes {card['classes']} differ from those of "
                            f"{cfg.data.shards}")
    # One builder per cache folder: a second `fadscale train` needing the same missing cache waits for the
    # first, then finds it complete.
    lock = RunLock(out.parent, f".{out.name}.lock", guards=out, remove=True).acquire(wait=True) if world.is_main else None
    try:
        barrier()  # no rank looks at the manifest before the main rank holds the lock
        return _build_locked(cfg, card, source, world, device, overwrite, progress)
    finally:
        if lock is not None:
            lock.release()


def _build_locked(cfg: FadConfig, card: dict, source: dict, world, device, overwrite: bool, progress: bool) -> dict:
    out = Path(cfg.cache.dir)
    wanted = fingerprint(cfg, card)
    manifest_path = out / "manifest.json"
    if manifest_path.exists() and not overwrite:
        return check_cache(cfg, card)
    barrier()  # every rank has looked at the old manifest before rank 0 removes it
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        manifest_path.unlink(missing_ok=True)  # the cache is incomplete from here until the end
    barrier()

    expert, _ = load_expert(cfg.expert, device)
    vae = load_vae(cfg.model.vae, device)[0] if cfg.model.space == "latent" else None

    shards = source["splits"]["train"]["shards"]
    mine = [s for i, s in enumerate(shards) if i % world.world_size == world.rank]
    todo = []
    for shard in mine:
        receipt = out / f"{shard['name']}.done.json"
        done = read_json(receipt) if receipt.exists() and (out / shard["name"]).exists() else None
        if overwrite or done is None or done.get("fingerprint") != wanted:
            todo.append(shard)
    total = sum(s["samples"] for s in todo)
    log_line(f"caching features on rank {world.rank}: {len(todo)} of {len(mine)} shards to build "
             f"({len(shards)} in all); expert {card['arch']} on {device.type}", True)
    started = time.perf_counter()
    bar = tqdm(total=total, unit="tile", desc="cache", disable=not (world.is_main and progress), dynamic_ncols=True)
    for shard in todo:
        url = str(Path(cfg.data.shards) / shard["name"])
        samples = _encode_shard(url, shard.get("sha256"), out / shard["name"], expert, card, cfg, vae, device, bar)
        atomic_write_json(out / f"{shard['name']}.done.json", {"fingerprint": wanted, "samples": samples})
    bar.close()
    elapsed = time.perf_counter() - started

    if world.is_main and cfg.conditioning.text_encoder:
        table = encode_prompts(cfg.conditioning.text_encoder, class_prompts(card["classes"], cfg.conditioning.prompt))
        save_table(out / CONDITIONING_FILE, table)
    barrier()
    if world.is_main:
        manifest = _write_manifest(cfg, card, source, wanted, elapsed, total)
    barrier()
    return CACHE_MANIFEST.read(manifest_path) if not world.is_main else manifest


def _write_manifest(cfg: FadConfig, card: dict, source: dict, wanted: dict, elapsed: float, built: int) -> dict:
    out = Path(cfg.cache.dir)
    shards = []
    for shard in source["splits"]["train"]["shards"]:
        path = out / shard["name"]
        receipt = read_json(out / f"{shard['name']}.done.json")
        if receipt.get("fingerprint") != wanted:
            raise FadscaleError(f"{path}: shard built with other inputs; re-run with --overwrite")
        shards.append({"name": shard["name"], "samples": receipt["samples"], "bytes": path.stat().st_size,
                       "sha256": sha256_file(path)})
    count = sum(s["samples"] for s in shards)
    # Same layout as a shard manifest (the loader reads a cache like any shard folder), train split only.
    manifest = {
        **{k: v for k, v in source.items() if k not in ("splits", "skipped")},
        "splits": {"train": {**source["splits"]["train"], "shards": shards, "count": count},
                   "val": {"count": 0, "per_class": {}, "shards": []}},
        "cache": {
            "fingerprint": wanted,
            "source": str(Path(cfg.data.shards).resolve()),
            "expert": str(Path(card["_path"]).resolve()),
            "feature_dim": card["feature_dim"],
            "arrays": _array_shapes(out, shards[0]["name"]) if shards else {},
            "bytes_per_tile": sum(s["bytes"] for s in shards) / max(1, count),
            "conditioning": {"kind": "text", "file": CONDITIONING_FILE, "encoder": cfg.conditioning.text_encoder,
                             "prompts": class_prompts(card["classes"], cfg.conditioning.prompt)}
            if cfg.conditioning.text_encoder else {"kind": "learned"},
            "build_seconds": elapsed,
            "tiles_built": built,
            "tool_version": __version__,
        },
    }
    return CACHE_MANIFEST.write(out, manifest)


def _array_shapes(out: Path, shard_name: str) -> dict:
    """Shapes and dtypes of the cached arrays, read from the first sample of a shard."""
    sample = next(iter(wds.tarfile_to_samples()([{"url": str(out / shard_name)}])))
    shapes = {}
    for key, value in sample.items():
        if key.endswith(".npy"):
            array = np.load(io.BytesIO(value), allow_pickle=False)
            shapes[key] = {"shape": list(array.shape), "dtype": str(array.dtype)}
    return shapes


def run(cfg: FadConfig, overwrite: bool = False) -> int:
    manifest = build_cache(cfg, overwrite=overwrite)
    cache = manifest["cache"]
    log_line(f"feature cache {cfg.cache.dir}: {manifest['splits']['train']['count']} tiles, "
             f"{cache['bytes_per_tile'] / 1024:.1f} KiB/tile", detect_world().is_main)
    return 0


def main(argv=None) -> None:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    overwrite = "--overwrite" in argv
    if overwrite:
        argv.remove("--overwrite")
    run_entry("cache_features", FadConfig, lambda cfg: run(cfg, overwrite), argv, output=lambda cfg: cfg.cache.dir)


if __name__ == "__main__":
    main()
