"""The config classes of every stage (pydantic): sections, defaults, bounds and the descriptions that
`fadscale config show` prints. Loading them from YAML and `--set` is fadscale.config.loading's."""

from __future__ import annotations

from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False)


# --------------------------------------------------------------------------------------------------
# Sections shared by several entry points
# --------------------------------------------------------------------------------------------------


class RunSection(Section):
    out_dir: str = Field("runs/run", description="run folder: config, logs, checkpoints, outputs")
    seed: int = 0
    resume: Literal["auto", "never", "force"] = Field(
        "auto", description="auto: continue from the newest complete checkpoint in out_dir (refused when settings "
        "that change what is trained differ from the checkpoint's); force: continue anyway, recording the change; "
        "never: start over")


class DataSection(Section):
    shards: str = Field("runs/shards", description="folder written by `fadscale shard-data`")
    image_size: int = Field(64, ge=8, description="tiles are resized to this square size")
    channels: Literal[1, 3] = 1
    batch_size: int = Field(8, ge=1, description="per process")
    workers: int = Field(0, ge=0, description="DataLoader worker processes per rank")
    shuffle_buffer: int = Field(512, ge=1)
    samples_per_epoch: int | None = Field(
        None, ge=1, description="samples per epoch over all ranks; default: the train split's size"
    )
    views: bool = Field(True, description="draw one of the 8 flips/rotations per sample")
    subset: Literal["all", "A", "B"] = Field(
        "all", description="A/B: a fixed half of the tiles (by key), disjoint from the other half"
    )
    subset_seed: int = Field(0, description="draws the A/B halves and the max_per_class tiles")
    max_per_class: int | None = Field(None, ge=1, description="train on at most this many tiles per class of the "
                                      "subset (a low-data regime), drawn by subset_seed; None: all")
    on_corrupt: Literal["error", "skip"] = Field(
        "error", description="a shard whose sha256 differs from its manifest, or a record that does not decode: "
        "error stops with the shard and key; skip leaves damaged records out (named on stderr, counted)")


class OptimSection(Section):
    name: Literal["adamw", "stableadamw"] = Field(
        "adamw", description="stableadamw: AdamW whose step per tensor is scaled down when the gradient is far "
        "larger than its running average says (update clipping; Wortsman et al. 2023), which keeps one outlier "
        "batch after a quiet stretch from moving a tensor by several learning rates")
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["cosine", "constant", "step"] = "cosine"
    step_size: int = Field(1000, ge=1, description="steps between x0.1 decays (schedule: step)")
    grad_clip: float | None = Field(1.0, gt=0)


class CheckpointSection(Section):
    every: int = Field(500, ge=1, description="save the training state every N steps")
    keep_last: int = Field(3, ge=1, description="keep the newest K checkpoints")


# --------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------


class ExpertModelSection(Section):
    arch: str = Field("resnet50", description="any timm model name")
    pretrained: str | None = Field(None, description="local weights: .safetensors or a timm checkpoint")
    head: Literal["linear", "mlp"] = Field("mlp", description="mlp: feature -> 256 -> classes")
    input_size: int = Field(224, ge=8, description="the expert's own input size")
    drop_rate: float = Field(0.0, ge=0, lt=1)
    sync_batchnorm: bool = False


class ExpertTrainSection(Section):
    epochs: int = Field(10, ge=1)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    mixed_precision: Literal["auto", "no", "bf16"] = Field(
        "auto", description="auto: bf16 on a GPU or a CPU with native bf16 (AVX512-BF16, AMX), else fp32")
    early_stopping: int | None = Field(None, ge=1, description="stop after N epochs without improvement")
    log_every: int = Field(10, ge=1)


class ExpertConfig(Section):
    run: RunSection = RunSection(out_dir="runs/expert")
    data: DataSection = DataSection(image_size=224)
    model: ExpertModelSection = ExpertModelSection()
    optim: OptimSection = OptimSection(lr=3e-4, warmup_steps=50)
    train: ExpertTrainSection = ExpertTrainSection()
    checkpoint: CheckpointSection = CheckpointSection(every=1, keep_last=2)

    @model_validator(mode="after")
    def _input_size_matches(self) -> "ExpertConfig":
        # The loader resizes tiles to data.image_size; the expert sees exactly that.
        if self.data.image_size != self.model.input_size:
            raise ValueError(
                f"data.image_size ({self.data.image_size}) must equal model.input_size "
                f"({self.model.input_size}): the expert is trained at its own input size"
            )
        return self


class ConditioningSection(Section):
    text_encoder: str | None = Field(
        None, description="local CLIP folder (or hub id when online); None: learned class embeddings"
    )
    prompt: str = "a histological image of {name} tissue"
    class_embedding: bool = Field(True, description="add a learned class embedding to the UNet's timestep "
                                  "embedding (plus a null class for guidance), beside the cross-attention token")


