"""A diffusers pipeline for a fadscale run: class-conditional histology tiles in one call.

`fadscale export RUN --out DIR` writes a folder with this file in it (as `fadscale_pipeline.py`), so
diffusers can load the folder without fadscale installed:

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(DIR, trust_remote_code=True)   # runs this file's code
    tiles = pipe(["TUMOR", "ADIPOSE"], generator=torch.Generator().manual_seed(0)).images

or, with fadscale installed and without running any code from the folder:

    from fadscale.artifacts.hub_pipeline import FadscalePipeline
    pipe = FadscalePipeline.from_pretrained(DIR)

This module imports only torch, PIL and diffusers (diffusers copies it into its module cache and
refuses files that import packages it cannot find). Keep it that way.

The sampling loop is fadscale's own (`fadscale.core.sampling.generate`): the same seeds, scheduler and
guidance give the same tiles as `fadscale sample`, stochastic samplers included (tests/test_export.py checks
it pixel for pixel).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import diffusers
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

# ITU-R 601 luma: how fadscale turns an RGB VAE's output into the 1-channel tiles a grayscale run makes.
_LUMA = (0.299, 0.587, 0.114)


def draws_step_noise(scheduler) -> bool:
    """Whether `scheduler` adds fresh noise at every step (DDPM's ancestral steps, DPM-Solver++ SDE)."""
    return isinstance(scheduler, diffusers.DDPMScheduler) or (
        isinstance(scheduler, diffusers.DPMSolverMultistepScheduler)
        and scheduler.config.algorithm_type.startswith("sde"))


def step_seed(seed: int) -> int:
    """The seed of a tile's step noise, from its start-noise seed: a hash, so tile i's step noise never equals
    tile i+1's start noise. fadscale's sampler (fadscale.core.sampling) uses this same rule."""
    return int.from_bytes(hashlib.sha256(f"ddpm-steps:{seed}".encode()).digest()[:8], "little")


def denoise_step(scheduler, out, t, latents, step_generators=None, generator=None):
    """One scheduler step. With `step_generators` (one per tile, for a scheduler that draws step noise), each
    tile's step noise comes from its own generator, so a tile depends on its seed alone, whatever the batch.
    fadscale's sampler (fadscale.core.sampling) steps through this same function."""
    if step_generators and isinstance(scheduler, diffusers.DDPMScheduler):
        return torch.cat([scheduler.step(out[i:i + 1], t, latents[i:i + 1], generator=g).prev_sample
                          for i, g in enumerate(step_generators)])
    if step_generators:  # DPM-Solver++ SDE: its multistep state spans the batch, so one call with per-tile noise
        noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in step_generators])
        return scheduler.step(out, t, latents, variance_noise=noise.to(latents.device)).prev_sample
    return scheduler.step(out, t, latents, generator=generator).prev_sample


