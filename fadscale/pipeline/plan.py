"""The whole pipeline in one process: shard -> alignment expert (split A) and evaluator (split B) ->
feature cache -> vanilla and FAD training -> sampling -> evaluation.

Each stage is the library function its own command runs (`shard_dataset`, `train_expert.train`,
`build_cache`, `fad_trainer`, `sample_images`, `evaluate`), configured from `configs/tiny/` with the
paths pointed into one output folder. `fadscale demo` and `tools/bench_quality.py` are built on it.

Two layers: `run_pipeline(plan)` runs everything once. The bench reuses the parts: `prepare(plan)` runs
the shared stages (shard, both experts, the feature cache(s)) once, then `run_arm(plan, prepared, arm,
seed=...)` trains, samples and evaluates one arm with one seed; `sample_run` and `evaluate_run` sample
and score an already trained run again (another sampler, say).
"""

from __future__ import annotations

import multiprocessing
import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Callable

from fadscale.config import ExpertConfig, FadConfig, load_config
from fadscale.resources import shipped
from fadscale.errors import FadscaleError
from fadscale.runtime.logging import log_line

def tiny_config(model, name: str, overrides: list[str], recipe: str = "tiny"):
    """A CPU-sized config of configs/<recipe>/ (shipped with the package) with overrides."""
    path = shipped("configs") / recipe / name
    if not path.is_file():
        raise FadscaleError(f"{path}: missing from this installation of fadscale; reinstall it")
    return load_config(model, path, overrides)


def recipe_steps(recipe: str = "tiny") -> int:
    """Training steps of a recipe (configs/tiny's: what the demo trains and bench_quality's cpu preset runs)."""
    return tiny_config(FadConfig, "fad.yaml", [], recipe).train.max_steps


@dataclass
class Plan:
    """What one pipeline run does; every path lives under `out`."""

    out: Path
    source: str = "procedural:per_class=64,size=32,seed=0"
    recipe: str = "tiny"  # the configs/ folder: tiny (procedural, grayscale) or kather16 (real RGB tiles)
    channels: int = 1
    val_fraction: float = 0.2
    test_fraction: float = 0.0  # a test part scored by the evaluation (split auto) and chosen on by nothing
    image_size: int = 32
    seed: int = 0
    arms: dict[str, list[str]] = field(default_factory=lambda: {
        "vanilla": ["align.enabled=false"], "fad": ["align.enabled=true"]})
    expert_overrides: list[str] = field(default_factory=list)
    alignment_expert_overrides: list[str] = field(default_factory=list)  # expert A only (e.g. a larger input)
    evaluator_overrides: list[str] = field(default_factory=list)  # expert B only (e.g. trained longer: a stronger judge)
    fad_overrides: list[str] = field(default_factory=list)
    per_class: int = 32
    eval_every: int | None = None  # learning-curve points (eval.every), scored by the split-B evaluator
    sample_overrides: list[str] = field(default_factory=list)  # "section.key=value", as --set takes them
    eval_overrides: list[str] = field(default_factory=list)
    arm_processes: int | None = None  # arms trained at once; None: one per arm on a CPU-only machine (arm_processes)


@dataclass
class Prepared:
    """What `prepare` built, shared by every arm and seed: the shards, both experts and the caches
    (one folder per distinct cache fingerprint the arms need: pooled-only, and with spatial maps)."""

    out: Path
    shards: Path
    alignment_expert: Path
    evaluator: Path
    caches: dict[bool, Path] = field(default_factory=dict)  # spatial? -> cache folder


class StageClock:
    """One progress line per stage, with the elapsed time and an ETA from the expected stage costs."""

    def __init__(self, expected: dict[str, float]):
        self.expected = expected
        self.timings: dict[str, float] = {}
        self.started = time.perf_counter()

    def run(self, name: str, fn: Callable):
        done = sum(self.expected.get(k, 0) for k in self.timings)
        total = sum(self.expected.values())
        elapsed = time.perf_counter() - self.started
        # Scale the remaining expected cost by how fast the finished stages went compared with expectation
        # (damped, so one quick first stage does not promise a quick run).
        damping = 0.2 * total
        if total > 0:
            eta = max(0.0, total - done) * (elapsed + damping) / (done + damping)
            log_line(f"[{len(self.timings) + 1}/{len(self.expected)}] {name} "
                     f"(elapsed {elapsed:.0f} s, ETA ~{eta:.0f} s)")
        else:  # no expected costs given: count and elapsed time only
            log_line(f"[{len(self.timings) + 1}] {name} (elapsed {elapsed:.0f} s)")
        start = time.perf_counter()
        result = fn()
        self.timings[name] = time.perf_counter() - start
        return result


