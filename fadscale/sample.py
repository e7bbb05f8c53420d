"""`fadscale sample`: generate tiles per class from a trained FAD (or vanilla) run.

    python -m fadscale.sample --config configs/tiny/sample.yaml
    accelerate launch --multi_gpu --num_processes 2 -m fadscale.sample --config configs/sample.yaml

Reproducible whatever the number of ranks: every image has its own seed (from run.seed, its class,
its index and its attempt), and the images are cut, in a fixed global order (class-major), into
batches of `sample.batch_size`; batch b goes to rank b % world. So each batch holds the same images
with 1 or 8 ranks, and the PNGs are byte-identical.

The sample set `<run.out_dir>/samples/` is built in a temporary folder and renamed when complete
(`run.out_dir` itself also holds what a cluster job writes there: the sbatch script, SLURM logs):

    samples/
      manifest.json          what was sampled, from which run and weights, how, with every seed
      config.yaml            the effective config
      images/01_TUMOR/00000.png ...   8-bit L or RGB tiles, a folder per class numbered in the project's
                             class order: `torchvision.datasets.ImageFolder(samples/images)` and Hugging
                             Face `load_dataset("imagefolder", data_dir=samples/images)` give its labels
      classes.txt            the class names, one per line, in class-index order
      grids/<CLASS>.png      a grid of the first images of each class
      grid.png               one row per class
      shards/                (output.shards) the same tiles as WebDataset shards, in the shard format
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fadscale import __version__
from fadscale.artifacts import SAMPLE_MANIFEST
from fadscale.artifacts.run import LoadedRun, image_channels, load_run
from fadscale.artifacts.sample_set import CLASS_INDEX, FORMAT_VERSION, MANIFEST, SAMPLES_DIR, \
    class_dir_name, class_folder, png_bytes, read_png, write_grid
from fadscale.config import SampleConfig, build_config, save_config, with_settings
from fadscale.runtime.entry import run_entry
from fadscale.errors import FadscaleError
from fadscale.runtime.io import atomic_output_dir, atomic_write_json, git_commit
from fadscale.runtime.logging import log_line
from fadscale.core.sampling import generate, make_scheduler, to_uint8

SEED_RULE = "int.from_bytes(sha256(f'fadscale-sample:{base}:{class_index}:{index}:{attempt}')[:8], 'big') >> 1"
# DDPM and DPM-Solver++ SDE draw each step's noise from a generator of its own per image (hub_pipeline.step_seed).
STEP_NOISE_RULE = "int.from_bytes(sha256(f'ddpm-steps:{image_seed}')[:8], 'little')"
DEFAULT_STEPS = {"dpm++": 25, "dpm++-sde": 25, "ddim": 50}


# --------------------------------------------------------------------------------------------------
# Config (SampleConfig lives in fadscale.config, with every stage's config: checked before heavy imports)
# --------------------------------------------------------------------------------------------------


def sample_config(model_path: str | Path, out_dir: str | Path, **overrides) -> SampleConfig:
    """A SampleConfig from a run folder and an output folder; other settings as section__key=value."""
    tree: dict = {"run": {"out_dir": str(out_dir)}, "model": {"path": str(model_path)}}
    return build_config(SampleConfig, with_settings(tree, overrides), "sample_config")


# --------------------------------------------------------------------------------------------------
# Seeds and work split
# --------------------------------------------------------------------------------------------------


def image_seed(base: int, class_index: int, index: int, attempt: int = 0) -> int:
    """The seed of one image (< 2**63). Hashed rather than consecutive: generate() also seeds the DDPM
    step noise with seed + 1, which must not be another image's seed; and the seeds of the first N
    images of a class do not change when more images per class are asked for."""
    digest = hashlib.sha256(f"fadscale-sample:{base}:{class_index}:{index}:{attempt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def work_batches(classes: int, per_class: int, batch_size: int, rank: int, world: int) -> list[list[tuple[int, int]]]:
    """This rank's batches of (class_index, index): the global class-major order cut into batches,
    batch b on rank b % world."""
    order = [(c, j) for c in range(classes) for j in range(per_class)]
    batches = [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
    return batches[rank::world]


def _as_hwc(image: torch.Tensor) -> np.ndarray:
    array = image.cpu().numpy()
    return array[0] if array.shape[0] == 1 else np.ascontiguousarray(array.transpose(1, 2, 0))


# --------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------


class Sampler:
    """Generates images of one run: UNet in the run's space, then (latent runs) the VAE decoder."""

    def __init__(self, cfg: SampleConfig, loaded: LoadedRun, device: torch.device, dtype: torch.dtype):
        self.cfg, self.run, self.device, self.dtype = cfg, loaded, device, dtype
        card = loaded.card
        self.latent = card["space"] == "latent"
        self.out_channels = image_channels(card)
        name = cfg.sample.scheduler
        self.steps = cfg.sample.steps or DEFAULT_STEPS.get(name, int(card["noise"]["num_train_timesteps"]))
        # Latents are not images: neither the scheduler nor the loop may clip them to [-1, 1].
        self.scheduler = make_scheduler(name, dict(card["noise"]), clip_sample=not self.latent)

    @torch.no_grad()
    def images(self, labels: list[int], seeds: list[int]) -> torch.Tensor:
        """uint8 [N, C, S, S] for these labels and seeds."""
        card = self.run.card
        out = generate(self.run.unet, self.run.table, torch.tensor(labels), seeds, scheduler=self.scheduler,
                       steps=self.steps, guidance=self.cfg.sample.guidance, null_index=card["null_index"],
                       image_size=card["sample_size"], channels=card["channels"], device=self.device,
                       dtype=self.dtype, clamp=not self.latent)
        if self.latent:
            vae = self.run.vae
            out = vae.decode(out.to(self.device, next(vae.parameters()).dtype) / self.run.vae_scale).sample.float()
            out = out.clamp(-1, 1)
            if out.shape[1] != self.out_channels:
                if self.out_channels == 1:
                    weights = torch.tensor([0.299, 0.587, 0.114], device=out.device).view(1, 3, 1, 1)
                    out = (out * weights).sum(1, keepdim=True)
                else:
                    out = out.expand(-1, self.out_channels, -1, -1)
        return to_uint8(out.cpu())


