"""The FAD trainer: the fused step, gradient checkpointing equivalence, real 2-process runs, resume, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from fadscale.core.align import FeatureTap, build_projector
from fadscale.core.conditioning import ClassConditioning
from fadscale.config import dump_config
from fadscale.core.models.unet import build_unet, probe_feature_shape
from fadscale.errors import FadscaleError
from fadscale.runtime.logging import read_metrics
from fadscale.core.fad import FadModel
from fadscale.train_fad import fad_trainer
from tests.conftest import fad_config, run_module, train_fad, trained_fad_run

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
    # `fadscale train --nproc 2`: the feature cache first when the run needs one (2 processes), then
    # `accelerate launch -m fadscale.train_fad` with 2 CPU processes.
    proc = run_module("fadscale.cli", "train", "--config", str(config), "--nproc", "2", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ("missing: building it first" in proc.stderr) == (method == "fad")
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


@pytest.mark.parametrize("optimizer", ["adamw", "stableadamw"])
def test_resume_logs_the_same_losses_as_an_uninterrupted_run(tiny_shards, tiny_expert, tmp_path, optimizer):
    # With the centred seed projector, whose running mean (a buffer, not a parameter) must resume too.
    cache = tmp_path / "cache"
    settings = dict(train__max_steps=6, checkpoint__every=3, train__label_dropout=0.2, align__center_target=True,
                    optim__name=optimizer)
    train_fad(fad_config(tiny_shards, tiny_expert, tmp_path / "full", cache, **settings))
    # A run killed after logging step 5: only its step-3 checkpoint and its log of steps 1-5 survive.
    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full/checkpoints/step-00000003", resumed_dir / "checkpoints/step-00000003")
    lines = (tmp_path / "full/metrics.jsonl").read_text().splitlines()
    (resumed_dir / "metrics.jsonl").write_text("".join(f"{line}\n" for line in lines if json.loads(line)["step"] <= 5))
    train_fad(fad_config(tiny_shards, tiny_expert, resumed_dir, cache, **settings))
    full_log = {r["step"]: r for r in read_metrics(tmp_path / "full")}
    resumed_records = read_metrics(resumed_dir)
    assert [r["step"] for r in resumed_records] == [1, 2, 3, 4, 5, 6]  # steps 4 and 5 logged once, by the resume
    resumed_log = {r["step"]: r for r in resumed_records}
    for step in (4, 5, 6):
        for key in ("loss/noise", "loss/align"):
            assert resumed_log[step][key] == pytest.approx(full_log[step][key], rel=1e-5), (step, key)
    # The whole final state: schedule, raw and EMA weights, the FAD head.
    a = torch.load(tmp_path / "full/checkpoints/step-00000006/schedule.pt", weights_only=True)
    b = torch.load(resumed_dir / "checkpoints/step-00000006/schedule.pt", weights_only=True)
    assert a["last_epoch"] == b["last_epoch"] == 6
    from safetensors.torch import load_file

    for name in ("unet/diffusion_pytorch_model.safetensors", "unet_ema/diffusion_pytorch_model.safetensors",
                 "fad_head.safetensors"):
        full, resumed = load_file(str(tmp_path / "full/final" / name)), load_file(str(resumed_dir / "final" / name))
        assert full.keys() == resumed.keys()
        for key in full:
            torch.testing.assert_close(resumed[key], full[key], rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")


def test_stop_request_checkpoints_and_exits_cleanly(tiny_shards, tiny_expert, tmp_path):
    cfg = fad_config(tiny_shards, tiny_expert, tmp_path / "run", tmp_path / "cache", train__max_steps=50,
                     checkpoint__every=100)
    from fadscale.cache_features import build_cache

    build_cache(cfg)
    trainer = fad_trainer(cfg)
    trainer.stop._handle(10, None)  # as if SIGUSR1 arrived during the first step
    host_handler = signal.getsignal(signal.SIGTERM)
    assert trainer.run() == 0
    assert trainer.stopped
    assert signal.getsignal(signal.SIGTERM) is host_handler  # the trainer's handlers lived only while it ran
    steps = [p.name for p in (tmp_path / "run/checkpoints").iterdir()]
    assert steps == ["step-00000001"]
    assert not (tmp_path / "run/final").exists()
    # Resuming continues from there.
    train_fad(fad_config(tiny_shards, tiny_expert, tmp_path / "run", tmp_path / "cache", train__max_steps=3,
                         checkpoint__every=100))
    assert json.loads((tmp_path / "run/final/run_card.json").read_text())["step"] == 3


def test_the_pipeline_does_not_go_on_from_a_stopped_training(tiny_shards, tiny_expert, tmp_path, monkeypatch):
    """A stop request checkpoints and returns 0 (what a requeued SLURM job needs), so the pipeline must look
    at the trainer, not the exit code: sampling next would score the run's earlier final/ as this point's."""
    from fadscale.pipeline.plan import Plan, Prepared, train_run
    from fadscale.runtime.signals import StopRequest
    from fadscale.training import trainer as training_loop

    class StopNow(StopRequest):
        def requested(self) -> bool:
            self._flag, self.reason = True, "test"
            return True

    plan = Plan(out=tmp_path, fad_overrides=[f"data.shards={tiny_shards}", "model.preset=cpu-tiny",
                                             "data.batch_size=8", "checkpoint.every=100"])
    prepared = Prepared(tmp_path, tiny_shards, tiny_expert, tiny_expert)
    run = train_run(plan, prepared, "vanilla", ["align.enabled=false", "train.max_steps=2"])
    card = run / "final" / "run_card.json"
    assert json.loads(card.read_text())["step"] == 2
    longer = ["align.enabled=false", "train.max_steps=4"]
    monkeypatch.setattr(training_loop, "StopRequest", StopNow)
    with pytest.raises(FadscaleError, match=r"training stopped at step 3 of 4 .*the same command resumes it"):
        train_run(plan, prepared, "vanilla", longer)
    assert json.loads(card.read_text())["step"] == 2  # nothing exported: final/ is still the 2-step run's
    monkeypatch.setattr(training_loop, "StopRequest", StopRequest)
    assert train_run(plan, prepared, "vanilla", longer) == run
    assert json.loads(card.read_text())["step"] == 4


def test_a_missing_cache_is_refused_with_the_command_that_builds_it(tiny_shards, tiny_expert, tmp_path):
    cfg = fad_config(tiny_shards, tiny_expert, tmp_path / "run", tmp_path / "no-cache")
    with pytest.raises(FadscaleError, match="no complete feature cache.*fadscale cache-features"):
        fad_trainer(cfg)
    assert not (tmp_path / "no-cache").exists()  # the trainer does not run another stage


def test_stale_cache_is_refused(tiny_shards, tiny_expert, tmp_path):
    from fadscale.cache_features import build_cache

    cfg = fad_config(tiny_shards, tiny_expert, tmp_path / "run", tmp_path / "cache", train__max_steps=1)
    build_cache(cfg)
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
        fad_trainer(stale)


def test_unknown_layer_lists_close_matches(tiny_shards, tiny_expert, tmp_path):
    cfg = fad_config(tiny_shards, tiny_expert, tmp_path / "run", tmp_path / "cache",
                     align__layer="down_blocks.2.resnets.0.conv_shortcutt", align__enabled=False)
    with pytest.raises(FadscaleError, match=r"align.layer .*close matches: down_blocks.2.resnets.0.conv_shortcut"):
        fad_trainer(cfg)


def test_non_finite_losses_stop_with_a_clear_error_and_keep_checkpoints(tiny_shards, tiny_expert, tmp_path):
    cfg = fad_config(tiny_shards, tiny_expert, tmp_path / "run", tmp_path / "cache", train__max_steps=4,
                     checkpoint__every=2)
    train_fad(cfg)
    before = {p: p.read_bytes() for p in (tmp_path / "run/checkpoints").rglob("*") if p.is_file()}
    # Continue the same run with a poisoned loss: every step non-finite.
    more = fad_config(tiny_shards, tiny_expert, tmp_path / "run", tmp_path / "cache", train__max_steps=8,
                      checkpoint__every=2, train__nan_tolerance=2)
    trainer = fad_trainer(more)
    step = trainer.task.train_step

    def poisoned(*args):
        loss, metrics = step(*args)
        return loss * float("inf"), metrics

    trainer.task.train_step = poisoned
    with pytest.raises(FadscaleError, match="2 non-finite losses in a row"):
        trainer.run()
    after = {p: p.read_bytes() for p in (tmp_path / "run/checkpoints").rglob("*") if p.is_file()}
    assert before == after


def test_unwritable_output_folder_is_refused(tiny_shards, tiny_expert, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cfg = fad_config(tiny_shards, tiny_expert, blocker / "run", tmp_path / "cache")
    with pytest.raises(FadscaleError, match="run.out_dir .*not writable"):
        fad_trainer(cfg)


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
    train_fad(cfg)
    card = json.loads((tmp_path / "run/final/run_card.json").read_text())
    assert (card["space"], card["channels"], card["sample_size"]) == ("latent", 4, 16)
    cache = json.loads((tmp_path / "cache/manifest.json").read_text())["cache"]
    assert cache["arrays"]["latent.npy"]["shape"] == [8, 8, 16, 16]  # 8 views x (mean, logvar) x 16 x 16
    assert all(torch.isfinite(torch.tensor(r["loss/noise"])) for r in read_metrics(tmp_path / "run"))


# --------------------------------------------------------------------------------------------------
# Options on the one loop


@pytest.mark.parametrize("target", ["noisy-online", "noisy-reference"])
def test_online_targets_run_the_expert_on_the_noisy_input_without_a_cache(target, tiny_shards, tiny_expert, tmp_path):
    cfg = fad_config(tiny_shards, tiny_expert, tmp_path / "run", tmp_path / "unused-cache", align__target=target,
                     train__max_steps=3)
    train_fad(cfg)
    assert not (tmp_path / "unused-cache").exists()
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(0 <= r["loss/align"] <= 2 for r in records)
    card = json.loads((tmp_path / "run/final/run_card.json").read_text())
    assert card["cache"] is None and card["config"]["align"]["target"] == target
    assert 0 < card["alignment_diagnostic"]["target_top_direction_share"] <= 1


def test_online_reference_target_uses_the_unnormalised_input_and_batch_statistics(tiny_shards, tiny_expert, tmp_path):
    from fadscale.train_fad import FadTask

    cfg = fad_config(tiny_shards, tiny_expert, tmp_path / "run", tmp_path / "c", align__target="noisy-reference")
    trainer = fad_trainer(cfg)
    task: FadTask = trainer.task
    assert task.online_expert.training  # BatchNorm on batch statistics, as the reference leaves it
    images = torch.full((2, 1, 32, 32), -1.0)  # black tiles: 0 in the [0, 1] range, not (0 - 0.5) / 0.5
    assert task.objective.expert_input(images).abs().max() == 0
    # The tile at its own size, whatever the expert's input size (the reference feeds its 64 px tile as it is).
    assert task.objective.expert_input(torch.zeros(2, 1, 16, 16)).shape[-1] == 16


def test_reference_noisy_input_is_the_references_own_x_t():
    """The reference diffuses [0, 1] pixels: its expert sees sqrt(a) x0 + sqrt(1 - a) eps with the full noise
    amplitude, not (x_t + 1) / 2 of a [-1, 1] diffusion (half the noise, shifted)."""
    from diffusers import DDPMScheduler

    from fadscale.core.objective import add_noise, reference_noisy

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    clean = torch.rand(4, 1, 8, 8) * 2 - 1
    noised = add_noise(scheduler, clean, torch.Generator().manual_seed(0))
    seen = reference_noisy(scheduler, clean, noised.noise, noised.timesteps)
    a = scheduler.alphas_cumprod[noised.timesteps].view(-1, 1, 1, 1)
    assert torch.allclose(seen, a.sqrt() * (clean + 1) / 2 + (1 - a).sqrt() * noised.noise, atol=1e-6)
    pure = reference_noisy(scheduler, clean, noised.noise, torch.full((4,), 999))
    assert torch.allclose(pure, noised.noise, atol=0.01)  # at the last step: the noise itself, no 0.5 offset
    assert not torch.allclose(seen, (noised.noisy + 1) / 2, atol=1e-3)


def test_repa_compares_on_the_coarser_grid_and_never_upsamples_the_expert_map():
    import torch.nn.functional as F

    from fadscale.core.align import RepaProjector
    from fadscale.core.objective import cosine_alignment_loss

    torch.manual_seed(0)
    projector = RepaProjector(expert_dim=6, unet_channels=4, hidden=8)
    feature = torch.randn(2, 4, 8, 8)
    prediction = projector.mlp(feature)
    coarse, fine = torch.randn(2, 6, 4, 4), torch.randn(2, 6, 16, 16)
    loss, _ = projector(feature, coarse)  # a 4x4 expert map: the 8x8 prediction is averaged onto it
    assert loss.item() == pytest.approx(cosine_alignment_loss(F.avg_pool2d(prediction, 2), coarse)[0].item(), rel=1e-5)
    loss, _ = projector(feature, fine)  # a 16x16 map: the map is averaged onto the 8x8 prediction
    assert loss.item() == pytest.approx(cosine_alignment_loss(prediction, F.avg_pool2d(fine, 2))[0].item(), rel=1e-5)


def test_until_step_switches_the_alignment_off(tiny_shards, tiny_expert, tmp_path):
    from fadscale.cache_features import build_cache

    cfg = fad_config(tiny_shards, tiny_expert, tmp_path / "run", tmp_path / "cache", train__max_steps=4,
                     align__until_step=2)
    build_cache(cfg)
    train_fad(cfg)
    records = {r["step"]: r for r in read_metrics(tmp_path / "run")}
    assert all("loss/align" in records[s] for s in (1, 2))
    assert all("loss/align" not in records[s] and records[s]["loss/total"] == records[s]["loss/noise"] for s in (3, 4))


def test_objective_targets_and_min_snr_weights():
    from diffusers import DDPMScheduler

    from fadscale.core.objective import add_noise, min_snr_weights, noise_loss

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    clean = torch.rand(4, 1, 8, 8) * 2 - 1
    eps = add_noise(scheduler, clean, torch.Generator().manual_seed(0), prediction_type="epsilon")
    v = add_noise(scheduler, clean, torch.Generator().manual_seed(0), prediction_type="v_prediction")
    torch.testing.assert_close(eps.noisy, v.noisy)  # the same draw
    alpha = scheduler.alphas_cumprod[v.timesteps].view(-1, 1, 1, 1)
    noise = eps.target
    torch.testing.assert_close(eps.noisy, alpha.sqrt() * clean + (1 - alpha).sqrt() * noise)
    torch.testing.assert_close(v.target, alpha.sqrt() * noise - (1 - alpha).sqrt() * clean)
    t = torch.tensor([1, 500, 999])
    snr = scheduler.alphas_cumprod[t] / (1 - scheduler.alphas_cumprod[t])
    torch.testing.assert_close(min_snr_weights(scheduler.alphas_cumprod, t, 5.0, "epsilon"), snr.clamp(max=5) / snr)
    torch.testing.assert_close(min_snr_weights(scheduler.alphas_cumprod, t, 5.0, "v_prediction"),
                               snr.clamp(max=5) / (snr + 1))
    # Input perturbation moves the input only: the same timesteps and target, an input noised with more.
    perturbed = add_noise(scheduler, clean, torch.Generator().manual_seed(0), prediction_type="v_prediction",
                          input_perturbation=0.1)
    torch.testing.assert_close(perturbed.target, v.target)
    assert torch.equal(perturbed.timesteps, v.timesteps)
    extra = (perturbed.noisy - v.noisy) / (1 - alpha).sqrt()  # 0.1 x fresh unit noise
    assert 0.05 < extra.std().item() < 0.2
    # timestep_power p draws t = T u^p: p = 2 puts the median at T / 4 (uniform: T / 2); p = 1 is the plain draw.
    big = torch.zeros(4096, 1, 1, 1)
    skewed = add_noise(scheduler, big, torch.Generator().manual_seed(1), timestep_power=2.0).timesteps.float()
    plain = add_noise(scheduler, big, torch.Generator().manual_seed(1), timestep_power=1.0).timesteps.float()
    assert 200 < skewed.median() < 300 and 450 < plain.median() < 550
    assert skewed.min() >= 0 and skewed.max() <= 999
    weights = torch.tensor([0.0, 1.0, 0.0, 0.0])
    assert noise_loss(eps.target, torch.zeros_like(eps.target), weights) == pytest.approx(
        eps.target[1].pow(2).mean().item() / 4, rel=1e-5)


@pytest.mark.parametrize("option", ["min_snr", "epsilon"])
def test_loss_options_change_the_loss_of_the_same_draw(option, tiny_shards, tiny_expert, tmp_path):
    from fadscale.cache_features import build_cache

    base = fad_config(tiny_shards, tiny_expert, tmp_path / "base", tmp_path / "cache", train__max_steps=2)
    build_cache(base)
    changed = {"min_snr": {"noise__min_snr_gamma": 1.0}, "epsilon": {"noise__prediction_type": "epsilon"}}[option]
    other = fad_config(tiny_shards, tiny_expert, tmp_path / "other", tmp_path / "cache", train__max_steps=2, **changed)
    train_fad(base)
    train_fad(other)
    a, b = read_metrics(tmp_path / "base")[0], read_metrics(tmp_path / "other")[0]
    assert a["loss/align"] == pytest.approx(b["loss/align"], rel=1e-5)  # the same weights, input and target
    assert a["loss/noise"] != pytest.approx(b["loss/noise"], rel=1e-3)
    if option == "min_snr":  # gamma 1 caps every weight at 1 / (SNR + 1) <= 1
        assert b["loss/noise"] < a["loss/noise"]


def test_gradient_accumulation_steps_once_per_k_micro_batches(tiny_shards, tiny_expert, tmp_path):
    from fadscale.cache_features import build_cache

    cfg = fad_config(tiny_shards, tiny_expert, tmp_path / "run", tmp_path / "cache", train__max_steps=3,
                     train__grad_accum=2)
    build_cache(cfg)
    train_fad(cfg)
    state = json.loads((tmp_path / "run/checkpoints/step-00000003/trainer_state.json").read_text())
    assert (state["step"], state["micro"]) == (3, 6)
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3]
    schedule = torch.load(tmp_path / "run/checkpoints/step-00000003/schedule.pt", weights_only=True)
    assert schedule["last_epoch"] == 3  # one schedule step per optimizer step


def test_keep_last_prunes_older_checkpoints(tiny_shards, tiny_expert, tmp_path):
    cfg = fad_config(tiny_shards, tiny_expert, tmp_path / "run", tmp_path / "cache", train__max_steps=5,
                     checkpoint__every=1, checkpoint__keep_last=2, align__enabled=False)
    train_fad(cfg)
    assert sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir()) == ["step-00000004", "step-00000005"]


def test_a_pretrained_unet_folder_is_loaded_and_trained(tiny_shards, tiny_expert, tmp_path):
    """A diffusers UNet folder (4 latent channels, no class embedding, as SD's) becomes a 1-channel pixel
    UNet with the rest of its weights kept and a zero class embedding, so it starts as the loaded one."""
    torch.manual_seed(3)
    source = build_unet("cpu-tiny", 4, 32)
    source.save_pretrained(tmp_path / "pretrained" / "unet")
    loaded = build_unet("cpu-tiny", 1, 32, pretrained=str(tmp_path / "pretrained"), class_embeds=9)
    assert loaded.conv_in.in_channels == 1 and loaded.conv_out.out_channels == 1
    kept = {k: v for k, v in source.state_dict().items() if not k.startswith(("conv_in", "conv_out"))}
    for key, value in kept.items():
        torch.testing.assert_close(loaded.state_dict()[key], value, msg=key)
    assert loaded.class_embedding.weight.abs().sum() == 0
    x, t, tokens = torch.randn(2, 1, 32, 32), torch.tensor([10, 900]), torch.randn(2, 1, 32)
    plain = build_unet("cpu-tiny", 1, 32, pretrained=str(tmp_path / "pretrained"))
    plain.conv_in.load_state_dict(loaded.conv_in.state_dict())
    plain.conv_out.load_state_dict(loaded.conv_out.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, tokens, class_labels=torch.tensor([0, 5])).sample,
                                   plain(x, t, tokens).sample)
    cfg = fad_config(tiny_shards, tiny_expert, tmp_path / "run", tmp_path / "cache", train__max_steps=2,
                     model__pretrained=str(tmp_path / "pretrained"), align__enabled=False)
    train_fad(cfg)
    assert json.loads((tmp_path / "run/final/unet/config.json").read_text())["num_class_embeds"] == 9


def test_a_second_writer_is_refused_and_a_stale_lock_is_taken_over(tiny_shards, tiny_expert, tmp_path, capsys):
    from fadscale.runtime.lock import LOCK_FILE, RunLock

    run = tmp_path / "run"
    cfg = fad_config(tiny_shards, tiny_expert, run, tmp_path / "cache", align__enabled=False, train__max_steps=2,
                     checkpoint__every=1)
    held = RunLock(run).acquire()  # another live run holds the folder
    with pytest.raises(FadscaleError, match=rf"{run}: in use by pid {os.getpid()} on host"):
        fad_trainer(cfg).run()
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()
    held.release()
    # A lock file left by a process that died without releasing it: the lock itself is free.
    (run / LOCK_FILE).write_text(json.dumps({"host": "node7", "pid": 4242, "started": "earlier"}))
    fad_trainer(cfg).run()
    assert "taking over the lock left by pid 4242 on host node7" in capsys.readouterr().err
    assert (run / "final/run_card.json").is_file() and (run / LOCK_FILE).read_text() == ""


def _processes_with(text: str) -> list[int]:
    """The pids whose command line contains `text`."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if text in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


def _start_cli_training(config: Path, run: Path, after_records: int, log: Path) -> subprocess.Popen:
    """`fadscale train` in the background (its output to `log`), once the run has logged `after_records`."""
    with open(log, "a") as sink:  # a file, not a pipe nobody reads while the trainer writes its progress
        cli = subprocess.Popen([sys.executable, "-m", "fadscale.cli", "train", "--config", str(config)],
                               stdout=sink, stderr=sink, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 180
    while len(read_metrics(run)) < after_records:
        assert cli.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.5)
    return cli


@pytest.mark.slow
def test_the_cli_forwards_stop_signals_and_its_stage_dies_with_it(tiny_shards, tiny_expert, tmp_path):
    run = tmp_path / "run"
    cfg = fad_config(tiny_shards, tiny_expert, run, tmp_path / "cache", align__enabled=False,
                     train__max_steps=100000, checkpoint__every=100000, train__log_every=1)
    config = _write_config(cfg, tmp_path / "fad.yaml")
    # SIGTERM to `fadscale train` reaches the trainer (a child process): it checkpoints and exits 0.
    log = tmp_path / "cli.log"
    cli = _start_cli_training(config, run, after_records=2, log=log)
    cli.send_signal(signal.SIGTERM)
    assert cli.wait(timeout=120) == 0, log.read_text()[-3000:]
    assert _processes_with(str(config)) == []
    first = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert len(first) == 1
    # kill -9 of the CLI: the trainer gets SIGTERM from the kernel (it dies with its parent), checkpoints
    # and exits; nothing is left running that would hold the run folder.
    cli = _start_cli_training(config, run, after_records=len(read_metrics(run)) + 2, log=log)
    cli.kill()
    cli.wait(timeout=30)
    deadline = time.monotonic() + 120
    while _processes_with(str(config)):
        assert time.monotonic() < deadline, "the trainer outlived the CLI"
        time.sleep(0.5)
    second = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert second[-1] > first[-1], (first, second)


DAMAGE_SETTINGS = dict(train__max_steps=6, checkpoint__every=3, align__enabled=False)


@pytest.fixture(scope="module")
def uninterrupted_run(tiny_shards, tiny_expert, tmp_path_factory) -> Path:
    """A vanilla run of 6 steps with checkpoints at steps 3 and 6 (the damage cases copy them)."""
    return trained_fad_run(tmp_path_factory.mktemp("uninterrupted"), tiny_shards, tiny_expert, "full", **DAMAGE_SETTINGS)


@pytest.mark.parametrize("damage", ["model.safetensors", "optimizer.pt", "ema.safetensors", "rng-0.pt",
                                    "trainer_state.json"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_intact_one(damage, uninterrupted_run, tiny_shards, tiny_expert,
                                                                  tmp_path, capsys):
    settings = DAMAGE_SETTINGS
    run = tmp_path / "run"
    shutil.copytree(uninterrupted_run / "checkpoints", run / "checkpoints")
    target = run / "checkpoints/step-00000006" / damage
    if damage == "trainer_state.json":
        target.unlink()
    else:  # truncated, as by a full disk or a killed copy
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    capsys.readouterr()
    train_fad(fad_config(tiny_shards, tiny_expert, run, tmp_path / "cache", **settings))
    err = capsys.readouterr().err
    assert "step-00000006" in err and damage in err, err[-2000:]
    assert "resumed from" in err and "step-00000003 at step 3" in err
    assert [r["step"] for r in read_metrics(run)] == [4, 5, 6]
    from safetensors.torch import load_file

    full, again = (load_file(str(d / "final/unet_ema/diffusion_pytorch_model.safetensors")) for d in (uninterrupted_run, run))
    for key in full:
        torch.testing.assert_close(again[key], full[key], rtol=1e-5, atol=1e-6, msg=key)


def test_auto_precision_takes_bf16_only_where_the_hardware_has_it(tiny_shards, tiny_expert, tmp_path, monkeypatch,
                                                                     capsys):
    """mixed_precision auto: bf16 on a CPU with native bf16, fp32 on one that would emulate it (12x slower on an
    AVX2 EPYC); an explicit bf16 on such a CPU is kept but warned about."""
    from fadscale.training import backend

    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").is_file() else None
    if flags is not None and not torch.cuda.is_available():  # the probe agrees with what the kernel reports
        assert backend.cpu_has_native_bf16() == bool({"avx512_bf16", "amx_bf16"} & set(flags))
    cpu = torch.device("cpu")
    for native, expected in ((True, "bf16"), (False, "no")):
        monkeypatch.setattr(backend, "cpu_has_native_bf16", lambda native=native: native)
        assert backend.resolve_precision("auto", cpu) == expected
        assert backend.resolve_precision("no", cpu) == "no" and backend.resolve_precision("bf16", cpu) == "bf16"
    if torch.cuda.is_available():  # the trainer would take the GPU
        return
    cfg = fad_config(tiny_shards, tiny_expert, tmp_path / "run", tmp_path / "cache", align__enabled=False,
                     train__max_steps=1, train__mixed_precision="auto")
    assert fad_trainer(cfg).backend.mixed_precision == "no"  # cpu_has_native_bf16 is False (patched)
    capsys.readouterr()
    cfg = fad_config(tiny_shards, tiny_expert, tmp_path / "run2", tmp_path / "cache", align__enabled=False,
                     train__max_steps=1, train__mixed_precision="bf16")
    assert fad_trainer(cfg).backend.mixed_precision == "bf16"
    assert "bf16 on a CPU without native bf16" in capsys.readouterr().err


def test_one_process_can_train_runs_of_different_precision_one_after_another(tiny_shards, tiny_expert, tmp_path):
    """The pipeline and the benchmarks train several runs in one process (accelerate's state is a singleton)."""
    for i, (precision, accumulation) in enumerate((("no", 1), ("bf16", 2), ("no", 1))):
        cfg = fad_config(tiny_shards, tiny_expert, tmp_path / f"run{i}", tmp_path / "cache", align__enabled=False,
                         train__max_steps=1, train__mixed_precision=precision, train__grad_accum=accumulation)
        trainer = fad_trainer(cfg)
        assert (trainer.backend.mixed_precision, trainer.backend.grad_accum) == (precision, accumulation)
        assert trainer.run() == 0


def test_crop_trains_on_random_windows_of_each_tile_and_samples_whole_tiles(tiny_shards, tiny_expert, tmp_path):
    from fadscale.artifacts.run import load_run
    from fadscale.core.objective import random_crops

    images = torch.arange(3 * 8 * 8, dtype=torch.float).view(3, 1, 8, 8)
    crops = random_crops(images, 4, torch.Generator().manual_seed(0))
    assert crops.shape == (3, 1, 4, 4)
    for i in range(3):  # each crop is a window of its own tile
        assert any(torch.equal(crops[i], images[i, :, t:t + 4, l:l + 4]) for t in range(5) for l in range(5))
    with pytest.raises(FadscaleError, match="align.projector seed and align.target cached"):  # a map of the whole tile
        fad_config(tiny_shards, tiny_expert, tmp_path / "x", tmp_path / "c", train__crop=16, align__projector="repa")
    with pytest.raises(FadscaleError, match="align.projector seed and align.target cached"):  # the expert would see a window
        fad_config(tiny_shards, tiny_expert, tmp_path / "x", tmp_path / "c", train__crop=16, align__target="noisy-online")
    with pytest.raises(FadscaleError, match="train.crop 32 must be smaller"):
        fad_config(tiny_shards, tiny_expert, tmp_path / "x", tmp_path / "c", align__enabled=False, train__crop=32)
    cfg = fad_config(tiny_shards, tiny_expert, tmp_path / "run", tmp_path / "c", align__enabled=False,
                     train__crop=16, train__max_steps=2)
    train_fad(cfg)
    loaded = load_run(tmp_path / "run")
    assert loaded.card["config"]["train"]["crop"] == 16 and loaded.card["sample_size"] == 32


def test_crop_until_trains_whole_tiles_from_that_step_on(tiny_shards, tiny_expert, tmp_path):
    """A finishing phase at the size the sampler draws: windows for the first crop_until steps, whole tiles after."""
    from fadscale.train_fad import fad_trainer

    with pytest.raises(FadscaleError, match="train.crop_until needs train.crop"):
        fad_config(tiny_shards, tiny_expert, tmp_path / "x", tmp_path / "c", align__enabled=False, train__crop_until=2)
    cfg = fad_config(tiny_shards, tiny_expert, tmp_path / "run", tmp_path / "c", align__enabled=False,
                     train__crop=16, train__crop_until=2, train__max_steps=3)
    trainer = fad_trainer(cfg)
    sizes = []
    trainer.task.unet.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[-1]))
    assert trainer.run() == 0
    assert sizes[:3] == [16, 16, 32]  # then the last step's grid, at 32


def test_crop_with_the_seed_projector_aligns_each_window_to_its_tiles_pooled_feature(tiny_shards, tiny_expert, tmp_path):
    """Patch training with alignment: the window's pooled UNet feature meets the whole tile's cached expert feature."""
    from fadscale.artifacts.run import load_run

    cfg = fad_config(tiny_shards, tiny_expert, tmp_path / "run", tmp_path / "cache", train__crop=16, train__max_steps=2,
                     train__log_every=1)
    train_fad(cfg)
    loaded = load_run(tmp_path / "run")
    assert loaded.card["config"]["train"]["crop"] == 16 and loaded.card["config"]["align"]["enabled"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    aligned = [row["loss/align"] for row in rows if "loss/align" in row]
    assert aligned and all(0 < value <= 2 for value in aligned)  # 1 - cosine of real features, not skipped
