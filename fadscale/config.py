"""Typed configuration for every entry point: pydantic classes, loaded from YAML, overridable with
`--set section.key=value`.

Every problem (missing file, unknown key, wrong type, bad value) becomes one `FadscaleError` line
that names the file and key, what was given and what was expected, with a close-match suggestion
for a misspelt key.
"""

from __future__ import annotations

import difflib
import re
import types
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo

from fadscale.errors import FadscaleError
from fadscale.runtime.io import atomic_write_text


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


class EvalSection(Section):
    """Learning curves: every `every` steps the trainer samples a fixed small set (the same seeds each time)
    with the fast sampler and scores it with an independent evaluator (generation accuracy, Frechet
    distance against the real val tiles), into TensorBoard and metrics.jsonl."""

    every: int | None = Field(None, ge=1, description="steps between evaluations; None: off")
    evaluator: str | None = Field(None, description="the evaluator's card (an expert on the other half of the "
                                  "tiles); required when eval.every is set")
    per_class: int = Field(8, ge=2, description="generated tiles per class at each evaluation")
    scheduler: Literal["dpm++", "ddim"] = "dpm++"
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
    def _eval_needs_evaluator(self) -> "FadConfig":
        if self.eval.every is not None and not self.eval.evaluator:
            raise ValueError("eval.every is set but eval.evaluator is not: name the evaluator's card (an expert "
                             "trained on the other half of the tiles, e.g. train-expert with data.subset=B)")
        return self


ConfigT = TypeVar("ConfigT", bound=BaseModel)


# Loading, overrides, errors
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
    scheduler: Literal["dpm++", "ddim", "ddpm"] = Field("dpm++", description="ddpm: the reference (1000 steps)")
    steps: int | None = Field(None, ge=1, description="None: 25 for dpm++, 50 for ddim, all training steps for ddpm")
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


_FLOAT_WITHOUT_DOT = re.compile(r"^[-+]?[0-9]+[eE][-+]?[0-9]+$")
_NULLS = ("null", "Null", "NULL", "~", "none", "None")
# YAML 1.1 (PyYAML) reads these unquoted words as booleans.
_YAML_BOOL_WORDS = "yes/no/on/off/true/false"


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The config section class an annotation stands for (also inside `X | None`), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) in (Union, types.UnionType):
        for arg in get_args(annotation):
            found = _section_model(arg)
            if found is not None:
                return found
    return None


def _field_at(model: type[BaseModel], parts) -> tuple[FieldInfo | None, int]:
    """The field that `parts` (a key path) lands on and how many parts it used; (None, n) when part n
    is not a field."""
    current = model
    for depth, part in enumerate(parts):
        field = current.model_fields.get(str(part))
        if field is None:
            return None, depth
        nested = _section_model(field.annotation)
        if nested is None or depth == len(parts) - 1:
            return field, depth + 1
        current = nested
    return None, len(parts)


def _accepts_str(annotation: Any) -> bool:
    """A field whose values are text (str, a Literal of strings, optionally None)."""
    if annotation is str:
        return True
    origin = get_origin(annotation)
    if origin is Literal:
        return all(isinstance(arg, str) for arg in get_args(annotation))
    if origin in (Union, types.UnionType):
        args = [arg for arg in get_args(annotation) if arg is not type(None)]
        return bool(args) and all(_accepts_str(arg) for arg in args)
    return False


def _allows_none(annotation: Any) -> bool:
    return get_origin(annotation) in (Union, types.UnionType) and type(None) in get_args(annotation)


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _describe(annotation: Any) -> str:
    """'an integer', "one of 'auto', 'no', 'bf16'", 'a list of 2 numbers', ... for an error message."""
    if annotation in _TYPE_WORDS:
        return _TYPE_WORDS[annotation]
    section = _section_model(annotation)
    if section is not None and isinstance(annotation, type):
        return f"a section (a mapping with keys: {', '.join(section.model_fields)})"
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return "one of " + ", ".join(repr(arg) for arg in args)
    if origin in (Union, types.UnionType):
        words = [_describe(arg) for arg in args if arg is not type(None)]
        return " or ".join(words) + (" or null" if type(None) in args else "")
    if origin is tuple and args and args[-1] is not Ellipsis:
        kinds = {_describe(arg) for arg in args}
        if len(kinds) == 1:
            word = kinds.pop().removeprefix("an ").removeprefix("a ")
            return f"a list of {len(args)} {word}s"
        return "a list [" + ", ".join(_describe(arg) for arg in args) + "]"
    return getattr(annotation, "__name__", str(annotation))


def _bounds(field: FieldInfo) -> str:
    words = []
    for item in field.metadata:
        for attr, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            value = getattr(item, attr, None)
            if value is not None:
                words.append(f"{op} {value}")
    return " and ".join(words)


def _expected(field: FieldInfo) -> str:
    text = _describe(field.annotation)
    bounds = _bounds(field)
    if bounds:
        text = text.replace(" or null", "") + f" {bounds}" + (" (or null)" if _allows_none(field.annotation) else "")
    return text