# ------------------------------------------------------------------------------------------ configs


def _cache_dir(out: Path, spatial: bool) -> Path:
    return out / ("cache-spatial" if spatial else "cache")


def arm_overrides(plan: Plan, arm: str, extra: list[str] | None = None, *, seed: int | None = None,
                  tag: str | None = None, alignment: Path | None = None) -> list[str]:
    """The overrides of configs/<recipe>/fad.yaml that make one arm: its run folder `out/<tag>` (tag
    defaults to the arm's name), the plan's settings, the arm's own, and the cache folder its fingerprint
    needs (`out/cache`, or `out/cache-spatial` when it aligns to spatial maps)."""
    from fadscale.config import needs_spatial

    out = plan.out
    extra = plan.arms.get(arm, []) if extra is None else extra
    alignment = alignment if alignment is not None else out / "expert-A" / "expert.json"
    curves = [f"eval.every={plan.eval_every}", f"eval.evaluator={out / 'expert-B' / 'expert.json'}"] \
        if plan.eval_every else []
    overrides = [f"run.out_dir={out / (tag or arm)}", f"data.shards={out / 'shards'}", f"expert={alignment}",
                 f"data.image_size={plan.image_size}", f"data.channels={plan.channels}",
                 f"run.seed={plan.seed if seed is None else seed}",
                 *curves, *plan.fad_overrides, *extra]
    # The cache folder follows from the settings (an explicit cache.dir among the overrides wins).
    if not any(o.startswith("cache.dir=") for o in [*plan.fad_overrides, *extra]):
        spatial = needs_spatial(tiny_config(FadConfig, "fad.yaml", overrides, plan.recipe))
        overrides.insert(3, f"cache.dir={_cache_dir(out, spatial)}")
    return overrides


def arm_config(plan: Plan, arm: str, extra: list[str] | None = None, *, seed: int | None = None,
               tag: str | None = None, alignment: Path | None = None) -> FadConfig:
    """The FadConfig of one arm (`arm_overrides` on configs/<recipe>/fad.yaml)."""
    return tiny_config(FadConfig, "fad.yaml", arm_overrides(plan, arm, extra, seed=seed, tag=tag,
                                                            alignment=alignment), plan.recipe)


def expert_overrides(plan: Plan, subset: str) -> list[str]:
    """The overrides of configs/<recipe>/expert.yaml for the alignment expert (A) or the evaluator (B)."""
    own = plan.alignment_expert_overrides if subset == "A" else plan.evaluator_overrides
    return [f"run.out_dir={plan.out / f'expert-{subset}'}", f"data.shards={plan.out / 'shards'}",
            f"data.subset={subset}", f"data.image_size={plan.image_size}", f"model.input_size={plan.image_size}",
            f"data.channels={plan.channels}", f"run.seed={plan.seed}", *plan.expert_overrides, *own]


def sample_overrides(plan: Plan, seed: int | None = None, overrides: list[str] = ()) -> list[str]:
    """The sample settings of one arm (over the schema's defaults; the run and output folders aside)."""
    return [f"run.seed={plan.seed if seed is None else seed}", "run.overwrite=true",
            f"sample.per_class={plan.per_class}", *plan.sample_overrides, *overrides]


def evaluate_overrides(plan: Plan, seed: int | None = None, overrides: list[str] = ()) -> list[str]:
    """The evaluate settings of one arm (over the schema's defaults; samples, evaluator and folder aside)."""
    return ["run.overwrite=true", f"run.seed={plan.seed if seed is None else seed}", *plan.eval_overrides,
            *overrides]


