"""tools/diag_restore.py: real tiles noised to t and brought back by the run's own DDPM steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from PIL import Image

from fadscale.core.evaluation.inputs import load_real_tiles
from fadscale.artifacts.run import load_run

REPO = Path(__file__).resolve().parents[1]


def _tool():
    from tools import diag_restore

    return diag_restore


def test_restore_from_almost_no_noise_gives_the_tiles_back_and_from_more_noise_does_not(tiny_fad_run, tiny_shards):
    loaded = load_run(tiny_fad_run)
    classes = loaded.card["classes"]
    real = load_real_tiles(tiny_shards, classes, split="val", image_size=32, channels=1, max_per_class=2)
    clean = torch.cat([real[name] for name in classes]).float() / 127.5 - 1
    labels = torch.arange(len(classes)).repeat_interleave(2)
    tool = _tool()
    near = tool.restore(loaded, clean, labels, start=1, seed=0)
    far = tool.restore(loaded, clean, labels, start=120, seed=0)
    assert near.shape == far.shape == clean.shape
    # At t = 1 the noise std is ~0.01: even an 8-step model's correction is that small.
    assert (near - clean).abs().mean() < 0.03
    # From t = 120 (noise std ~0.2) this barely trained model cannot bring the tiles back.
    assert (far - clean).abs().mean() > 5 * (near - clean).abs().mean()
    # Seeded: the same call gives the same tiles.
    assert torch.equal(tool.restore(loaded, clean, labels, start=120, seed=0), far)


def test_the_command_prints_each_class_and_writes_the_sheet(tiny_fad_run, tiny_shards, tmp_path):
    out = tmp_path / "restore.png"
    done = subprocess.run([sys.executable, str(REPO / "tools" / "diag_restore.py"), str(tiny_fad_run),
                           "--shards", str(tiny_shards), "--per-class", "2", "--t", "1", "50", "--threads", "1",
                           "--out", str(out)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["t"] == [1, 50] and set(result["orientation"]) == set(load_run(tiny_fad_run).card["classes"])
    for name, entry in result["orientation"].items():
        assert abs(entry["t1"] - entry["original"]) < 0.05, name  # t = 1 keeps the tiles' structure
    with Image.open(out) as sheet:  # 8 classes x (originals + 2 levels) rows of 2 tiles, 3x zoom
        assert sheet.size == (2 * (96 + 6), 8 * 3 * (96 + 6))
