"""The FAD trainer: the fused step, gradient checkpointing equivalence, real 2-process runs, resume, bad input."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest
import torch
import yaml

from fadscale.align import FeatureTap, build_projector
from fadscale.conditioning import ClassConditioning
from fadscale.config import dump_config
from fadscale.models.unet import build_unet, probe_feature_shape
from fadscale.runtime.io import FadscaleError
from fadscale.runtime.logging import read_metrics
from fadscale.train_fad import FadModel, FadTrainer
from tests.conftest import fad_config, run_module

LAYER = "down_blocks.2.resnets.0.conv_shortcut"


def _fad_model(checkpointing: bool, projector: str = "seed") -> FadModel:
    torch.manual_seed(0)
    unet = build_unet("cpu-tiny", 1, 16)
    shape = probe_feature_shape(unet, LAYER, 1, 16)
    head = build_projector(projector, 24, shape, 16, LAYER)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    model = FadModel(unet, ClassConditioning(8, unet.config.cross_attention_dim), head, LAYER)
    return model.train()


def test_target_similarity_exposes_a_collapsed_seed_projector():
    # The seed projector learns its own target: with its weight at zero every tile's target is the bias,
    # and a UNet feature pointing the same way scores a perfect alignment that says nothing about the tile.
    head = build_projector("seed", 24, torch.Size([1, 8, 4, 4]), 16, LAYER)
    expert = torch.randn(6, 24, generator=torch.Generator().manual_seed(0))
    _, spread = head(torch.randn(6, 8, 4, 4), expert)
    assert spread["align/target_similarity"] < 0.5  # random init: distinct targets
    with torch.no_grad():
        head.proj.weight.zero_()
        head.proj.bias.copy_(torch.linspace(-1, 1, 8))
    unet_feature = head.proj.bias.view(1, 8, 1, 1).expand(6, 8, 4, 4)
    loss, collapsed = head(unet_feature, expert)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert collapsed["align/cosine"].item() == pytest.approx(1.0, abs=1e-6)
    assert collapsed["align/target_similarity"].item() == pytest.approx(1.0, abs=1e-6)
    assert "align/target_similarity" not in head(unet_feature[:1], expert[:1])[1]  # one tile: no pairs


def test_centred_seed_projector_subtracts_a_running_mean_and_has_no_bias():
    head = build_projector("seed", 4, torch.Size([1, 3, 2, 2]), 16, LAYER, center_target=True)
    assert head.proj.bias is None  # a bias is a constant target the loss could settle on
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(5, 4, generator=gen) + 3.0 for _ in range(3)]
    for batch in batches:
        head(torch.randn(5, 3, 2, 2), batch)
    torch.testing.assert_close(head.feature_mean, torch.cat(batches).mean(0))  # early on: the plain mean
    head.eval()
    head(torch.randn(5, 3, 2, 2), batches[0] + 100.0)
    torch.testing.assert_close(head.feature_mean, torch.cat(batches).mean(0))  # eval: frozen
    # What is projected is the feature minus that mean: the Linear sees centred inputs.
    unit = torch.zeros(1, 3, 2, 2)
    unit[:, 0] = 1.0
    with torch.no_grad():
        head.proj.weight.copy_(torch.eye(3, 4))
    _, diagnostics = head(unit.expand(2, -1, -1, -1), head.feature_mean.expand(2, 4) + torch.eye(2, 4))
    assert diagnostics["align/target_similarity"].item() == pytest.approx(0.0, abs=1e-6)
    assert set(head.state_dict()) == {"proj.weight", "feature_mean", "batches_seen"}


@pytest.mark.parametrize("projector", ["seed", "repa"])
def test_gradient_checkpointing_gives_same_loss_and_gradients(projector):
    gen = torch.Generator().manual_seed(1)
    noisy = torch.randn(3, 1, 16, 16, generator=gen)
    timesteps = torch.tensor([10, 500, 900])
    labels = torch.tensor([0, 3, 7])
    target = torch.randn(3, 24, generator=gen) if projector == "seed" else torch.randn(3, 24, 4, 4, generator=gen)
    results = []
    for checkpointing in (False, True):
        model = _fad_model(checkpointing, projector)
        prediction, align_loss, _ = model(noisy, timesteps, labels, None, target)
        loss = prediction.pow(2).mean() + align_loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.item(), align_loss.item(), grads))
    (loss_a, align_a, grads_a), (loss_b, align_b, grads_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    assert align_a == pytest.approx(align_b, rel=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6, msg=name)
    # The alignment loss reaches the UNet below the aligned layer (not only the projector).
    assert grads_b["unet.down_blocks.0.resnets.0.conv1.weight"].abs().sum() > 0


def test_feature_tap_keeps_the_forward_capture_only():
    layer = torch.nn.Linear(2, 2)
    tap = FeatureTap(layer)
    tap.arm()
    first = layer(torch.ones(1, 2))
    layer(torch.zeros(1, 2))  # a second firing (as during recomputation) must not replace it
    assert torch.equal(tap.pop(), first)
    with pytest.raises(RuntimeError):
        tap.pop()


def _write_config(cfg, path: Path) -> Path:
    path.write_text(dump_config(cfg))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fad", "vanilla"])
def test_two_process_run_learns_and_ranks_stay_in_sync(method, tiny_shards, tiny_expert, tmp_path):
    cfg = fad_config(tiny_shards, tiny_expert, tmp_path / "run", tmp_path / "cache",
                     align__enabled=method == "fad", train__max_steps=24, optim__lr=2e-3,
                     checkpoint__every=12, data__batch_size=8)
    config = _write_config(cfg, tmp_path / "fad.yaml")
    proc = run_module("fadscale.train_fad", "--config", str(config), nproc=2, launcher="accelerate", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    card = json.loads((tmp_path / "run/final/run_card.json").read_text())
    assert card["world_size"] == 2 and card["step"] == 24 and card["method"] == method
    assert card["ranks_in_sync"], card["rank_weight_checksums"]
    losses = [r["loss/noise"] for r in read_metrics(tmp_path / "run")]
    assert len(losses) == 24 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-6:]) / 6 < 0.8 * sum(losses[:6]) / 6, losses
    if method == "fad":
        align = [r["loss/align"] for r in read_metrics(tmp_path / "run")]
        assert sum(align[-6:]) < sum(align[:6]), align
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tmp_path / "run/final/unet_ema")
    assert unet.config.in_channels == 1


def test_resume_logs_the_same_losses_as_an_uninterrupted_run(tiny_shards, tiny_expert, tmp_path):
    # With the centred seed projector, whose running mean (a buffer, not a parameter) must resume too.
    cache = tmp_path / "cache"
    full = fad_config(tiny_shards, tiny_expert, tmp_path / "full", cache, train__max_steps=6,
                      checkpoint__every=3, train__label_dropout=0.2, align__center_target=True)
    FadTrainer(full).train()
    # A run that died after its step-3 checkpoint: only that checkpoint survives.
    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full/checkpoints/step-00000003", resumed_dir / "checkpoints/step-00000003")
    resumed = fad_config(tiny_shards, tiny_expert, resumed_dir, cache, train__max_steps=6,
                         checkpoint__every=3, train__label_dropout=0.2, align__center_target=True)
    FadTrainer(resumed).train()
    full_log = {r["step"]: r for r in read_metrics(tmp_path / "full")}
    resumed_log = {r["step"]: r for r in read_metrics(resumed_dir)}
    assert sorted(resumed_log) == [4, 5, 6]
    for step in (4, 5, 6):
        for key in ("loss/noise", "loss/align"):
            assert resumed_log[step][key] == pytest.approx(full_log[step][key], rel=1e-5), (step, key)
    a = torch.load(tmp_path / "full/checkpoints/step-00000006/lr_schedule.pt", weights_only=True)
    b = torch.load(resumed_dir / "checkpoints/step-00000006/lr_schedule.pt", weights_only=True)
    assert a["last_epoch"] == b["last_epoch"] == 6


def test_stop_request_checkpoints_and_exits_cleanly(tiny_shards, tiny_expert, tmp_path):
    cfg = fad_config(tiny_shards, tiny_expert, tmp_path / "run", tmp_path / "cache", train__max_steps=50,
                     checkpoint__every=100)
    trainer = FadTrainer(cfg)
    trainer.stop._handle(10, None)  # as if SIGUSR1 arrived during the first step
    host_handler = signal.getsignal(signal.SIGTERM)
    assert trainer.train() == 0
    assert signal.getsignal(signal.SIGTERM) is host_handler  # the trainer's handlers lived only while it ran
    steps = [p.name for p in (tmp_path / "run/checkpoints").iterdir()]
    assert steps == ["step-00000001"]
    assert not (tmp_path / "run/final").exists()
    # Resuming continues from there.
    cfg2 = fad_config(tiny_shards, tiny_expert, tmp_path / "run", tmp_path / "cache", train__max_steps=3,
                      checkpoint__every=100)
    FadTrainer(cfg2).train()
    assert json.loads((tmp_path / "run/final/run_card.json").read_text())["step"] == 3


def test_stale_cache_is_refused(tiny_shards, tiny_expert, tmp_path):
    cfg = fad_config(tiny_shards, tiny_expert, tmp_path / "run", tmp_path / "cache", train__max_steps=1)
    FadTrainer(cfg)  # builds the cache
    card = json.loads(Path(tiny_expert).read_text())
    other = tmp_path / "other-expert"
    other.mkdir()
    shutil.copy(Path(tiny_expert).parent / "expert.safetensors", other / "expert.safetensors")
    # The same architecture, but other weights: a different sha256.
    from safetensors.torch import load_file, save_file

    state = load_file(str(other / "expert.safetensors"))
    first = next(iter(state))
    state[first] = state[first] + 1
    save_file(state, str(other / "expert.safetensors"))
    from fadscale.runtime.io import sha256_file

    card["sha256"] = sha256_file(other / "expert.safetensors")
    (other / "expert.json").write_text(json.dumps(card))
    stale = fad_config(tiny_shards, other / "expert.json", tmp_path / "run2", tmp_path / "cache")
    with pytest.raises(FadscaleError, match="stale feature cache.*expert_sha256.*fadscale cache-features"):
        FadTrainer(stale)


def test_unknown_layer_lists_close_matches(tiny_shards, tiny_expert, tmp_path):
    cfg = fad_config(tiny_shards, tiny_expert, tmp_path / "run", tmp_path / "cache",
                     align__layer="down_blocks.2.resnets.0.conv_shortcutt")
    with pytest.raises(FadscaleError, match=r"align.layer .*close matches: down_blocks.2.resnets.0.conv_shortcut"):
        FadTrainer(cfg)


def test_non_finite_losses_stop_with_a_clear_error_and_keep_checkpoints(tiny_shards, tiny_expert, tmp_path):
    cfg = fad_config(tiny_shards, tiny_expert, tmp_path / "run", tmp_path / "cache", train__max_steps=4,
                     checkpoint__every=2)
    FadTrainer(cfg).train()
    before = {p: p.read_bytes() for p in (tmp_path / "run/checkpoints").rglob("*") if p.is_file()}
    # Continue the same run with a poisoned loss: every step non-finite.
    bad = fad_config(tiny_shards, tiny_expert, tmp_path / "run", tmp_path / "cache", train__max_steps=8,
                     checkpoint__every=2, align__weight=float("inf"), train__nan_tolerance=2)
    with pytest.raises(FadscaleError, match="2 non-finite losses in a row"):
        FadTrainer(bad).train()
    after = {p: p.read_bytes() for p in (tmp_path / "run/checkpoints").rglob("*") if p.is_file()}
    assert before == after


def test_unwritable_output_folder_is_refused(tiny_shards, tiny_expert, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cfg = fad_config(tiny_shards, tiny_expert, blocker / "run", tmp_path / "cache")
    with pytest.raises(FadscaleError, match="run.out_dir .*not writable"):
        FadTrainer(cfg)


def test_configs_parse_and_name_the_reference_layer():
    from fadscale.config import FadConfig, load_config

    for name in ("configs/fad.yaml", "configs/vanilla.yaml", "configs/tiny/fad.yaml", "configs/tiny/vanilla.yaml"):
        cfg = load_config(FadConfig, Path(__file__).resolve().parents[1] / name)
        assert cfg.align.layer == LAYER
        assert cfg.align.enabled == ("vanilla" not in name)
    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs/fad.yaml").read_text())
    assert raw["model"]["preset"] == "tiny-sd"


def test_latent_space_trains_on_cached_vae_latents(tiny_shards, tiny_expert, tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=32)
    vae.save_pretrained(tmp_path / "vae")
    cfg = fad_config(tiny_shards, tiny_expert, tmp_path / "run", tmp_path / "cache", model__space="latent",
                     model__vae=str(tmp_path / "vae"), train__max_steps=3)
    FadTrainer(cfg).train()
    card = json.loads((tmp_path / "run/final/run_card.json").read_text())
    assert (card["space"], card["channels"], card["sample_size"]) == ("latent", 4, 16)
    cache = json.loads((tmp_path / "cache/manifest.json").read_text())["cache"]
    assert cache["arrays"]["latent.npy"]["shape"] == [8, 8, 16, 16]  # 8 views x (mean, logvar) x 16 x 16
    assert all(torch.isfinite(torch.tensor(r["loss/noise"])) for r in read_metrics(tmp_path / "run"))