def _mean_intensity(image: torch.Tensor) -> float:
    return float(image.float().mean() / 255.0)


def _generate_batch(sampler: Sampler, cfg: SampleConfig, batch: list[tuple[int, int]], folder: Path,
                    names: list[str]) -> tuple[list[dict], int]:
    """Generate, filter and write one batch; returns (records, generations). Rejected images are
    generated again (next attempt's seed) in follow-up rounds of the same batch."""
    flt = cfg.filter
    pending = [(c, j, 0) for c, j in batch]
    records, generations = [], 0
    while pending:
        seeds = [image_seed(cfg.run.seed, c, j, a) for c, j, a in pending]
        images = sampler.images([c for c, _, _ in pending], seeds)
        generations += len(pending)
        retry = []
        for (c, j, attempt), seed, image in zip(pending, seeds, images):
            mean = _mean_intensity(image)
            passed = flt.low <= mean <= flt.high
            if flt.enabled and not passed and attempt + 1 < flt.max_attempts:
                retry.append((c, j, attempt + 1))
                continue
            rel = f"{class_folder(c, names[c])}/{j:05d}.png"
            (folder / rel).write_bytes(png_bytes(_as_hwc(image)))
            records.append({"file": rel, "class": names[c], "class_index": c, "index": j, "seed": seed,
                            "attempts": attempt + 1, "mean_intensity": round(mean, 6),
                            "passed_filter": passed if flt.enabled else None})
        pending = retry
    return records, generations


def _write_grids(folder: Path, names: list[str], records: list[dict], limit: int) -> dict:
    by_class: dict[str, list[dict]] = {name: [] for name in names}
    for rec in sorted(records, key=lambda r: (r["class_index"], r["index"])):
        by_class[rec["class"]].append(rec)
    written = {}
    for name in names:
        images = [read_png(folder / rec["file"]) for rec in by_class[name][:limit]]
        rel = f"grids/{class_dir_name(name)}.png"
        write_grid(images, folder / rel)
        written[name] = rel
    per_row = min(8, min(len(v) for v in by_class.values()))
    rows = [read_png(folder / rec["file"]) for name in names for rec in by_class[name][:per_row]]
    write_grid(rows, folder / "grid.png", rows=len(names))
    return {"per_class": written, "all": "grid.png"}