def stage_commands(plan: Plan) -> list[str]:
    """What `run_pipeline(plan)` does, as the commands a user would type: built from the same override lists
    the pipeline's stages use, so the two cannot drift apart."""
    out = plan.out

    def command(words: list[str], overrides: list[str]) -> str:
        sets = [f"--set {shlex.quote(o)}" for o in overrides]
        return " \\\n    ".join([shlex.join(words), *sets])

    grey = ["--grayscale"] if plan.channels == 1 else []
    lines = [shlex.join(["fadscale", "shard-data", plan.source, "--out", str(out / "shards"), *grey,
                         "--val-fraction", str(plan.val_fraction), "--test-fraction", str(plan.test_fraction),
                         "--seed", str(plan.seed)])]
    for subset in ("A", "B"):
        lines.append(command(["fadscale", "train-expert", "--config", str(shipped("configs") / plan.recipe / "expert.yaml")],
                             expert_overrides(plan, subset)))
    for arm in plan.arms:
        lines.append(command(["fadscale", "train", "--config", str(shipped("configs") / plan.recipe / "fad.yaml")],
                             arm_overrides(plan, arm)))
        lines.append(command(["fadscale", "sample"], [f"model.path={out / arm}", f"run.out_dir={out / f'samples-{arm}'}",
                                                      *sample_overrides(plan)]))
        lines.append(command(["fadscale", "evaluate"], [f"samples={out / f'samples-{arm}'}",
                                                        f"evaluator.card={out / 'expert-B' / 'expert.json'}",
                                                        f"run.out_dir={out / f'eval-{arm}'}", *evaluate_overrides(plan)]))
    return lines


def cache_configs(plan: Plan, arms: dict[str, list[str]] | None = None) -> dict[Path, FadConfig]:
    """One config per distinct cache folder the arms read (in first-use order)."""
    from fadscale.config import needs_spatial, uses_cache

    wanted: dict[Path, FadConfig] = {}
    for arm, extra in (plan.arms if arms is None else arms).items():
        cfg = arm_config(plan, arm, extra)
        if uses_cache(cfg):
            wanted.setdefault(Path(cfg.cache.dir), cfg)
    if not wanted:  # no arm reads a cache: build the pooled one anyway (cheap, and the demo expects it)
        cfg = arm_config(plan, "fad", ["align.enabled=true"])
        wanted[Path(cfg.cache.dir)] = cfg
    return {path: cfg for path, cfg in sorted(wanted.items(), key=lambda kv: needs_spatial(kv[1]))}


def _cache_stage(path: Path) -> str:
    return "feature cache (spatial)" if path.name == "cache-spatial" else "feature cache"


def prepare_stage_names(plan: Plan, arms: dict[str, list[str]] | None = None) -> list[str]:
    return ["shard", "expert A (alignment)", "expert B (evaluator)",
            *(_cache_stage(p) for p in cache_configs(plan, arms))]


def arm_stage_names(tag: str) -> list[str]:
    return [f"train {tag}", f"sample {tag}", f"evaluate {tag}"]


def stage_names(plan: Plan) -> list[str]:
    names = prepare_stage_names(plan)
    for arm in plan.arms:
        names += arm_stage_names(arm)
    return names


# ------------------------------------------------------------------------------------------ stages


def prepare(plan: Plan, clock: StageClock | None = None, arms: dict[str, list[str]] | None = None) -> Prepared:
    """The stages every arm and seed share: shard, alignment expert (A), evaluator (B), and the feature
    cache(s) the arms (`arms`, default the plan's) read."""
    from fadscale.cache_features import build_cache
    from fadscale.config import needs_spatial
    from fadscale.data.shard import shard_dataset
    from fadscale.train_expert import train as train_expert

    out = plan.out
    out.mkdir(parents=True, exist_ok=True)
    clock = clock or StageClock({name: 1.0 for name in prepare_stage_names(plan, arms)})
    shards = out / "shards"
    clock.run("shard", lambda: shard_dataset(plan.source, shards, grayscale=plan.channels == 1,
                                             val_fraction=plan.val_fraction, test_fraction=plan.test_fraction,
                                             seed=plan.seed, progress=False, overwrite=True))

    def expert(subset: str) -> Path:
        cfg = tiny_config(ExpertConfig, "expert.yaml", expert_overrides(plan, subset), plan.recipe)
        train_expert(cfg)
        return Path(cfg.run.out_dir) / "expert.json"

    alignment = clock.run("expert A (alignment)", lambda: expert("A"))
    evaluator = clock.run("expert B (evaluator)", lambda: expert("B"))
    caches = {}
    for path, cfg in cache_configs(plan, arms).items():
        clock.run(_cache_stage(path), lambda: build_cache(cfg))
        caches[needs_spatial(cfg)] = path
    return Prepared(out, shards, alignment, evaluator, caches)


