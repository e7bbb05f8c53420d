"""Class-faithful generation: the class reaches the UNet, every sampler runs, training learns the classes,
and the alignment pulls the UNet's feature towards a target that tells tiles apart."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fadscale.core.align import build_projector
from fadscale.core.conditioning import ClassConditioning
from fadscale.core.models.unet import build_unet, probe_feature_shape
from fadscale.core.sampling import SCHEDULERS, STOCHASTIC, generate, make_scheduler
from fadscale.core.fad import FadModel

LAYER = "down_blocks.2.resnets.0.conv_shortcut"
NOISE = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
             timestep_spacing="trailing")


@pytest.fixture(autouse=True)
def _threads(one_torch_thread):
    yield


def _class_embedded_unet(seed: int = 0):
    torch.manual_seed(seed)
    unet = build_unet("cpu-tiny", 1, 16, class_embeds=9).eval()
    # The class embedding is fresh (normal) at init, as the UNet trains it; make it large enough that
    # its effect is well above float noise in a random network.
    with torch.no_grad():
        unet.class_embedding.weight.mul_(3.0)
    return unet


def test_changing_the_class_label_changes_the_tile_for_fixed_noise():
    unet = _class_embedded_unet()
    table = torch.zeros(9, 1, unet.config.cross_attention_dim)  # one token for all: only the embedding differs
    seeds = [11, 12]

    def tiles(label: int) -> torch.Tensor:
        return generate(unet, table, torch.tensor([label, label]), seeds, scheduler=make_scheduler("ddim", NOISE),
                        steps=4, image_size=16, channels=1, device=torch.device("cpu"))

    a, b, again = tiles(0), tiles(6), tiles(0)
    assert torch.equal(a, again)  # the same label and noise: the same tile
    assert (a - b).abs().mean() > 1e-3, "the class label did not change the tile"


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
@pytest.mark.parametrize("guidance", [1.0, 2.5])
def test_every_sampler_with_and_without_guidance(scheduler, guidance):
    unet = _class_embedded_unet()
    table = torch.randn(9, 1, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(0))
    labels, seeds = torch.tensor([1, 5]), [3, 4]
    steps = 8 if scheduler != "ddpm" else 12

    def run(g: float) -> torch.Tensor:
        return generate(unet, table, labels, seeds, scheduler=make_scheduler(scheduler, NOISE), steps=steps,
                        guidance=g, null_index=8, image_size=16, channels=1, device=torch.device("cpu"))

    out = run(guidance)
    assert out.shape == (2, 1, 16, 16) and torch.isfinite(out).all()
    assert out.min() >= -1 and out.max() <= 1
    assert torch.equal(out, run(guidance))  # per-image seeds: reproducible, DDPM's step noise included
    if guidance != 1.0:
        assert (out - run(1.0)).abs().mean() > 1e-4, "guidance had no effect"


@pytest.mark.parametrize("scheduler", sorted(STOCHASTIC))
def test_stochastic_samplers_give_each_image_its_own_noise_whatever_the_batch(scheduler):
    unet = _class_embedded_unet()
    table = torch.randn(9, 1, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(0))

    def run(labels: list[int], seeds: list[int]) -> torch.Tensor:
        return generate(unet, table, torch.tensor(labels), seeds, scheduler=make_scheduler(scheduler, NOISE),
                        steps=12, image_size=16, channels=1, device=torch.device("cpu"))

    both = run([1, 5], [3, 4])
    torch.testing.assert_close(both[1:], run([5], [4]), rtol=0, atol=1e-5)  # alone or in a batch: the same
    torch.testing.assert_close(both[:1], run([1], [3]), rtol=0, atol=1e-5)
    if scheduler == "dpm++-sde":  # it does re-noise: its tiles are not the deterministic solver's
        deterministic = generate(unet, table, torch.tensor([1, 5]), [3, 4], scheduler=make_scheduler("dpm++", NOISE),
                                 steps=12, image_size=16, channels=1, device=torch.device("cpu"))
        assert (both - deterministic).abs().mean() > 1e-3


def _procedural_batch(per_class: int, seed: int):
    from fadscale.data.procedural import generate_tiles

    labels = torch.arange(8).repeat_interleave(per_class)
    tiles = generate_tiles(labels.numpy(), size=16, seed=seed, grayscale=True)
    return torch.from_numpy(tiles).float().div(127.5).sub(1.0).unsqueeze(1), labels


@pytest.mark.slow
def test_a_short_training_learns_each_classes_brightness():
    """v-prediction + class embedding: after 150 steps the tiles generated for each class have roughly the
    class's own brightness (the one-token, epsilon-prediction setup of the reference did not get there in
    2,000 steps: every class came out at 0.43-0.56)."""
    from diffusers import DDPMScheduler

    images, labels = _procedural_batch(per_class=12, seed=0)
    real_mean = torch.stack([images[labels == c].mean() for c in range(8)])
    torch.manual_seed(0)
    unet = build_unet("cpu-tiny", 1, 16, class_embeds=9)
    table = torch.zeros(9, 1, unet.config.cross_attention_dim)
    noise = DDPMScheduler(**NOISE)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(150):
        index = torch.randint(0, len(images), (32,), generator=gen)
        clean, y = images[index], labels[index]
        eps = torch.randn(clean.shape, generator=gen)
        t = torch.randint(0, 1000, (len(index),), generator=gen)
        prediction = unet(noise.add_noise(clean, eps, t), t, table[y], class_labels=y).sample
        loss = F.mse_loss(prediction, noise.get_velocity(clean, eps, t))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    unet.eval()
    per_class = 6
    made = generate(unet, table, torch.arange(8).repeat_interleave(per_class), list(range(8 * per_class)),
                    scheduler=make_scheduler("dpm++", NOISE), steps=15, image_size=16, channels=1,
                    device=torch.device("cpu"))
    made_mean = made.view(8, per_class, -1).mean(dim=(1, 2))
    # Brightness ranks as the real classes' do, and the classes are not all one grey.
    rank = lambda v: v.argsort().argsort().float()  # noqa: E731
    correlation = torch.corrcoef(torch.stack([rank(real_mean), rank(made_mean)]))[0, 1]
    assert correlation > 0.8, (real_mean, made_mean)
    assert made_mean.max() - made_mean.min() > 0.5 * (real_mean.max() - real_mean.min()), (real_mean, made_mean)


def test_alignment_moves_the_unet_feature_towards_a_target_that_tells_tiles_apart():
    """Not only a falling loss: with the seed projector frozen (so the target cannot drift towards the
    UNet, nor collapse), training on the alignment loss turns the pooled UNet feature of each tile towards
    that tile's target, and the targets of tiles of different classes stay apart."""
    torch.manual_seed(0)
    unet = build_unet("cpu-tiny", 1, 16)
    shape = probe_feature_shape(unet, LAYER, 1, 16)
    projector = build_projector("seed", 24, shape, 16, LAYER, center_target=True)
    projector.requires_grad_(False)
    model = FadModel(unet, ClassConditioning(8, unet.config.cross_attention_dim), projector, LAYER).train()
    gen = torch.Generator().manual_seed(0)
    class_features = torch.randn(8, 24, generator=gen)  # one expert direction per class
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    images = torch.randn(8, 1, 16, 16, generator=gen).clamp(-1, 1)  # one tile per class

    def step(train: bool):
        labels = torch.arange(8)
        timesteps = torch.randint(0, 1000, (8,), generator=gen)
        noisy = images + 0.1 * torch.randn(images.shape, generator=gen)
        _, loss, diagnostics = model(noisy, timesteps, labels, None, class_features[labels])
        if train:
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return diagnostics

    model.eval()
    with torch.no_grad():
        before = step(False)
    model.train()
    for _ in range(60):
        step(True)
    model.eval()
    with torch.no_grad():
        after = step(False)
    assert after["align/cosine"] > before["align/cosine"] + 0.3, (before, after)
    assert after["align/cosine"] > 0.6
    assert after["align/target_similarity"] < 0.5  # the targets of different tiles point different ways
