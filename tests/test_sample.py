"""`fadscale sample`: output layout and manifest, determinism over 1 and 2 ranks, the rejection filter's
accounting, EMA vs raw weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from fadscale.config import load_config
from fadscale.errors import FadscaleError
from fadscale.sample import SampleConfig, image_seed, sample_config, sample_images, work_batches

from .conftest import make_latent_run, run_module

CLASSES = ["TUMOR", "STROMA", "COMPLEX", "LYMPHO", "DEBRIS", "MUCOSA", "ADIPOSE", "EMPTY"]
# Cheap and shared by every run below: DDIM 4 steps, batches of 3 that cut across classes.
BASE = dict(sample__scheduler="ddim", sample__steps=4, sample__batch_size=3, run__seed=5)


pytestmark = pytest.mark.usefixtures("one_torch_thread")

@pytest.fixture(scope="module")
def sample_set(tiny_fad_run, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("sample") / "fad"
    manifest = sample_images(sample_config(tiny_fad_run, out, sample__per_class=2, output__shards=True, **BASE))
    return out / "samples", manifest


def _pngs(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.glob("images/*/*.png"))}


def test_layout_and_manifest(sample_set, tiny_fad_run):
    folder, manifest = sample_set
    assert json.loads((folder / "manifest.json").read_text()) == json.loads(json.dumps(manifest))
    assert manifest["format"] == "fadscale-samples" and manifest["count"] == 16
    assert manifest["classes"] == CLASSES and manifest["per_class"] == {c: 2 for c in CLASSES}
    assert manifest["run"]["path"] == str((tiny_fad_run / "final").resolve())
    assert manifest["run"]["step"] == 8 and manifest["run"]["method"] == "fad"
    assert manifest["run"]["expert"]["sha256"]
    gpu = torch.cuda.is_available()  # mixed_precision auto: bf16 on GPU
    assert manifest["sampler"] == {"scheduler": "ddim", "steps": 4, "guidance": 1.0, "batch_size": 3,
                                   "dtype": "bfloat16" if gpu else "float32", "device": "cuda" if gpu else "cpu"}
    assert manifest["weights"] == {"requested": "ema", "used": "unet_ema", "fallback": False}
    assert manifest["filter"]["enabled"] is False and manifest["filter"]["rejected"] == 0
    assert manifest["timing"]["s_per_image"] > 0 and manifest["world_size"] == 1
    assert (folder / "config.yaml").is_file()
    files = _pngs(folder)
    assert sorted(files) == [f"images/{i + 1:02d}_{c}/{j:05d}.png" for i, c in enumerate(CLASSES) for j in range(2)]
    assert (folder / "classes.txt").read_text().split() == CLASSES
    # images/ is an ImageFolder in the project's class order: torchvision gives every tile its class index.
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(str(folder / "images"))
    assert [dataset.classes[label] for _, label in dataset.samples] == [f"{i + 1:02d}_{c}" for i, c in
                                                                         enumerate(CLASSES) for _ in range(2)]
    assert [label for _, label in dataset.samples] == [rec["class_index"] for rec in manifest["images"]]
    for rec in manifest["images"]:
        assert rec["seed"] == image_seed(5, rec["class_index"], rec["index"]) and rec["attempts"] == 1
        with Image.open(folder / rec["file"]) as img:
            assert img.mode == "L" and img.size == (32, 32)
    assert len({rec["seed"] for rec in manifest["images"]}) == 16
    with Image.open(folder / "grids" / "TUMOR.png") as grid:
        assert grid.size == (64, 32)
    with Image.open(folder / "grid.png") as grid:
        assert grid.size == (64, 8 * 32)
    # Refuses an existing sample set before doing any work.
    with pytest.raises(FadscaleError, match="already exists"):
        sample_images(sample_config(tiny_fad_run, folder.parent, sample__per_class=2, **BASE))


def test_shards_hold_the_same_tiles(sample_set):
    from fadscale.data.loader import eval_loader
    from fadscale.core.sampling import to_uint8

    folder, manifest = sample_set
    assert manifest["shards"] == "shards"
    seen = 0
    for batch in eval_loader(folder / "shards", split="train", batch_size=16, image_size=32, channels=1):
        for key, label, image in zip(batch["key"], batch["label"].tolist(), to_uint8(batch["image"])):
            c, j = int(key[:2]), int(key.split("gen")[1])
            assert label == c
            with Image.open(folder / f"images/{c + 1:02d}_{CLASSES[c]}" / f"{j:05d}.png") as img:
                assert torch.equal(torch.from_numpy(np.array(img)), image[0])
            seen += 1
    assert seen == 16


def test_work_is_split_into_the_same_batches_on_any_number_of_ranks():
    single = work_batches(8, 5, 3, rank=0, world=1)
    for world in (2, 3):
        parts = [work_batches(8, 5, 3, rank=r, world=world) for r in range(world)]
        merged = [batch for i in range(len(single)) for batch in [parts[i % world][i // world]]]
        assert merged == single
    assert sorted(item for batch in single for item in batch) == [(c, j) for c in range(8) for j in range(5)]


def test_rejection_filter_accounting(sample_set, tiny_fad_run, tmp_path):
    folder, manifest = sample_set
    means = sorted(rec["mean_intensity"] for rec in manifest["images"])
    # About half of the first attempts are rejected; the threshold sits between two tiles, so no tile's
    # mean lies on the boundary (where float rounding of a recomputed tile could flip the decision).
    low = (means[len(means) // 2 - 1] + means[len(means) // 2]) / 2
    flt = dict(filter__enabled=True, filter__low=low, filter__high=1.0, filter__max_attempts=3)
    filtered = sample_images(sample_config(tiny_fad_run, tmp_path, sample__per_class=2, **BASE, **flt))
    report = filtered["filter"]
    assert report["enabled"] is True and report["low"] == low and report["max_attempts"] == 3
    first = {(r["class_index"], r["index"]): r for r in manifest["images"]}
    before = _pngs(folder)
    after = _pngs(tmp_path / "samples")
    assert sorted(after) == sorted(before)
    for rec in filtered["images"]:
        key = (rec["class_index"], rec["index"])
        assert rec["seed"] == image_seed(5, *key, rec["attempts"] - 1)
        if first[key]["mean_intensity"] >= low:  # accepted at once: the same tile as without the filter
            assert rec["attempts"] == 1 and after[rec["file"]] == before[rec["file"]]
        else:
            assert rec["attempts"] > 1
        if rec["passed_filter"]:
            assert rec["mean_intensity"] >= low
        else:
            assert rec["attempts"] == 3
    assert report["rejected"] == sum(r["attempts"] - 1 for r in filtered["images"]) > 0
    assert report["rejected_per_class"] == {c: sum(r["attempts"] - 1 for r in filtered["images"] if r["class"] == c)
                                            for c in CLASSES}
    assert report["kept_failing"] == sum(not r["passed_filter"] for r in filtered["images"])
    assert filtered["generations"] == 16 + report["rejected"]


def test_ema_and_raw_weights(sample_set, tiny_fad_run, tmp_path):
    folder, _ = sample_set
    raw = sample_images(sample_config(tiny_fad_run, tmp_path / "raw", sample__per_class=1, model__weights="raw", **BASE))
    assert raw["weights"] == {"requested": "raw", "used": "unet", "fallback": False}
    ema_pngs, raw_pngs = _pngs(folder), _pngs(tmp_path / "raw" / "samples")
    assert sorted(raw_pngs) == [f"images/{i + 1:02d}_{c}/00000.png" for i, c in enumerate(CLASSES)]
    assert any(raw_pngs[name] != ema_pngs[name] for name in raw_pngs)  # EMA weights differ from the raw ones
    # A run without EMA weights: "ema" falls back to the raw UNet, and says so.
    final = tmp_path / "no-ema" / "final"
    final.mkdir(parents=True)
    for item in ("unet", "fad_head.safetensors", "run_card.json"):
        (final / item).symlink_to(tiny_fad_run / "final" / item)
    fallback = sample_images(sample_config(final.parent, tmp_path / "fb", sample__per_class=1, **BASE))
    assert fallback["weights"] == {"requested": "ema", "used": "unet", "fallback": True}
    assert _pngs(tmp_path / "fb" / "samples") == raw_pngs


def test_config_errors_are_one_line(tmp_path):
    bad = tmp_path / "sample.yaml"
    bad.write_text(yaml.safe_dump({"sample": {"schedular": "ddim"}}))
    with pytest.raises(FadscaleError, match="did you mean 'sample.scheduler'"):
        load_config(SampleConfig, bad)
    with pytest.raises(FadscaleError, match="filter.low"):
        load_config(SampleConfig, None, ["filter.low=0.9", "filter.high=0.1"])
    with pytest.raises(FadscaleError, match="no final/run_card.json"):
        sample_images(sample_config(tmp_path, tmp_path / "out"))


def test_latent_space_runs_decode_with_the_vae(tmp_path):
    """A hand-made latent run: a 4-channel UNet on 16x16 latents and a tiny VAE decoding to 32x32."""
    final = make_latent_run(tmp_path)
    manifest = sample_images(sample_config(final.parent, tmp_path / "out", sample__per_class=1, **BASE))
    assert manifest["weights"]["used"] == "unet" and manifest["image"] == {"size": 32, "channels": 1, "mode": "L"}
    with Image.open(tmp_path / "out" / "samples" / "images/02_B" / "00000.png") as img:
        assert img.mode == "L" and img.size == (32, 32)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 2,
                    reason="two ranks on a GPU machine need two GPUs")
def test_two_ranks_give_byte_identical_tiles(sample_set, tiny_fad_run, tmp_path):
    folder, manifest = sample_set
    config = tmp_path / "sample.yaml"
    config.write_text(yaml.safe_dump({
        "run": {"out_dir": str(tmp_path / "two"), "seed": 5},
        "model": {"path": str(tiny_fad_run)},
        "sample": {"scheduler": "ddim", "steps": 4, "batch_size": 3, "per_class": 2},
        "output": {"shards": True},
    }))
    proc = run_module("fadscale.sample", "--config", str(config), nproc=2, launcher="accelerate")
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = tmp_path / "two" / "samples"
    assert proc.stdout.strip() == str(two)  # stdout: the sample set's path, once (rank 0), for scripts
    assert "sample: 100%" in proc.stderr  # progress
    assert _pngs(two) == _pngs(folder)
    other = json.loads((two / "manifest.json").read_text())
    assert other["world_size"] == 2 and len(other["timing"]["per_rank_s"]) == 2
    assert other["images"] == manifest["images"]
    for shard in other["shards"] and json.loads((two / "shards" / "manifest.json").read_text())["splits"]["train"]["shards"]:
        assert (two / "shards" / shard["name"]).read_bytes() == (folder / "shards" / shard["name"]).read_bytes()


def test_every_run_logs_a_sample_grid_and_its_settings_to_tensorboard(tiny_fad_run):
    """TensorBoard shows what a run makes without asking (a per-class grid at the last step), and the
    hparams view pairs the settings with the run's scores."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = sorted((tiny_fad_run / "tensorboard").rglob("events.out.tfevents.*"))
    tags = {}
    for path in runs:
        events = EventAccumulator(str(path), size_guidance={"images": 0}).Reload()
        for kind, names in events.Tags().items():
            if isinstance(names, list):
                tags.setdefault(kind, set()).update(names)
        if "samples/per_class" in events.Tags()["images"]:
            grid_image = events.Images("samples/per_class")[-1]
    assert "samples/per_class" in tags.get("images", set())
    assert grid_image.step == 8 and grid_image.height == 8 * 32  # one row per class, 32 px tiles
    assert "hparam/final_noise_loss" in tags.get("scalars", set())