def train_run(plan: Plan, prepared: Prepared, arm: str, extra: list[str] | None = None, *,
              seed: int | None = None, tag: str | None = None) -> Path:
    """Train one arm; returns its run folder."""
    from fadscale.train_fad import fad_trainer

    cfg = arm_config(plan, arm, extra, seed=seed, tag=tag, alignment=prepared.alignment_expert)
    trainer = fad_trainer(cfg)
    trainer.run()
    if trainer.stopped:  # a stop request checkpoints and returns: its final/ is missing or an earlier run's
        raise FadscaleError(f"{cfg.run.out_dir}: training stopped at step {trainer.state['step']} of "
                            f"{cfg.train.max_steps} (a stop was requested); the same command resumes it")
    return Path(cfg.run.out_dir)


def _settings(overrides: list[str], model) -> dict:
    """"section.key=value" strings (the one override syntax of configs, --set and Plan) as the section__key
    keywords of the library entry points, each value parsed as --set parses it."""
    from fadscale.config import parse_override

    return {"__".join(parts): value for parts, value in (parse_override(text, model) for text in overrides)}


def sample_run(plan: Plan, run_dir: Path, samples_dir: Path, *, seed: int | None = None,
               overrides: list[str] = ()) -> dict:
    """Sample a trained run into `samples_dir` (the plan's sampler settings, then `overrides`); returns
    the sample manifest."""
    from fadscale.config import SampleConfig
    from fadscale.sample import sample_config, sample_images

    settings = _settings(sample_overrides(plan, seed, overrides), SampleConfig)
    return sample_images(sample_config(run_dir, samples_dir, **settings))


def evaluate_run(plan: Plan, prepared: Prepared, samples_dir: Path, eval_dir: Path, *, seed: int | None = None,
                 overrides: list[str] = ()) -> dict:
    """Score a sample set with the split-B evaluator; returns the report."""
    from fadscale.config import EvaluateConfig
    from fadscale.evaluate import evaluate_samples

    settings = _settings(evaluate_overrides(plan, seed, overrides), EvaluateConfig)
    return evaluate_samples(samples_dir, prepared.evaluator, eval_dir, **settings)


def run_arm(plan: Plan, prepared: Prepared, arm: str, extra: list[str] | None = None, *, seed: int | None = None,
            tag: str | None = None, clock: StageClock | None = None) -> dict:
    """Train, sample and evaluate one arm with one seed (training, sampling and evaluation all use it).
    Folders: `out/<tag>`, `out/samples-<tag>`, `out/eval-<tag>`; tag defaults to the arm's name.
    Returns {"run", "samples", "manifest", "report", "timings"}."""
    tag = tag or arm
    out = plan.out
    clock = clock or StageClock({name: 1.0 for name in arm_stage_names(tag)})
    before = dict(clock.timings)
    run_dir = clock.run(f"train {tag}", lambda: train_run(plan, prepared, arm, extra, seed=seed, tag=tag))
    sampled = out / f"samples-{tag}"
    manifest = clock.run(f"sample {tag}", lambda: sample_run(plan, run_dir, sampled, seed=seed))
    report = clock.run(f"evaluate {tag}", lambda: evaluate_run(plan, prepared, sampled, out / f"eval-{tag}",
                                                                 seed=seed))
    timings = {k: v for k, v in clock.timings.items() if k not in before}
    return {"run": run_dir, "samples": sampled, "manifest": manifest, "report": report, "timings": timings}


def arm_processes(plan: Plan) -> int:
    """How many processes train the arms at once: one per arm on a machine without a GPU that has a core for
    each, else 1. A small UNet uses one core well and a second one poorly, so two arms side by side at one
    thread each finish well before the same two one after the other at two threads
    (docs/results/real-tiles.md, "Arms side by side")."""
    import torch

    from fadscale.runtime.distributed import cpu_threads

    if plan.arm_processes is not None:
        return max(1, min(plan.arm_processes, len(plan.arms)))
    if len(plan.arms) < 2 or torch.cuda.is_available():
        return 1
    return min(len(plan.arms), cpu_threads())


def _arm_in_own_process(result: Connection, parent: int, threads: int, expected: dict[str, float], plan: Plan,
                        prepared: Prepared, arm: str, extra: list[str]) -> None:
    """run_arm in a fresh (spawned) process with `threads` torch threads; sends ("ok", result) or ("error",
    exception) through `result`, then the process ends."""
    _stop_with_parent(parent)
    try:
        from fadscale.runtime.distributed import set_cpu_threads

        set_cpu_threads(threads)
        clock = StageClock({name: expected.get(name, 1.0) for name in arm_stage_names(arm)})
        outcome = ("ok", run_arm(plan, prepared, arm, extra, clock=clock))
    except BaseException as exc:  # noqa: BLE001 - every failure goes to the parent, which raises it
        outcome = ("error", exc)
    try:
        result.send(outcome)
    except Exception as exc:  # an exception that does not pickle: its text goes instead
        result.send(("error", FadscaleError(f"the {arm} arm failed: {type(exc).__name__}: {outcome[1]}")))