class CacheSection(Section):
    dir: str = Field("runs/cache", description="feature cache folder (`fadscale train` builds it when missing)")
    spatial: bool | None = Field(None, description="also cache spatial maps; None: when align needs them")
    batch_size: int = Field(32, ge=1)


class ModelSection(Section):
    preset: Literal["tiny-sd", "cpu-base", "cpu-small", "cpu-tiny"] = "tiny-sd"
    pretrained: str | None = Field(None, description="diffusers UNet folder (or hub id when online)")
    space: Literal["pixel", "latent"] = "pixel"
    vae: str | None = Field(None, description="diffusers VAE folder, for space: latent")
    gradient_checkpointing: bool = False
    channels_last: bool = False
    compile: bool = False


class NoiseSection(Section):
    num_train_timesteps: int = Field(1000, ge=1)
    beta_schedule: Literal["squaredcos_cap_v2", "linear", "scaled_linear"] = "squaredcos_cap_v2"
    prediction_type: Literal["epsilon", "v_prediction"] = Field(
        "v_prediction", description="v_prediction learns class-level brightness and layout at high noise, where "
        "epsilon's clean-image estimate is noise-dominated (the reference: epsilon)")
    min_snr_gamma: float | None = Field(None, gt=0, description="min-SNR loss weighting; None: off")
    timestep_spacing: Literal["trailing", "leading", "linspace"] = Field(
        "trailing", description="samplers' timestep spacing; trailing starts from the last training step (pure noise)")
    timestep_power: float = Field(1.0, gt=0, description="training timesteps drawn as T u^p: 1 uniform; > 1 more "
                                  "low-noise steps (fine detail), < 1 more high-noise steps (layout)")
    input_perturbation: float = Field(0.0, ge=0, description="extra noise on the UNet's input only (not in its "
                                      "target), against the train/sample mismatch (exposure bias; Ning et al. 2023)")


class AlignSection(Section):
    enabled: bool = Field(True, description="false: plain fine-tuning (the baseline)")
    layer: str = "down_blocks.2.resnets.0.conv_shortcut"
    projector: Literal["seed", "repa"] = "seed"
    weight: float = Field(1.0, ge=0)
    target: Literal["cached", "noisy-online", "noisy-reference"] = Field(
        "cached", description="cached: the expert's feature of the clean tile (same view), computed once; "
        "noisy-online: of the noisy input, every step; noisy-reference: as the reference (its x_t of the tile "
        "in [0, 1] with the step's noise and timestep, at the tile's size, not normalised, BatchNorm in train mode)")
    until_step: int | None = Field(None, ge=0, description="alignment stops after this step")
    repa_hidden: int = Field(512, ge=1, description="hidden width of the repa projector MLP")
    expert_stage: int | None = Field(None, ge=0, description="repa: align to the expert's map at this stage "
                                     "(timm feature_info index; resnets 1-4 at strides 4-32), finer than the "
                                     "last map without resizing the tile; None: the last map")
    center_target: bool = Field(False, description="seed projector: centre the expert features, no bias: no "
                                "constant target to collapse onto; it can still collapse to rank one (measured: "
                                "docs/results/fad-vs-vanilla-procedural.md) (off: the reference)")


class FadTrainSection(Section):
    max_steps: int = Field(1000, ge=1)
    grad_accum: int = Field(1, ge=1)
    mixed_precision: Literal["auto", "no", "bf16"] = Field(
        "auto", description="auto: bf16 on a GPU or a CPU with native bf16 (AVX512-BF16, AMX), else fp32")
    label_dropout: float = Field(0.0, ge=0, lt=1, description="drop the class for classifier-free guidance")
    ema_decay: float | None = Field(0.999, gt=0, lt=1)
    log_every: int = Field(10, ge=1)
    sample_every: int | None = Field(None, ge=1, description="log a per-class sample grid to TensorBoard every N steps (one at the last step always)")
    nan_tolerance: int = Field(5, ge=1, description="stop after this many non-finite losses in a row")
    crop: int | None = Field(None, ge=8, multiple_of=8, description="train on a random crop of this size from each "
                             "tile (patch training: cheaper steps on texture-like tiles); sampling stays at "
                             "data.image_size; with alignment (seed projector, cached target) the window's "
                             "pooled feature is aligned to its tile's; None: whole tiles")
    crop_until: int | None = Field(None, ge=0, description="with crop: whole tiles from this step on (a finishing "
                                   "phase at the size the sampler draws); None: windows to the end")


