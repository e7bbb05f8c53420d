"""`fadscale export`: a trained run as a diffusers pipeline folder that the tools of the field load.

    fadscale export runs/tiny/fad --out exported/fad-tiny
    fadscale export runs/kather16/vanilla --out exported/kather16 --scheduler dpm++-sde   # the real-tile sampler

    DIR/
      model_index.json        the pipeline: fadscale_pipeline.FadscalePipeline, class names, class tokens
      fadscale_pipeline.py    its code (fadscale/artifacts/hub_pipeline.py): torch, PIL and diffusers only
      unet/                   UNet2DConditionModel (safetensors; EMA weights unless --weights raw)
      scheduler/              the sampler (--scheduler; DPM-Solver++ by default) with the run's noise schedule
      vae/                    latent-space runs only
      README.md               how to load it, the classes, where it came from

`DiffusionPipeline.from_pretrained(DIR, trust_remote_code=True)` loads it anywhere diffusers runs;
`fadscale.artifacts.hub_pipeline.FadscalePipeline.from_pretrained(DIR)` loads it without running the folder's code.
"""

from __future__ import annotations

import json
from pathlib import Path

from fadscale.errors import FadscaleError
from fadscale.runtime.io import atomic_output_dir, atomic_write_text, write_checksums

PIPELINE_FILE = "fadscale_pipeline.py"
PIPELINE_CLASS = "FadscalePipeline"
INDEX = "model_index.json"


def export_run(run: str | Path, out: str | Path, weights: str = "ema", overwrite: bool = False,
               scheduler: str = "dpm++") -> Path:
    """Write the pipeline folder of a trained run (its final/ weights) to `out`, sampling with `scheduler`
    (a name of fadscale.core.sampling.SCHEDULERS); returns `out`."""
    from fadscale.artifacts import hub_pipeline
    from fadscale.artifacts.hub_pipeline import FadscalePipeline
    from fadscale.artifacts.run import image_channels, load_run
    from fadscale.core.sampling import SCHEDULERS, make_scheduler

    if weights not in ("ema", "raw"):
        raise FadscaleError(f"--weights {weights!r}: expected ema or raw")
    if scheduler not in SCHEDULERS:
        raise FadscaleError(f"--scheduler {scheduler!r}: expected one of {', '.join(SCHEDULERS)}")
    loaded = load_run(run, weights)
    if Path(out).resolve().is_relative_to(loaded.final.resolve()):
        raise FadscaleError(f"--out {out}: inside the run's final/ folder, which training replaces when the run "
                            "continues; export to a folder outside it")
    card = loaded.card
    latent = card["space"] == "latent"
    pipe = FadscalePipeline(
        unet=loaded.unet, scheduler=make_scheduler(scheduler, dict(card["noise"]), clip_sample=not latent),
        vae=loaded.vae, class_names=list(card["classes"]),
        class_tokens=loaded.table.reshape(loaded.table.shape[0], -1).tolist(),
        null_index=int(card["null_index"]), image_channels=image_channels(card),
        vae_scaling_factor=loaded.vae_scale if latent else None)
    out = Path(out)
    with atomic_output_dir(out, overwrite=overwrite, made_by=PIPELINE_FILE) as staging:
        pipe.save_pretrained(staging, safe_serialization=True)
        # diffusers names the class by its module path; a list [file, class] makes it load the class
        # from the file beside model_index.json (with trust_remote_code=True).
        index = json.loads((staging / INDEX).read_text())
        index["_class_name"] = [Path(PIPELINE_FILE).stem, PIPELINE_CLASS]
        atomic_write_text(staging / INDEX, json.dumps(index, indent=2, sort_keys=True) + "\n")
        atomic_write_text(staging / PIPELINE_FILE, Path(hub_pipeline.__file__).read_text())
        atomic_write_text(staging / "README.md", model_card(loaded, out, weights, scheduler))
        write_checksums(staging)  # last; FadscalePipeline.from_pretrained checks the files against it
    return out


def model_card(loaded, out: Path, weights: str, scheduler: str) -> str:
    card = loaded.card
    names = card["classes"]
    size = card["image_size"]
    return f"""# fadscale {card.get('method', 'run')}: class-conditional histology tiles ({size} px)

Exported by `fadscale export` from `{loaded.final}` (step {card.get('step')}, {loaded.weights} weights{
' (EMA was asked for; the run has none)' if loaded.fallback else ''}).

Classes, in the index order the UNet was trained with: {', '.join(f'{i} {n}' for i, n in enumerate(names))}.

```python
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{out}", trust_remote_code=True)  # runs fadscale_pipeline.py
tiles = pipe(["{names[0]}", "{names[-1]}"], generator=torch.Generator().manual_seed(0)).images  # PIL images
```

`trust_remote_code=True` runs `fadscale_pipeline.py` from this folder (read it first: torch, PIL and
diffusers only). With fadscale installed, `from fadscale.artifacts.hub_pipeline import FadscalePipeline;
FadscalePipeline.from_pretrained("{out}")` loads the same pipeline without running code from the folder.

The scheduler is fadscale's `{scheduler}` with the run's noise schedule (`num_inference_steps` 25 by
default). One generator per tile (`generator=[torch.Generator().manual_seed(s) for s in seeds]`) makes each
tile depend on its own seed only; at the same steps and guidance it equals the tile `fadscale sample` makes
from that seed (its manifest names each tile's seed rule). `guidance_scale > 1` applies classifier-free guidance against the null class.
"""
