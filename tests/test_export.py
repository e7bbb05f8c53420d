"""`fadscale export`: a run as a diffusers pipeline folder that `DiffusionPipeline.from_pretrained` loads and
runs to the same tiles `fadscale sample` makes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from fadscale.cli import app
from fadscale.export import export_run
from fadscale.errors import FadscaleError
from fadscale.artifacts.sample_set import class_folder
from fadscale.sample import image_seed, sample_config, sample_images

from .conftest import make_latent_run

CLASSES = ["TUMOR", "STROMA", "COMPLEX", "LYMPHO", "DEBRIS", "MUCOSA", "ADIPOSE", "EMPTY"]
STEPS = 5

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def exported(tiny_fad_run, tmp_path_factory) -> Path:
    """The tiny run exported through the CLI, under the usual shared-cluster umask."""
    out = tmp_path_factory.mktemp("export") / "pipe"
    before = os.umask(0o022)
    try:
        result = CliRunner().invoke(app, ["export", str(tiny_fad_run), "--out", str(out)])
    finally:
        os.umask(before)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out)  # the path on stdout, for scripts
    return out


def test_the_folder_is_a_diffusers_pipeline_readable_by_everyone(exported):
    assert {p.name for p in exported.iterdir()} == {"model_index.json", "fadscale_pipeline.py", "unet", "scheduler",
                                                    "README.md", "checksums.json"}
    index = json.loads((exported / "model_index.json").read_text())
    assert index["_class_name"] == ["fadscale_pipeline", "FadscalePipeline"]
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["scheduler"] == ["diffusers", "DPMSolverMultistepScheduler"]
    assert index["class_names"] == CLASSES and index["null_index"] == 8 and len(index["class_tokens"]) == 9
    assert (exported / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    scheduler = json.loads((exported / "scheduler" / "scheduler_config.json").read_text())
    assert (scheduler["prediction_type"], scheduler["timestep_spacing"]) == ("v_prediction", "trailing")
    private = [str(p.relative_to(exported)) for p in exported.rglob("*")
               if p.stat().st_mode & 0o777 != (0o755 if p.is_dir() else 0o644)]
    assert private == []


def test_diffusers_loads_it_and_makes_the_tiles_fadscale_sample_makes(exported, tiny_fad_run, tmp_path):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(exported, trust_remote_code=True)
    assert type(pipe).__name__ == "FadscalePipeline" and pipe.config.class_names == CLASSES
    sample_images(sample_config(tiny_fad_run, tmp_path / "ours", sample__per_class=2, sample__scheduler="dpm++",
                                sample__steps=STEPS, run__seed=3))
    wanted = [(1, 0), (1, 1), (6, 0)]  # (class, index): two STROMA tiles and one ADIPOSE
    generators = [torch.Generator().manual_seed(image_seed(3, c, j)) for c, j in wanted]
    tiles = pipe([CLASSES[c] for c, _ in wanted], num_inference_steps=STEPS, generator=generators).images
    for (c, j), tile in zip(wanted, tiles):
        with Image.open(tmp_path / "ours" / "samples" / class_folder(c, CLASSES[c]) / f"{j:05d}.png") as ours:
            assert tile.mode == ours.mode == "L" and tile.size == (32, 32)
            assert np.array_equal(np.asarray(tile), np.asarray(ours)), (c, j)


@pytest.mark.parametrize("scheduler", ["dpm++-sde", "ddpm"])
def test_a_stochastic_sampler_exports_and_draws_the_step_noise_fadscale_sample_draws(tiny_fad_run, tmp_path, scheduler):
    from fadscale.artifacts.hub_pipeline import FadscalePipeline

    out = export_run(tiny_fad_run, tmp_path / "pipe", scheduler=scheduler)
    sample_images(sample_config(tiny_fad_run, tmp_path / "ours", sample__per_class=2, sample__scheduler=scheduler,
                                sample__steps=STEPS, run__seed=5))
    pipe = FadscalePipeline.from_pretrained(out)
    wanted = [(4, 1), (0, 0), (4, 0)]
    generators = [torch.Generator().manual_seed(image_seed(5, c, j)) for c, j in wanted]
    tiles = pipe([CLASSES[c] for c, _ in wanted], num_inference_steps=STEPS, generator=generators).images
    for (c, j), tile in zip(wanted, tiles):
        with Image.open(tmp_path / "ours" / "samples" / class_folder(c, CLASSES[c]) / f"{j:05d}.png") as ours:
            assert np.array_equal(np.asarray(tile), np.asarray(ours)), (scheduler, c, j)
    assert f"fadscale's `{scheduler}`" in (out / "README.md").read_text()
    with pytest.raises(FadscaleError, match="--scheduler 'euler': expected one of"):
        export_run(tiny_fad_run, tmp_path / "other", scheduler="euler")
    assert not (tmp_path / "other").exists()


def test_without_trust_remote_code_diffusers_refuses_and_fadscale_loads_it_without_running_its_code(exported):
    from diffusers import DiffusionPipeline

    from fadscale.artifacts.hub_pipeline import FadscalePipeline

    with pytest.raises(ValueError, match="trust_remote_code"):
        DiffusionPipeline.from_pretrained(exported)
    pipe = FadscalePipeline.from_pretrained(exported)
    assert pipe.get_label_ids(["adipose", "TUMOR"]) == [6, 0]
    with pytest.raises(ValueError, match="unknown class 'BONE'"):
        pipe(["BONE"])
    plain = pipe([0, "EMPTY"], num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np")
    assert plain.images.shape == (2, 32, 32, 1) and 0 <= plain.images.min() and plain.images.max() <= 1
    guided = pipe([0, "EMPTY"], num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np",
                  guidance_scale=3.0)
    assert not np.array_equal(plain.images, guided.images)  # guidance reaches the UNet
    # Any diffusers scheduler from the config; with DDPM's step noise a tile still depends on its generator only.
    from diffusers import DDPMScheduler

    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    pair = pipe(["TUMOR", "EMPTY"], num_inference_steps=4, output_type="np",
                generator=[torch.Generator().manual_seed(s) for s in (1, 2)]).images
    alone = pipe(["EMPTY"], num_inference_steps=4, output_type="np", generator=[torch.Generator().manual_seed(2)]).images
    assert np.array_equal(pair[1], alone[0])


def test_export_refuses_to_overwrite_and_names_a_missing_run(exported, tiny_fad_run, tmp_path):
    before = (exported / "model_index.json").read_bytes()
    with pytest.raises(FadscaleError, match="already exists"):
        export_run(tiny_fad_run, exported)
    assert (exported / "model_index.json").read_bytes() == before
    with pytest.raises(FadscaleError, match="not found"):
        export_run(tmp_path / "nothing", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    result = CliRunner().invoke(app, ["export", str(tiny_fad_run), "--out", str(tmp_path / "x"), "--weights", "best"])
    assert result.exit_code == 2 and "expected ema or raw" in result.output


def test_a_latent_run_exports_its_vae_and_decodes_to_the_runs_channels(tmp_path):
    from fadscale.artifacts.hub_pipeline import FadscalePipeline

    final = make_latent_run(tmp_path)
    out = export_run(final.parent, tmp_path / "pipe")
    assert (out / "vae" / "config.json").is_file()
    pipe = FadscalePipeline.from_pretrained(out)
    tiles = pipe(["A", "B"], num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images
    assert [(t.mode, t.size) for t in tiles] == [("L", (32, 32))] * 2