def _stop_with_parent(parent: int) -> None:
    """Ask Linux for SIGTERM when the demo's process (`parent`) dies, however it dies (the trainer then
    checkpoints and the arm's process ends), so that no arm goes on writing into the demo's folder alone."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the request was made
        os.kill(os.getpid(), signal.SIGTERM)


def run_arms(plan: Plan, prepared: Prepared, clock: StageClock) -> dict[str, dict]:
    """Every arm of the plan (`run_arm`): one after the other, or side by side (`arm_processes`), each in
    its own process with an equal share of the cores. The first arm to fail is raised at once, and the
    others are stopped rather than waited for."""
    processes = arm_processes(plan)
    if processes == 1:
        return {arm: run_arm(plan, prepared, arm, extra, clock=clock) for arm, extra in plan.arms.items()}
    from multiprocessing.connection import wait

    from fadscale.runtime.distributed import cpu_threads

    threads = max(1, cpu_threads() // processes)
    log_line(f"{' and '.join(plan.arms)} side by side: {processes} processes, {threads} torch thread(s) each "
             f"(elapsed {time.perf_counter() - clock.started:.0f} s)")
    context = multiprocessing.get_context("spawn")
    running: dict[str, tuple] = {}
    results: dict[str, dict] = {}
    # Thread pools that read the environment when they start (OpenMP, BLAS) get the same share.
    saved = {name: os.environ.get(name) for name in THREAD_VARIABLES}
    try:
        os.environ.update({name: str(threads) for name in THREAD_VARIABLES})
        try:
            for arm, extra in plan.arms.items():
                receive, send = context.Pipe(duplex=False)
                process = context.Process(target=_arm_in_own_process, name=f"fadscale-arm-{arm}", args=(
                    send, os.getpid(), threads, clock.expected, plan, prepared, arm, extra))
                process.start()
                send.close()
                running[arm] = (process, receive)
        finally:
            _restore(saved)
        while len(results) < len(running):
            waiting = {receive: arm for arm, (_, receive) in running.items() if arm not in results}
            waiting.update({process.sentinel: arm for arm, (process, _) in running.items() if arm not in results})
            for ready in wait(list(waiting)):
                arm = waiting[ready]
                if arm not in results:
                    results[arm] = _arm_result(arm, *running[arm])
    finally:
        for process, _ in running.values():
            if process.is_alive():
                process.terminate()  # the trainer checkpoints and the process ends
        for process, _ in running.values():
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
                process.join()
    for arm in plan.arms:
        clock.timings.update(results[arm]["timings"])
    return results


def _arm_result(arm: str, process, receive: Connection) -> dict:
    """What an arm's process sent: its result, or its exception raised here; an error naming the arm when the
    process ended without a word (killed, or crashed hard)."""
    try:
        status, payload = receive.recv() if receive.poll() else ("gone", None)
    except EOFError:  # the pipe closed with nothing in it
        status, payload = "gone", None
    if status == "gone":
        process.join()
        raise FadscaleError(f"the {arm} arm's process ended without a result (exit code {process.exitcode})")
    if status == "error":
        raise payload
    return payload


THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "FADSCALE_THREADS")


def _restore(saved: dict[str, str | None]) -> None:
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def run_pipeline(plan: Plan, expected: dict[str, float] | None = None) -> dict:
    """Run every stage; returns paths, per-arm reports and timings (each stage's own; arms that ran side by
    side overlap)."""
    clock = StageClock(expected or {name: 1.0 for name in stage_names(plan)})
    prepared = prepare(plan, clock)
    reports = {arm: result["report"] for arm, result in run_arms(plan, prepared, clock).items()}
    return {"out": plan.out, "recipe": plan.recipe, "source": plan.source, "shards": prepared.shards,
            "alignment_expert": prepared.alignment_expert, "evaluator": prepared.evaluator, "reports": reports,
            "timings": clock.timings, "commands": stage_commands(plan), "arm_processes": arm_processes(plan)}
