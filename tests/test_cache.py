"""The feature cache: values equal a recomputation, ranks split the work exactly, interruption and staleness."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import webdataset as wds

from fadscale.artifacts.feature_cache import check_cache
from fadscale.cache_features import build_cache
from fadscale.config import dump_config
from fadscale.data.loader import apply_view, decode_image
from fadscale.data.shard import shard_urls
from fadscale.core.models.expert import expert_input, load_expert
from fadscale.errors import FadscaleError
from tests.conftest import fad_config, run_module, train_fad


def _samples(url: str) -> list[dict]:
    return list(wds.tarfile_to_samples()([{"url": url}]))


def _keys(folder, split="train") -> list[str]:
    return [s["__key__"] for url in shard_urls(folder, split) for s in _samples(url)]


@pytest.mark.parametrize("projector", ["seed", "repa"])
def test_cached_features_equal_the_expert_on_each_view(projector, tiny_shards, tiny_expert, tmp_path):
    cfg = fad_config(tiny_shards, tiny_expert, tmp_path / "run", tmp_path / "cache", align__projector=projector)
    manifest = build_cache(cfg)
    arrays = manifest["cache"]["arrays"]
    assert arrays["pooled.npy"]["shape"][0] == 8 and arrays["pooled.npy"]["dtype"] == "float16"
    assert ("spatial.npy" in arrays) == (projector == "repa")
    expert, card = load_expert(tiny_expert)
    source = {s["__key__"]: s for url in shard_urls(tiny_shards, "train") for s in _samples(url)}
    cached = _samples(shard_urls(tmp_path / "cache", "train")[0])[:5]
    for sample in cached:
        tile = decode_image(source[sample["__key__"]]["png"], card["in_chans"], card["input_size"])
        pooled = np.load(io.BytesIO(sample["pooled.npy"]), allow_pickle=False)
        assert sample["png"] == source[sample["__key__"]]["png"]  # the image is passed through untouched
        for view in range(8):
            with torch.no_grad():
                x = expert_input(apply_view(tile, view)[None], card)
                want = expert.features(x)[0]
            torch.testing.assert_close(torch.from_numpy(pooled[view]).float(), want, rtol=2e-3, atol=2e-3)
            if projector == "repa":
                spatial = np.load(io.BytesIO(sample["spatial.npy"]), allow_pickle=False)
                with torch.no_grad():
                    want_map = expert.spatial_features(x)[0]
                torch.testing.assert_close(torch.from_numpy(spatial[view]).float(), want_map, rtol=2e-3, atol=2e-3)


def test_repa_cache_of_an_expert_stage_holds_that_stages_map_and_trains(tiny_shards, tiny_expert, tmp_path):
    """align.expert_stage: the map of an inner stage (finer than the last, without resizing the tile), named in
    the cache's fingerprint; the repa projector is sized to its channels."""
    expert, card = load_expert(tiny_expert)
    cfg = fad_config(tiny_shards, tiny_expert, tmp_path / "run", tmp_path / "cache", align__projector="repa",
                     align__expert_stage=2, train__max_steps=2)
    arrays = build_cache(cfg)["cache"]["arrays"]
    source = {s["__key__"]: s for url in shard_urls(tiny_shards, "train") for s in _samples(url)}
    sample = _samples(shard_urls(tmp_path / "cache", "train")[0])[0]
    tile = decode_image(source[sample["__key__"]]["png"], card["in_chans"], card["input_size"])
    with torch.no_grad():
        _, (maps,) = expert.backbone.forward_intermediates(expert_input(tile[None], card), indices=[2],
                                                           intermediates_only=False)
    spatial = np.load(io.BytesIO(sample["spatial.npy"]), allow_pickle=False)
    assert list(spatial.shape[1:]) == list(maps.shape[1:]) and maps.shape[-1] > 1  # a real grid, not 1x1
    torch.testing.assert_close(torch.from_numpy(spatial[0]).float(), maps[0], rtol=2e-3, atol=2e-3)
    last = fad_config(tiny_shards, tiny_expert, tmp_path / "run", tmp_path / "cache", align__projector="repa")
    with pytest.raises(FadscaleError, match="stale feature cache.*spatial_stage"):
        check_cache(last, card)
    train_fad(cfg)
    head = safe_open_keys(tmp_path / "run" / "final" / "fad_head.safetensors")
    assert head["projector.mlp.4.weight"][0] == arrays["spatial.npy"]["shape"][1]
    with pytest.raises(FadscaleError, match="align.expert_stage 9"):
        expert.features_and_map(torch.zeros(1, card["in_chans"], 32, 32), stage=9)