class EvalSection(Section):
    """Learning curves: every `every` steps the trainer samples a fixed small set (the same seeds each time)
    with the fast sampler and scores it with an independent evaluator (generation accuracy, Frechet
    distance against the real val tiles), into TensorBoard and metrics.jsonl."""

    every: int | None = Field(None, ge=1, description="steps between evaluations; None: off")
    evaluator: str | None = Field(None, description="the evaluator's card (an expert on the other half of the "
                                  "tiles); required when eval.every is set")
    per_class: int = Field(8, ge=2, description="generated tiles per class at each evaluation")
    scheduler: Literal["dpm++", "dpm++-sde", "ddim"] = "dpm++"
    steps: int = Field(15, ge=1, description="sampler steps")


class FadConfig(Section):
    run: RunSection = RunSection(out_dir="runs/fad")
    data: DataSection = DataSection()
    expert: str = Field("runs/expert/expert.json", description="the alignment expert's card")
    conditioning: ConditioningSection = ConditioningSection()
    cache: CacheSection = CacheSection()
    model: ModelSection = ModelSection()
    noise: NoiseSection = NoiseSection()
    align: AlignSection = AlignSection()
    optim: OptimSection = OptimSection(lr=1e-4, warmup_steps=100)
    train: FadTrainSection = FadTrainSection()
    eval: EvalSection = EvalSection()
    checkpoint: CheckpointSection = CheckpointSection()

    @model_validator(mode="after")
    def _center_needs_seed(self) -> "FadConfig":
        if self.align.center_target and self.align.projector != "seed":
            raise ValueError(f"align.center_target applies to the seed projector only (projector is "
                             f"{self.align.projector!r}, whose target, the expert's map, is not learned)")
        return self

    @model_validator(mode="after")
    def _crop_fits(self) -> "FadConfig":
        crop = self.train.crop
        if crop is not None and crop >= self.data.image_size:
            raise ValueError(f"train.crop {crop} must be smaller than data.image_size {self.data.image_size}")
        if crop is None and self.train.crop_until is not None:
            raise ValueError("train.crop_until needs train.crop (the window size before that step)")
        if crop is not None and self.model.space == "latent":
            raise ValueError("train.crop works in pixel space only (a latent describes the whole tile, not a crop of it)")
        # The seed projector compares pooled features: a window's pooled UNet feature is pulled towards its whole
        # tile's expert feature, which holds for texture tiles (a window carries its tile's class). The repa
        # projector's target is a map of the whole tile, and the noisy targets would run the expert on a window.
        if crop is not None and self.align.enabled and (self.align.projector != "seed" or self.align.target != "cached"):
            raise ValueError(f"train.crop with alignment needs align.projector seed and align.target cached (a pooled "
                             f"target); got projector {self.align.projector!r}, target {self.align.target!r}")
        return self

    @model_validator(mode="after")
    def _eval_needs_evaluator(self) -> "FadConfig":
        if self.eval.every is not None and not self.eval.evaluator:
            raise ValueError("eval.every is set but eval.evaluator is not: name the evaluator's card (an expert "
                             "trained on the other half of the tiles, e.g. train-expert with data.subset=B)")
        return self


ConfigT = TypeVar("ConfigT", bound=BaseModel)


# What a FadConfig implies
# --------------------------------------------------------------------------------------------------

def uses_cache(cfg: FadConfig) -> bool:
    """Whether training reads the feature cache: a cached alignment target, VAE latents, or text conditioning."""
    return (cfg.align.enabled and cfg.align.target == "cached") or cfg.model.space == "latent" \
        or cfg.conditioning.text_encoder is not None


def needs_spatial(cfg: FadConfig) -> bool:
    """Whether the cache holds the expert's spatial map too (the repa projector's target)."""
    return cfg.cache.spatial if cfg.cache.spatial is not None else (cfg.align.enabled and cfg.align.projector == "repa")


# ------------------------------------------------------------------------------- fadscale sample


class SampleRunSection(Section):
    out_dir: str = Field("runs/samples", description="folder of this stage; the sample set is <out_dir>/samples")
    seed: int = Field(0, ge=0, description="base seed: every image's seed derives from it, its class and index")
    overwrite: bool = Field(False, description="replace an existing sample set (only once the new one is complete)")


class SampleModelSection(Section):
    path: str = Field("runs/fad", description="a FAD/vanilla run folder (holding final/) or its final/ folder")
    weights: Literal["ema", "raw"] = Field("ema", description="ema: unet_ema (unet when the run has none)")