def _value_at(tree: Any, parts) -> Any:
    for part in parts:
        if not isinstance(tree, dict):
            return None
        tree = tree.get(part)
    return tree


def _all_keys(model: type[BaseModel], prefix: tuple = ()) -> list[tuple]:
    """Every key path of a config class: sections and their keys, in declaration order."""
    paths = []
    for name, field in model.model_fields.items():
        paths.append(prefix + (name,))
        nested = _section_model(field.annotation)
        if nested is not None:
            paths.extend(_all_keys(nested, prefix + (name,)))
    return paths


def _suggest(model: type[BaseModel], loc: tuple) -> str | None:
    """The closest valid key for an unknown one: first a sibling (`optim.lrr` -> `optim.lr`), then the
    same or a close name anywhere (`train.lr` -> `optim.lr`, `batchsize` -> `data.batch_size`)."""
    name = loc[-1].lower()
    field, used = _field_at(model, loc[:-1]) if loc[:-1] else (None, 0)
    section = _section_model(field.annotation) if field is not None and used == len(loc) - 1 else model
    if section is not None:
        close = difflib.get_close_matches(name, list(section.model_fields), n=1, cutoff=0.6)
        if close:
            return ".".join(loc[:-1] + (close[0],))
    scored = [(difflib.SequenceMatcher(None, name, path[-1].lower()).ratio(), -i, path)
              for i, path in enumerate(_all_keys(model)) if path[:-1] != loc[:-1]]
    best = max(scored, default=None)
    return ".".join(best[2]) if best is not None and best[0] >= 0.6 else None


# A config is a few hundred values: these limits refuse YAML alias bombs, huge lists and deep nesting in one
# line, before anything expands them (validation, error messages).
MAX_VALUES = 100_000
MAX_DEPTH = 50
MAX_CONFIG_BYTES = 1 << 20


