"""Shared fixtures: small procedural shards and a small trained expert, built once per test session.

Tests never touch the network: HF_HUB_OFFLINE is set and every model is built from a config.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "kather16-sample"


def run_module(module: str, *args: str, nproc: int = 1, launcher: str = "torchrun", timeout: int = 600,
               env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `python -m <module> args` for real: directly, or under torchrun / accelerate with nproc CPU processes."""
    if nproc == 1:
        cmd = [sys.executable, "-m", module, *args]
    elif launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", module, *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", f"--num_processes={nproc}",
               "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no", "-m", module, *args]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1" if nproc > 1 else "2", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd or REPO)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of tiny models: on a small shared CPU, two threads make them
    several times slower (OpenMP threads spin while waiting for a core)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """Procedural grayscale tiles: 8 classes x 24, 32x32, 2 train shards."""
    from fadscale.data.shard import shard_dataset

    out = tmp_path_factory.mktemp("data") / "shards"
    shard_dataset("procedural:per_class=24,size=32,seed=0", out, val_fraction=0.25, grayscale=True,
                  max_samples_per_shard=80, progress=False)
    return out


def expert_config(shards: Path, out: Path, **overrides):
    from fadscale.config import ExpertConfig, build_config, with_settings

    tree = {
        "run": {"out_dir": str(out), "seed": 0},
        "data": {"shards": str(shards), "image_size": 32, "channels": 1, "batch_size": 16, "subset": "all"},
        "model": {"arch": "test_resnet", "head": "linear", "input_size": 32},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "train": {"epochs": 2, "log_every": 1},
        "checkpoint": {"every": 1, "keep_last": 2},
    }
    return build_config(ExpertConfig, with_settings(tree, overrides))


@pytest.fixture(scope="session")
def tiny_expert(tiny_shards, tmp_path_factory) -> Path:
    """A small timm expert trained in-process on the tiny shards; returns its card path."""
    from fadscale.train_expert import train

    out = tmp_path_factory.mktemp("expert")
    train(expert_config(tiny_shards, out))
    return out / "expert.json"


def fad_config(shards: Path, expert_card: Path, out: Path, cache: Path, **overrides):
    """A CPU-sized FAD config; overrides as section__key=value."""
    from fadscale.config import FadConfig, build_config, with_settings

    tree = {
        "run": {"out_dir": str(out), "seed": 0},
        "data": {"shards": str(shards), "image_size": 32, "channels": 1, "batch_size": 4},
        "expert": str(expert_card),
        "cache": {"dir": str(cache), "batch_size": 32},
        "model": {"preset": "cpu-tiny"},
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        "train": {"max_steps": 6, "mixed_precision": "no", "ema_decay": 0.9, "log_every": 1},
        "checkpoint": {"every": 3, "keep_last": 2},
    }
    return build_config(FadConfig, with_settings(tree, overrides))


def train_fad(cfg) -> None:
    """Build the feature cache when the config needs one and it is missing (as `fadscale train` and the
    pipeline do), then train in-process."""
    from fadscale.cache_features import build_cache
    from fadscale.config import uses_cache
    from fadscale.train_fad import fad_trainer

    if uses_cache(cfg) and not (Path(cfg.cache.dir) / "manifest.json").is_file():
        build_cache(cfg)
    assert fad_trainer(cfg).run() == 0


def trained_fad_run(folder: Path, shards: Path, expert_card: Path, name: str = "run", **settings) -> Path:
    """`folder/name`: a run trained in-process with `fad_config` settings (its cache in `folder/cache`)."""
    train_fad(fad_config(shards, expert_card, folder / name, folder / "cache", **settings))
    return folder / name


@pytest.fixture(scope="session")
def tiny_fad_run(tiny_shards, tiny_expert, tmp_path_factory) -> Path:
    """A tiny FAD run trained in-process for a few steps; returns its run folder (final/ inside)."""
    root = tmp_path_factory.mktemp("fad")
    train_fad(fad_config(tiny_shards, tiny_expert, root / "run", root / "cache", train__max_steps=8))
    return root / "run"


def make_latent_run(root: Path) -> Path:
    """A hand-made latent run (classes A and B): a 4-channel UNet on 16x16 latents and a tiny RGB VAE
    decoding to 32x32 tiles of a 1-channel data set; returns its final/ folder."""
    import json

    import torch
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    from fadscale.core.models.unet import build_unet

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=32)
    vae.save_pretrained(root / "vae")
    final = root / "run" / "final"
    unet = build_unet("cpu-tiny", 4, 16)
    unet.save_pretrained(final / "unet")
    save_file({"conditioning.table": torch.randn(3, 1, unet.config.cross_attention_dim)},
              str(final / "fad_head.safetensors"))
    (final / "run_card.json").write_text(json.dumps({
        "format": "fadscale-fad-run", "step": 1, "method": "vanilla", "classes": ["A", "B"], "space": "latent",
        "channels": 4, "image_size": 32, "sample_size": 16, "null_index": 2, "vae": str(root / "vae"),
        "noise": {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "prediction_type": "epsilon"},
        "config": {"data": {"channels": 1}}}))
    return final