def safe_open_keys(path) -> dict[str, list[int]]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {key: list(f.get_slice(key).get_shape()) for key in f.keys()}


@pytest.mark.slow
def test_two_ranks_write_every_key_exactly_once(tiny_shards, tiny_expert, tmp_path):
    assert len(shard_urls(tiny_shards, "train")) >= 2
    cfg = fad_config(tiny_shards, tiny_expert, tmp_path / "run", tmp_path / "cache")
    config = tmp_path / "fad.yaml"
    config.write_text(dump_config(cfg))
    proc = run_module("fadscale.cache_features", "--config", str(config), nproc=2, launcher="torchrun")
    assert proc.returncode == 0, proc.stderr[-3000:]
    keys = _keys(tmp_path / "cache")
    assert len(keys) == len(set(keys))
    assert sorted(keys) == sorted(_keys(tiny_shards))
    assert "caching features on rank 1" in proc.stderr


def test_interrupted_build_resumes_and_keeps_finished_shards(tiny_shards, tiny_expert, tmp_path):
    cfg = fad_config(tiny_shards, tiny_expert, tmp_path / "run", tmp_path / "cache")
    build_cache(cfg)
    cache = tmp_path / "cache"
    names = sorted(p.name for p in cache.glob("train-*.tar"))
    kept, lost = names[0], names[1]
    kept_mtime = (cache / kept).stat().st_mtime_ns
    # Interrupted: no manifest yet, the second shard never finished (a partial file is all that is left).
    (cache / "manifest.json").unlink()
    (cache / lost).rename(cache / f".{lost}.partial")
    (cache / f"{lost}.done.json").unlink()
    with pytest.raises(FadscaleError, match="no complete feature cache"):
        check_cache(cfg, json.loads(tiny_expert.read_text()))
    manifest = build_cache(cfg)
    assert (cache / kept).stat().st_mtime_ns == kept_mtime
    assert (cache / lost).exists()
    assert manifest["splits"]["train"]["count"] == len(_keys(tiny_shards))
    assert manifest["cache"]["tiles_built"] == sum(1 for _ in _samples(str(cache / lost)))


def test_cache_of_other_shards_is_stale(tiny_shards, tiny_expert, tmp_path):
    from fadscale.data.shard import shard_dataset

    cfg = fad_config(tiny_shards, tiny_expert, tmp_path / "run", tmp_path / "cache")
    build_cache(cfg)
    other = tmp_path / "other-shards"
    shard_dataset("procedural:per_class=24,size=32,seed=1", other, val_fraction=0.25, grayscale=True,
                  max_samples_per_shard=80, progress=False)
    moved = fad_config(other, tiny_expert, tmp_path / "run", tmp_path / "cache")
    with pytest.raises(FadscaleError, match="stale feature cache.*source_manifest_sha256"):
        check_cache(moved, json.loads(tiny_expert.read_text()))


def _tiny_clip(folder) -> str:
    """A 1-layer CLIP text encoder (width 32, the cpu-tiny UNet's cross-attention width) and a
    character-level tokenizer, written as a local folder like a real CLIP download."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder.mkdir()
    chars = sorted({chr(c) for c in range(33, 127)})
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16).save_pretrained(folder)
    torch.manual_seed(0)
    end = vocab["<|endoftext|>"]
    CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=16, eos_token_id=end,
                                 bos_token_id=vocab["<|startoftext|>"], pad_token_id=end)).save_pretrained(folder)
    return str(folder)


def test_text_conditioning_is_computed_once_and_frozen(tiny_shards, tiny_expert, tmp_path):
    from fadscale.core.conditioning import CONDITIONING_FILE, class_prompts, encode_prompts, load_table
    from fadscale.train_fad import fad_trainer

    encoder = _tiny_clip(tmp_path / "clip")
    cfg = fad_config(tiny_shards, tiny_expert, tmp_path / "run", tmp_path / "cache",
                     conditioning__text_encoder=encoder, train__max_steps=2)
    manifest = build_cache(cfg)
    classes = json.loads(tiny_expert.read_text())["classes"]
    assert manifest["cache"]["conditioning"]["prompts"][0] == "a histological image of tumor tissue"
    table = load_table(tmp_path / "cache" / CONDITIONING_FILE)
    assert table.shape == (len(classes) + 1, 1, 32)  # one token per class, then the null (empty prompt)
    torch.testing.assert_close(table, encode_prompts(encoder, class_prompts(classes, cfg.conditioning.prompt)))
    trainer = fad_trainer(cfg)
    trainer.run()
    model = trainer.backend.unwrap(trainer.model)
    assert "table" not in dict(model.conditioning.named_parameters())  # a frozen buffer, not trained
    torch.testing.assert_close(model.conditioning.table, table)