def _shown(value: Any, limit: int = 80) -> str:
    """repr(value), cut to about `limit` characters (a message must stay one readable line)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 20]}... ({len(text):,} characters)"


def _check_size(tree: Any, source: str) -> None:
    """Refuse a tree of more than MAX_VALUES values or deeper than MAX_DEPTH, counting each alias's
    expansion (walked iteratively, with a budget: a bomb is refused without being expanded)."""
    stack, count = [(tree, 0)], 0
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_VALUES:
            raise FadscaleError(f"{source}: more than {MAX_VALUES:,} values (YAML aliases counted as expanded); "
                                "a config holds a few hundred")
        if depth > MAX_DEPTH:
            raise FadscaleError(f"{source}: nested more than {MAX_DEPTH} levels deep; a config has two or three")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
            stack.extend((k, depth + 1) for k in node.keys())
        elif isinstance(node, (list, tuple)):
            stack.extend((v, depth + 1) for v in node)


def _explain(model: type[BaseModel], err: dict, tree: Any = None) -> tuple[str, str]:
    """(the key at fault, the message without its source) for one pydantic error."""
    loc = tuple(str(p) for p in err["loc"])
    if not loc:  # a check across keys (a model validator): its message says it all
        return "", err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        key = ".".join(loc)
        parent, _ = _field_at(model, loc[:-1]) if len(loc) > 1 else (None, 0)
        section = _section_model(parent.annotation) if parent is not None else model
        where = f"in {'.'.join(loc[:-1])!r}" if len(loc) > 1 else "at the top level"
        known = ", ".join(section.model_fields) if section is not None else "(none)"
        close = _suggest(model, loc)
        hint = f"; did you mean {close!r}?" if close else "."
        return key, f"unknown key {key!r} (given {_shown(err.get('input'))}){hint} Valid keys {where}: {known}"
    field, used = _field_at(model, loc)
    if field is None:  # not expected: pydantic's own words, on one line
        return ".".join(loc), f"key {'.'.join(loc)!r}: got {_shown(err.get('input'))}; {' '.join(err['msg'].split())[:200]}"
    key = ".".join(loc[:used])
    if err["type"] == "missing" and used == len(loc):
        return key, f"key {key!r} is required; expected {_expected(field)}"
    given = _value_at(tree, loc[:used]) if isinstance(tree, dict) else err.get("input")
    given_text = f"{_shown(given)} ({type(given).__name__})" if given is not None else "null"
    message = f"key {key!r}: got {given_text}; expected {_expected(field)}"
    if isinstance(given, bool) and _accepts_str(field.annotation):
        message += f" (YAML reads unquoted {_YAML_BOOL_WORDS} as true/false: quote the value)"
    return key, message


def _validate(model: type[ConfigT], tree: dict) -> ConfigT | tuple[str, str]:
    """The config, or (key, message) for the first problem."""
    tree = _fill_sections(model, tree)
    try:
        return model.model_validate(tree)
    except ValidationError as exc:
        return _explain(model, exc.errors()[0], tree)


def _fill_sections(model: type[BaseModel], tree: Any) -> Any:
    """An empty section (`data:` with every key commented out) is read as YAML null: make it {}."""
    if not isinstance(tree, dict):
        return tree
    out = dict(tree)
    for name, field in model.model_fields.items():
        nested = _section_model(field.annotation)
        if nested is not None and name in out:
            out[name] = {} if out[name] is None else _fill_sections(nested, out[name])
    return out


def build_config(model: type[ConfigT], tree: dict, source: str = "config") -> ConfigT:
    """Validate a tree of plain values; any problem is one FadscaleError line."""
    result = _validate(model, tree)
    if isinstance(result, tuple):
        raise FadscaleError(f"{source}: {result[1]}")
    return result


def with_settings(tree: dict, settings: dict[str, Any]) -> dict:
    """Library callers' overrides as keyword names `section__key=value` (e.g. train__max_steps=10),
    merged into `tree` (changed in place and returned)."""
    for name, value in settings.items():
        section, _, key = name.partition("__")
        if key:
            tree.setdefault(section, {})[key] = value
        else:
            tree[section] = value
    return tree


def parse_override(text: str, model: type[BaseModel] | None = None) -> tuple[list[str], Any]:
    """`optim.lr=2e-4` -> (["optim", "lr"], 0.0002). Values are parsed as YAML scalars/lists, except for
    a text field of `model` (a path, a Literal of words), which takes the text as given: `--set
    train.mixed_precision=no` is "no", not false, and `--set run.out_dir=2024` is "2024"."""
    if "=" not in text:
        raise FadscaleError(f"--set {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise FadscaleError(f"--set {text!r}: expected section.key=value")
    field, used = _field_at(model, parts) if model is not None else (None, 0)
    if field is not None and used == len(parts) and _accepts_str(field.annotation):
        value = raw.strip()
        if value in _NULLS and _allows_none(field.annotation):
            return parts, None
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        return parts, value
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    except RecursionError:
        raise FadscaleError(f"--set {key.strip()}: the value is nested too deeply to read") from None
    if isinstance(value, str) and _FLOAT_WITHOUT_DOT.match(value):
        value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as text
    return parts, value


def _apply_override(tree: dict, parts: list[str], value: Any) -> None:
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise FadscaleError(f"--set {'.'.join(parts)}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key given twice in one mapping (PyYAML silently keeps the last)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r}", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"line {mark.line + 1}: {problem}" if mark is not None else problem


def load_config(model: type[ConfigT], path: str | Path | None, overrides: list[str] | None = None) -> ConfigT:
    """Read YAML `path` (or start from defaults when None), apply `section.key=value` overrides, validate."""
    tree: dict = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.exists():
            raise FadscaleError(f"{path}: config file not found")
        if not path.is_file():
            raise FadscaleError(f"{path}: not a file (expected a YAML config file)")
        if path.stat().st_size > MAX_CONFIG_BYTES:  # PyYAML would take minutes over a file of many MB
            raise FadscaleError(f"{path}: {path.stat().st_size:,} bytes; a config file is a few KB (at most "
                                f"{MAX_CONFIG_BYTES:,} bytes are read)")
        try:
            loaded = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
        except yaml.YAMLError as exc:
            raise FadscaleError(f"{path}: not valid YAML ({_yaml_problem(exc)})") from None
        except UnicodeDecodeError:
            raise FadscaleError(f"{path}: not a text file (expected a YAML config file)") from None
        except RecursionError:
            raise FadscaleError(f"{path}: nested too deeply to read (a config has two or three levels)") from None
        _check_size(loaded, str(path))
        if loaded is not None and not isinstance(loaded, dict):
            raise FadscaleError(f"{path}: expected a mapping of sections, got {type(loaded).__name__}")
        tree = loaded or {}
    parsed = []
    for text in overrides or []:
        parts, value = parse_override(text, model)
        _check_size(value, f"--set {text[:60]}")
        _apply_override(tree, parts, value)
        parsed.append((".".join(parts), text))
    result = _validate(model, tree)
    if not isinstance(result, tuple):
        return result
    key, message = result
    # Name the --set that caused it, when one did (the last one given for that key or a key around it).
    for dotted, text in reversed(parsed):
        if key and (key == dotted or key.startswith(dotted + ".") or dotted.startswith(key + ".")):
            raise FadscaleError(f"--set {text}: {message}")
    raise FadscaleError(f"{source}: {message}")


def dump_config(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def save_config(config: BaseModel, path: str | Path) -> None:
    """Every run saves its effective config (after overrides) beside its outputs; `load_config` reads it back."""
    atomic_write_text(path, dump_config(config))


def describe_config(model: type[BaseModel]) -> str:
    """Every key of a config class with its default and description: a YAML file `load_config` reads."""
    lines: list[str] = []

    def walk(value: BaseModel, indent: str) -> None:
        for name, field in type(value).model_fields.items():
            item = getattr(value, name)
            if isinstance(item, BaseModel):
                lines.append(f"{indent}{name}:")
                walk(item, indent + "  ")
                continue
            text = yaml.safe_dump(list(item) if isinstance(item, tuple) else item, default_flow_style=True)
            text = text.split("\n...")[0].strip()
            lines.append(f"{indent}{name}: {text}" + (f"  # {field.description}" if field.description else ""))

    walk(model(), "")
    return "\n".join(lines) + "\n"
