"""The feature cache's identity: what its values depend on (`fingerprint`), and the check that a cache on
disk is complete and fits a config (`check_cache`). `fadscale cache-features` writes caches; the trainer
and the cache builder read them through this module."""

from __future__ import annotations

from pathlib import Path

from fadscale.artifacts import CACHE_MANIFEST
from fadscale.config import FadConfig, needs_spatial
from fadscale.data.loader import NUM_VIEWS
from fadscale.errors import FadscaleError
from fadscale.runtime.io import sha256_file


def fingerprint(cfg: FadConfig, card: dict) -> dict:
    """Everything the cached values depend on; a cache with another fingerprint is stale."""
    return {
        "source_manifest_sha256": sha256_file(Path(cfg.data.shards) / "manifest.json"),
        "expert_sha256": card["sha256"],
        "views": NUM_VIEWS,
        "spatial": needs_spatial(cfg),
        "spatial_stage": cfg.align.expert_stage if needs_spatial(cfg) else None,
        "latent_vae": cfg.model.vae if cfg.model.space == "latent" else None,
        "latent_size": cfg.data.image_size if cfg.model.space == "latent" else None,
        "text_encoder": cfg.conditioning.text_encoder,
        "prompt": cfg.conditioning.prompt if cfg.conditioning.text_encoder else None,
    }


def rebuild_hint(cfg: FadConfig) -> str:
    return f"rebuild it with: fadscale cache-features --config <your config> --set cache.dir={cfg.cache.dir} --overwrite"


def check_cache(cfg: FadConfig, card: dict) -> dict:
    """The cache's manifest when it is complete and fits this config; a one-line error otherwise."""
    path = Path(cfg.cache.dir) / "manifest.json"
    if not path.is_file():
        raise FadscaleError(f"{cfg.cache.dir}: no complete feature cache (manifest.json missing); {rebuild_hint(cfg)}")
    try:
        manifest = CACHE_MANIFEST.read(path)
    except FadscaleError as exc:
        raise FadscaleError(f"{exc}; {rebuild_hint(cfg)}") from None
    built = manifest["cache"]["fingerprint"]
    wanted = fingerprint(cfg, card)
    differs = [key for key in wanted if built.get(key) != wanted[key]]
    if differs:
        what = ", ".join(f"{k} (cache: {built.get(k)!r}, config: {wanted[k]!r})" for k in differs[:2])
        raise FadscaleError(f"{cfg.cache.dir}: stale feature cache, built with other inputs: {what}; {rebuild_hint(cfg)}")
    return manifest