class FadscalePipeline(DiffusionPipeline):
    """Class-conditional tiles from a fadscale UNet.

    Components: `unet` (UNet2DConditionModel, with a class embedding when the run had one), `scheduler`
    (DPM-Solver++ with the run's noise schedule by default; any diffusers scheduler built from its config
    works), `vae` (latent-space runs only). Config: `class_names` (in the run's class order),
    `class_tokens` (the cross-attention token of each class, then the null token), `null_index`,
    `image_channels` (of the tiles the run was trained on) and `vae_scaling_factor`.
    """

    model_cpu_offload_seq = "unet->vae"
    _optional_components = ["vae"]

    def __init__(self, unet, scheduler, vae=None, class_names: list | None = None, class_tokens: list | None = None,
                 null_index: int | None = None, image_channels: int | None = None,
                 vae_scaling_factor: float | None = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, vae=vae)
        self.register_to_config(class_names=list(class_names or []), class_tokens=class_tokens,
                                null_index=null_index, image_channels=image_channels,
                                vae_scaling_factor=vae_scaling_factor)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, torch_dtype: torch.dtype | None = None, **kwargs):
        """Load an exported folder with diffusers' own component classes, running no code from the folder.

        (`DiffusionPipeline.from_pretrained` imports the folder's fadscale_pipeline.py whenever
        model_index.json names it, even for this class: hence a loader of its own for local folders.)
        """
        folder = Path(pretrained_model_name_or_path)
        if not (folder / "model_index.json").is_file():
            return super().from_pretrained(pretrained_model_name_or_path, torch_dtype=torch_dtype, **kwargs)
        _check_files(folder)
        index = json.loads((folder / "model_index.json").read_text())
        parts = {}
        for name in ("unet", "scheduler", "vae"):
            library, class_name = index.get(name) or (None, None)
            if class_name is None:
                continue
            if library != "diffusers":
                raise ValueError(f"{folder / 'model_index.json'}: {name} is {library}.{class_name}; expected a "
                                 f"diffusers class")
            component = getattr(diffusers, class_name)
            extra = {} if name == "scheduler" or torch_dtype is None else {"torch_dtype": torch_dtype}
            parts[name] = component.from_pretrained(folder / name, **extra)
        settings = {key: index.get(key) for key in ("class_names", "class_tokens", "null_index", "image_channels",
                                                    "vae_scaling_factor")}
        return cls(**parts, **settings)

    @property
    def labels(self) -> dict[str, int]:
        """Class name -> class index (the index the UNet was trained with)."""
        return {name: i for i, name in enumerate(self.config.class_names)}

    def get_label_ids(self, names: str | list[str]) -> list[int]:
        """Class indices for class names (case-insensitive)."""
        names = [names] if isinstance(names, str) else list(names)
        lookup = {name.upper(): i for name, i in self.labels.items()}
        missing = [n for n in names if n.upper() not in lookup]
        if missing:
            raise ValueError(f"unknown class {', '.join(map(repr, missing))}; this pipeline knows "
                             f"{', '.join(self.config.class_names)}")
        return [lookup[n.upper()] for n in names]

    def _label_tensor(self, class_labels) -> torch.Tensor:
        if isinstance(class_labels, torch.Tensor):
            items = class_labels.reshape(-1).tolist()
        else:
            items = list(class_labels) if isinstance(class_labels, (list, tuple)) else [class_labels]
        ids = []
        for item in items:
            if isinstance(item, str):
                ids += self.get_label_ids(item)
            else:
                index = int(item)
                if not 0 <= index < len(self.config.class_names):
                    raise ValueError(f"class index {index}: expected 0..{len(self.config.class_names) - 1}")
                ids.append(index)
        return torch.tensor(ids, dtype=torch.long)

    @torch.no_grad()
    def __call__(self, class_labels, guidance_scale: float = 1.0, num_inference_steps: int = 25,
                 generator: torch.Generator | list[torch.Generator] | None = None, output_type: str = "pil",
                 return_dict: bool = True):
        """Tiles for `class_labels` (class names or indices, one tile each).

        guidance_scale: classifier-free guidance against the null class (1: none; > 1 needs a run trained
        with label dropout). generator: one per tile for tiles that do not depend on the batch. With DDPM or
        DPM-Solver++ SDE, each tile's step noise comes from its generator's seed (`step_seed`), not its state:
        pass freshly seeded generators for new tiles. Other stochastic schedulers draw their step noise
        from torch's global generator.
        output_type: "pil" (8-bit images, as fadscale writes them), "np" ([N, H, W, C] floats in [0, 1]),
        "pt" ([N, C, H, W] floats in [0, 1]) or "latent".
        """
        labels = self._label_tensor(class_labels)
        device, dtype = self._execution_device, self.unet.dtype
        size, in_channels = self.unet.config.sample_size, self.unet.config.in_channels
        if isinstance(generator, list):
            if len(generator) != len(labels):
                raise ValueError(f"{len(generator)} generators for {len(labels)} tiles: give one per tile")
            # One draw per tile on its own generator, as fadscale's sampler does: a tile depends only on its seed.
            latents = torch.stack([torch.randn(in_channels, size, size, generator=g) for g in generator]).to(device)
        else:
            latents = randn_tensor((len(labels), in_channels, size, size), generator=generator, device=device)

        table = torch.tensor(self.config.class_tokens, dtype=torch.float32)  # [classes + 1, D]
        tokens = table[labels].unsqueeze(1).to(device, dtype)
        unet_labels = labels
        guided = guidance_scale != 1.0
        if guided:
            null = self.config.null_index
            tokens = torch.cat([table[null].expand(len(labels), -1).unsqueeze(1).to(device, dtype), tokens])
            unet_labels = torch.cat([torch.full_like(labels, null), labels])
        class_labels_in = unet_labels.to(device) if getattr(self.unet, "class_embedding", None) is not None else None

        # Samplers that draw fresh noise at each step draw it, per tile, from a generator seeded from that
        # tile's seed (fadscale's rule, fadscale.core.sampling): a tile depends on its seed alone, whatever
        # the batch, and matches `fadscale sample`'s tile of the same seed.
        step_generators = ([torch.Generator().manual_seed(step_seed(g.initial_seed())) for g in generator]
                           if isinstance(generator, list) and draws_step_noise(self.scheduler) else None)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = latents * self.scheduler.init_noise_sigma
        for t in self.progress_bar(self.scheduler.timesteps):
            model_in = torch.cat([latents] * 2) if guided else latents
            model_in = self.scheduler.scale_model_input(model_in, t)
            out = self.unet(model_in.to(dtype), t, tokens, class_labels=class_labels_in).sample.float()
            if guided:
                uncond, cond = out.chunk(2)
                out = uncond + guidance_scale * (cond - uncond)
            latents = denoise_step(self.scheduler, out, t, latents, step_generators,
                                   generator=None if isinstance(generator, list) else generator)
        if output_type == "latent":
            images = latents
        else:
            images = self._decode(latents)
            images = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()  # fadscale's 8-bit tiles
            if output_type == "pil":
                arrays = images.permute(0, 2, 3, 1).numpy()
                images = [Image.fromarray(a[..., 0], mode="L") if a.shape[-1] == 1 else Image.fromarray(a, mode="RGB")
                          for a in arrays]
            elif output_type == "np":
                images = images.permute(0, 2, 3, 1).float().numpy() / 255.0
            elif output_type == "pt":
                images = images.float() / 255.0
            else:
                raise ValueError(f"output_type {output_type!r}: expected pil, np, pt or latent")
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images with the run's channel count."""
        if self.vae is None:
            return latents.clamp(-1, 1)
        scale = self.config.vae_scaling_factor or self.vae.config.scaling_factor
        images = self.vae.decode(latents.to(self.vae.dtype) / scale).sample.float().clamp(-1, 1)
        wanted = self.config.image_channels or images.shape[1]
        if images.shape[1] != wanted:
            if wanted == 1:
                images = (images * torch.tensor(_LUMA, device=images.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
            else:
                images = images.expand(-1, wanted, -1, -1)
        return images


def _check_files(folder: Path) -> None:
    """Compare the folder's files with its checksums.json (written by `fadscale export`), when it has one."""
    listed = folder / "checksums.json"
    if not listed.is_file():
        return
    wrong = []
    for name, expected in sorted(json.loads(listed.read_text())["files"].items()):
        path = folder / name
        if not path.is_file():
            wrong.append(f"{name} missing")
            continue
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
        if digest.hexdigest() != expected:
            wrong.append(f"{name} damaged (checksum mismatch)")
    if wrong:
        raise ValueError(f"{folder}: {'; '.join(wrong[:3])}: export the run again")