class SamplingSection(Section):
    scheduler: Literal["dpm++", "dpm++-sde", "ddim", "ddpm"] = Field(
        "dpm++", description="dpm++-sde: DPM-Solver++ re-noising at every step; ddpm: the reference (1000 steps)")
    steps: int | None = Field(None, ge=1, description="None: 25 for dpm++ and dpm++-sde, 50 for ddim, all training "
                                                      "steps for ddpm")
    guidance: float = Field(1.0, ge=0, description="classifier-free guidance scale; 1: off")
    per_class: int = Field(16, ge=1)
    batch_size: int = Field(16, ge=1, description="images per UNet batch (the same on any number of ranks)")
    mixed_precision: Literal["auto", "no", "bf16"] = Field("auto", description="auto: bf16 on GPU")


class FilterSection(Section):
    enabled: bool = Field(False, description="the reference's mean-intensity rejection filter")
    low: float = Field(0.02, ge=0, le=1, description="reject tiles whose mean intensity (0..1) is below")
    high: float = Field(0.98, ge=0, le=1, description="reject tiles whose mean intensity (0..1) is above")
    max_attempts: int = Field(10, ge=1, description="generations per image; the last is kept even if rejected")


class OutputSection(Section):
    grid: int = Field(64, ge=1, description="images per class in the grids")
    shards: bool = Field(False, description="also write the tiles as WebDataset shards (png/cls/json)")
    shard_samples: int = Field(1000, ge=1, description="tiles per shard")


class SampleConfig(Section):
    run: SampleRunSection = SampleRunSection()
    model: SampleModelSection = SampleModelSection()
    sample: SamplingSection = SamplingSection()
    filter: FilterSection = FilterSection()
    output: OutputSection = OutputSection()

    @model_validator(mode="after")
    def _filter_range(self) -> "SampleConfig":
        # Here rather than in FilterSection: a check across keys is reported with its own message.
        if self.filter.low > self.filter.high:
            raise ValueError(f"filter.low ({self.filter.low}) must not exceed filter.high ({self.filter.high})")
        return self


# ----------------------------------------------------------------------------- fadscale evaluate


class EvalRunSection(Section):
    out_dir: str = Field("runs/evaluate", description="report folder (written atomically)")
    seed: int = Field(0, ge=0, description="seeds the SSIM pairs, KID subsets and the utility classifiers")
    overwrite: bool = Field(False, description="replace an existing report folder")


class RealSection(Section):
    shards: str | None = Field(None, description="real shards; None: those the sampled run was trained on")
    split: Literal["auto", "val", "train", "test"] = Field(
        "auto", description="the real tiles scored; auto: test where the shards have a test part, else val")
    subset: Literal["all", "A", "B"] = "all"
    subset_seed: int = 0
    max_per_class: int | None = Field(None, ge=2, description="cap the real tiles per class (first by key)")


class EvaluatorSection(Section):
    card: str = Field("runs/expert_b/expert.json", description="the evaluator expert's card (not the alignment expert)")
    alignment_expert: str | None = Field(None, description="the alignment expert's card; default: the run card's")
    allow_alignment_expert: bool = Field(False, description="evaluate with the alignment expert anyway (reported)")
    batch_size: int = Field(64, ge=1)


class MetricsSection(Section):
    ssim_pairs: int = Field(100, ge=1, description="random pairs per class for SSIM diversity")
    kid_subsets: int = Field(50, ge=1)
    kid_subset_size: int = Field(1000, ge=2, description="capped by the smaller set")
    pr_k: int = Field(3, ge=1, description="k of the k-NN manifolds (precision/recall)")
    per_class: bool = Field(True, description="also per-class Frechet distance, KID, precision/recall")
    inception_weights: str | None = Field(None, description="local Inception weights for FID (needs torch-fidelity)")


class UtilitySection(Section):
    enabled: bool = Field(True, description="train-on-synthetic, test-on-real classifiers")
    arch: str = Field("tiny-cnn", description="tiny-cnn, or a timm model name (trained from scratch)")
    steps: int | None = Field(300, ge=1, description="optimizer steps per classifier, the same for every "
                              "training set (so a smaller set is not also trained less); None: `epochs` passes")
    epochs: int = Field(5, ge=1, description="passes over the training set when steps is None")
    batch_size: int = Field(32, ge=1)
    lr: float = Field(2e-3, gt=0)
    max_real_per_class: int | None = Field(None, ge=1, description="cap the real train tiles per class")


class ReportSection(Section):
    grid: int = Field(8, ge=1, description="real and generated tiles per class in the grids")


class EvaluateConfig(Section):
    run: EvalRunSection = EvalRunSection()
    samples: str = Field("runs/samples", description="a sample set (or the sample stage folder holding samples/)")
    real: RealSection = RealSection()
    evaluator: EvaluatorSection = EvaluatorSection()
    metrics: MetricsSection = MetricsSection()
    utility: UtilitySection = UtilitySection()
    report: ReportSection = ReportSection()