def _write_shards(folder: Path, names: list[str], records: list[dict], channels: int, size: int,
                  per_shard: int, source: Path) -> str:
    """The tiles as WebDataset shards in fadscale's shard format (all in the train split), readable by
    fadscale.data.loader (e.g. to train a classifier on synthetic tiles)."""
    import json

    from fadscale.data.shard import MANIFEST as SHARD_MANIFEST, ShardWriter, shard_manifest

    out = folder / "shards"
    out.mkdir()
    writer = ShardWriter(out, "train", per_shard, 1 << 40)
    counts = {name: 0 for name in names}
    for rec in sorted(records, key=lambda r: (r["class_index"], r["index"])):
        key = f"{rec['class_index']:02d}_gen{rec['index']:07d}"
        meta = {"source": "generated", "class_name": rec["class"], "seed": rec["seed"], "file": rec["file"],
                "run": str(source)}
        writer.write(key, {"cls": str(rec["class_index"]).encode("ascii"), "png": (folder / rec["file"]).read_bytes(),
                           "json": json.dumps(meta, sort_keys=True).encode("utf-8")})
        counts[rec["class"]] += 1
    classes = [{"index": i, "name": name, "folder": class_folder(i, name)} for i, name in enumerate(names)]
    manifest = shard_manifest(source={"path": str(source), "kind": "generated", "spec": None, "root": None},
                              channels=channels, sizes={f"{size}x{size}": len(records)}, classes=classes, seed=None,
                              val_fraction=0.0, per_class={"train": counts}, shards={"train": writer.close()},
                              skipped=[])
    atomic_write_json(out / SHARD_MANIFEST, manifest)
    return "shards"


def _device_and_dtype(mixed: str, device: torch.device) -> torch.dtype:
    if mixed == "auto":
        mixed = "bf16" if device.type == "cuda" else "no"
    return torch.bfloat16 if mixed == "bf16" else torch.float32


def sample_images(cfg: SampleConfig) -> dict:
    """Generate the sample set of `cfg` (in one process, or on every rank under accelerate launch);
    returns the manifest (on every rank)."""
    from accelerate import Accelerator
    from accelerate.utils import broadcast_object_list, gather_object

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    rank, world, is_main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    device = accelerator.device
    final_dir = Path(cfg.run.out_dir) / SAMPLES_DIR
    # Every rank checks what it can, so a bad input stops all ranks alike (no rank left waiting).
    if final_dir.exists() and not cfg.run.overwrite:
        raise FadscaleError(f"{final_dir}: sample set already exists (set run.overwrite=true to replace it)")
    try:
        final_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FadscaleError(f"run.out_dir {final_dir.parent}: cannot create it ({exc.strerror})") from None
    if not os.access(final_dir.parent, os.W_OK):
        raise FadscaleError(f"run.out_dir {final_dir.parent}: not writable")
    dtype = _device_and_dtype(cfg.sample.mixed_precision, device)
    loaded = load_run(cfg.model.path, cfg.model.weights, device, dtype)
    card = loaded.card
    names = list(card["classes"])
    sampler = Sampler(cfg, loaded, device, dtype)
    if cfg.sample.guidance != 1.0 and not card.get("config", {}).get("train", {}).get("label_dropout", 1.0):
        log_line(f"warning: guidance {cfg.sample.guidance} with a run trained without label dropout: "
                 "its null token is untrained", is_main)
    if loaded.fallback:
        log_line(f"warning: {loaded.final} has no unet_ema: sampling with the raw weights (unet)", is_main)
    total = len(names) * cfg.sample.per_class
    log_line(f"sampling {total} tiles ({cfg.sample.per_class} per class) from {loaded.final} "
             f"(step {card.get('step')}, {card.get('method')}, {loaded.weights}) with {cfg.sample.scheduler} "
             f"{sampler.steps} steps, guidance {cfg.sample.guidance}, on {world} process(es) ({device.type})", is_main)

    with contextlib.ExitStack() as stack:
        folder_box = [None]
        if is_main:
            folder_box[0] = str(stack.enter_context(atomic_output_dir(final_dir, overwrite=cfg.run.overwrite, made_by=MANIFEST)))
        if world > 1:
            broadcast_object_list(folder_box)
        folder = Path(folder_box[0])
        if is_main:
            for i, name in enumerate(names):
                (folder / class_folder(i, name)).mkdir(parents=True, exist_ok=True)
            (folder / CLASS_INDEX).write_text("".join(f"{name}\n" for name in names))
        accelerator.wait_for_everyone()

        start = time.perf_counter()
        records, generations, error = [], 0, None
        try:
            mine_batches = work_batches(len(names), cfg.sample.per_class, cfg.sample.batch_size, rank, world)
            progress = tqdm(total=sum(len(b) for b in mine_batches), desc="sample", unit="tile", disable=not is_main,
                            dynamic_ncols=True)  # this rank's tiles (every rank has about as many)
            for batch in mine_batches:
                got, made = _generate_batch(sampler, cfg, batch, folder, names)
                records += got
                generations += made
                progress.update(len(batch))
            progress.close()
        except Exception as exc:  # noqa: BLE001 - reported on every rank below, so none waits forever
            error = f"rank {rank}: {type(exc).__name__}: {exc}"
        elapsed = time.perf_counter() - start
        mine = [{"rank": rank, "records": records, "generations": generations, "seconds": elapsed, "error": error}]
        ranks = gather_object(mine) if world > 1 else mine
        errors = [r["error"] for r in ranks if r["error"]]
        if errors:
            raise FadscaleError(f"sampling failed: {'; '.join(errors)}")
        everything = sorted((rec for r in ranks for rec in r["records"]), key=lambda r: (r["class_index"], r["index"]))
        manifest = _manifest(cfg, loaded, sampler, names, everything, ranks, dtype, device, world)
        if is_main:
            if len(everything) != total or len({r["file"] for r in everything}) != total:
                raise FadscaleError(f"internal error: {len(everything)} tiles written, expected {total}")
            manifest["grids"] = _write_grids(folder, names, everything, cfg.output.grid)
            if cfg.output.shards:
                manifest["shards"] = _write_shards(folder, names, everything, sampler.out_channels,
                                                   int(card["image_size"]), cfg.output.shard_samples, loaded.final)
            save_config(cfg, folder / "config.yaml")
            manifest = SAMPLE_MANIFEST.write(folder, manifest)
    accelerator.wait_for_everyone()
    log_line(f"wrote {final_dir}: {total} tiles, {manifest['timing']['s_per_image']:.3f} s/image"
             + (f", {manifest['filter']['rejected']} rejected by the filter" if cfg.filter.enabled else ""), is_main)
    return manifest


def _manifest(cfg: SampleConfig, loaded: LoadedRun, sampler: Sampler, names: list[str], records: list[dict],
              ranks: list[dict], dtype: torch.dtype, device: torch.device, world: int) -> dict:
    card = loaded.card
    images = len(records)
    generations = sum(r["generations"] for r in ranks)
    busy = sum(r["seconds"] for r in ranks)
    wall = max(r["seconds"] for r in ranks)
    rejected_per_class = {name: 0 for name in names}
    failing = 0
    for rec in records:
        rejected_per_class[rec["class"]] += rec["attempts"] - 1
        failing += rec["passed_filter"] is False
    size = int(card["image_size"])
    return {
        "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tool_version": __version__,
        "git_commit": git_commit(),
        "run": {"path": str(loaded.final.resolve()), "step": card.get("step"), "method": card.get("method"),
                "space": card["space"], "expert": card.get("expert"), "shards_manifest": card.get("shards_manifest"),
                "vae": card.get("vae")},
        "classes": names,
        "class_folders": {name: class_folder(i, name) for i, name in enumerate(names)},
        "image": {"size": size, "channels": sampler.out_channels, "mode": "L" if sampler.out_channels == 1 else "RGB"},
        "weights": {"requested": cfg.model.weights, "used": loaded.weights, "fallback": loaded.fallback},
        "sampler": {"scheduler": cfg.sample.scheduler, "steps": sampler.steps, "guidance": cfg.sample.guidance,
                    "batch_size": cfg.sample.batch_size, "dtype": str(dtype).removeprefix("torch."),
                    "device": device.type},
        "seeds": {"base": cfg.run.seed, "rule": SEED_RULE, "step_noise_rule": STEP_NOISE_RULE},
        "per_class": {name: sum(1 for r in records if r["class"] == name) for name in names},
        "count": images,
        "filter": {"enabled": cfg.filter.enabled, "low": cfg.filter.low, "high": cfg.filter.high,
                   "max_attempts": cfg.filter.max_attempts, "rejected": sum(rejected_per_class.values()),
                   "rejected_per_class": rejected_per_class, "kept_failing": failing},
        "generations": generations,
        "timing": {"wall_s": round(wall, 3), "busy_s": round(busy, 3),
                   "s_per_image": busy / max(images, 1), "images_per_s": images / max(wall, 1e-9),
                   "per_rank_s": [round(r["seconds"], 3) for r in sorted(ranks, key=lambda r: r["rank"])]},
        "world_size": world,
        "grids": None,
        "shards": None,
        "images": records,
    }


def run(cfg: SampleConfig) -> int:
    sample_images(cfg)
    if int(os.environ.get("RANK", "0")) == 0:  # the one line on stdout: where the sample set is (for scripts)
        print(Path(cfg.run.out_dir) / SAMPLES_DIR, flush=True)
    return 0


def main(argv=None) -> None:
    run_entry("sample", SampleConfig, run, argv)


if __name__ == "__main__":
    main()
