"""`fadscale`: the command-line tool over every stage. Thin: each command calls one library function.

Multi-process stages are started through their launcher (torchrun / accelerate launch) with the
same `python -m fadscale.<stage> --config F --set k=v` entry points that clusters use.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Optional

import typer

from fadscale import __version__
from fadscale.errors import FadscaleError
from fadscale.runtime.io import disk_full_message, file_error

app = typer.Typer(
    name="fadscale",
    help="Feature-aligned diffusion (FAD) for synthetic histology tiles: shard data, train the expert, "
    "cache its features, train FAD or the plain fine-tuning baseline, sample, evaluate, and submit to SLURM.\n\n"
    "Start with `fadscale demo`: the whole pipeline on built-in tiles, on a CPU, in minutes.",
    no_args_is_help=True,
    add_completion=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)

def set_option(example: str):
    """The repeatable --set option, with an example key of the command's own config."""
    return typer.Option(None, "--set", help=f"Override a config value: --set {example} (repeatable).")
ConfigOption = typer.Option(None, "--config", "-c", help="YAML config file (see configs/).")


def _fail(exc: FadscaleError) -> None:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(2)


@contextlib.contextmanager
def _one_line_errors(output: Path):
    """In-process commands: a FadscaleError, or a write that failed for want of space under `output`, is one
    line and exit code 2."""
    try:
        yield
    except FadscaleError as exc:
        _fail(exc)
    except (typer.Exit, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - only a full disk is turned into a line; the rest is re-raised
        line = disk_full_message(exc, output)
        if line is None:
            raise
        _fail(FadscaleError(line))


def _launch(command: str, config: Optional[Path], overrides: list[str] | None, nproc: int,
            extra: list[str] = ()) -> None:
    """Run the stage's module (nproc 1) or under its launcher (nproc > 1); exit with its code."""
    raise typer.Exit(_run_stage(command, config, overrides, nproc, extra))


def _checked(command: str, config: Optional[Path], overrides: list[str] | None):
    """The stage's config, validated here (pydantic and yaml only: a typo is answered in a second, before
    the stage's process imports torch and diffusers)."""
    from fadscale.config import load_config
    from fadscale.stages import config_class, stage

    try:
        return load_config(config_class(stage(command)), config, list(overrides or []))
    except FadscaleError as exc:
        _fail(exc)


def _run_stage(command: str, config: Optional[Path], overrides: list[str] | None, nproc: int,
               extra: list[str] = ()) -> int:
    """The stage's `python -m <module>` in a child process (under its launcher when nproc > 1); its exit code."""
    from fadscale.stages import stage

    cfg = _checked(command, config, overrides)
    spec = stage(command)
    args = (["--config", str(config)] if config else []) + [a for o in overrides or [] for a in ("--set", o)]
    args += list(extra)
    if nproc <= 1:
        cmd = [sys.executable, "-m", spec.module, *args]
    elif spec.launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", spec.module, *args]
    else:  # accelerate on CPU needs --multi_gpu for several processes (--cpu forces one)
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", f"--num_processes={nproc}",
               "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no", "-m", spec.module, *args]
    # The stage runs in its own process group, which gets every stop signal the CLI gets (Ctrl-C as
    # SIGTERM: the trainers checkpoint and exit 0 on it), and dies with the CLI (PR_SET_PDEATHSIG), so
    # killing `fadscale` never leaves a stage running unseen.
    child = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True,
                             preexec_fn=_die_with_parent())

    def forward(signum, _frame):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGTERM if signum == signal.SIGINT else signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    try:
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code < 0:  # ended by a signal: without this line the user sees nothing at all
        # On a line of its own: the killed stage's progress bar may have left its line unfinished.
        typer.echo(f"\nerror: {_killed_message(command, cfg, -code)}", err=True)
        return 128 - code
    return code


def _killed_message(command: str, cfg, signum: int) -> str:
    """What ended the stage, what that usually means, and where its run stands."""
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    meaning = {
        signal.SIGKILL: "usually the kernel's out-of-memory killer (see `dmesg`): lower data.batch_size or "
                        "data.workers, or use a machine with more memory",
        signal.SIGSEGV: "a crash inside a native library",
        signal.SIGBUS: "often a full /dev/shm (DataLoader workers): lower data.workers",
    }.get(signum, "sent by another process or the system")
    if command in ("train", "train-expert"):
        from fadscale.training.checkpoint import list_checkpoints

        found = list_checkpoints(Path(cfg.run.out_dir) / "checkpoints")
        state = (f"{cfg.run.out_dir} keeps its checkpoint of step {found[-1][0]}: the same command resumes from it"
                 if found else f"{cfg.run.out_dir} has no checkpoint yet: the same command starts over")
    else:
        state = "its output was not written (nothing half-written is left in its place): run it again"
    return f"`fadscale {command}` was ended by {name} ({meaning}); {state}"


def _die_with_parent():
    """A preexec function asking Linux to SIGTERM the child when the CLI dies (None elsewhere)."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here: the forked child only calls it
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@app.callback(invoke_without_command=True)
def _root(version: bool = typer.Option(False, "--version", help="Print the version and exit."),
          threads: Optional[int] = typer.Option(
              None, "--threads", min=1, envvar="FADSCALE_THREADS",
              help="Torch CPU threads per process (default: the CPUs available / processes per node).")) -> None:
    if version:
        typer.echo(f"fadscale {__version__}")
        raise typer.Exit(0)
    if threads is not None:  # the stages run in child processes too: they read it from the environment
        os.environ["FADSCALE_THREADS"] = str(threads)


@app.command("shard-data")
def shard_data(
    src: str = typer.Argument(..., help="A class-per-folder tree, a zip of one, 'procedural[:per_class=N,size=S,seed=K]', "
                              "or a data set to download: 'kather16' (Kather 2016, Zenodo 53169; cached, md5-checked)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (created; must not exist unless --overwrite)."),
    val_fraction: float = typer.Option(0.1, help="Fraction of each class put in the val split (choices: epochs, settings)."),
    test_fraction: float = typer.Option(0.0, help="Fraction of each class put in a test split that is only scored "
                                        "(`fadscale evaluate` scores it when present); 0.2 for real-tile work."),
    seed: int = typer.Option(0, help="Seed of the stratified train/val split."),
    grayscale: bool = typer.Option(False, "--grayscale", help="Store tiles as 8-bit grayscale (L) instead of RGB."),
    shard_samples: int = typer.Option(1000, help="At most this many tiles per shard."),
    shard_mb: int = typer.Option(256, help="At most this many MiB per shard."),
    workers: int = typer.Option(1, help="Parallel decoding processes."),
    strict: bool = typer.Option(False, "--strict", help="Fail on any unreadable file instead of skipping it."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder (only once the new one is complete)."),
    url: Optional[str] = typer.Option(None, "--url", help="Named data set only: download from this mirror instead."),
    md5: Optional[str] = typer.Option(None, "--md5", help="Named data set only: the md5 the download must have (default: the published one)."),
    cache_dir: Optional[Path] = typer.Option(
        None, "--cache-dir", help="Named data set only: where downloads are kept (default: $FADSCALE_CACHE, else ~/.cache/fadscale)."),
) -> None:
    """Turn raw tiles into WebDataset shards with a stratified train/val split and a manifest.

    `kather16` downloads the published Kather 2016 zip once (md5-checked, kept in the cache), then shards it.

    Example: fadscale shard-data kather16 --out data/kather16
    """
    from fadscale.data.download import DATASETS, fetch, is_named_dataset
    from fadscale.data.shard import shard_dataset, summary_line

    with _one_line_errors(out):
        if is_named_dataset(src) and not Path(src).exists():
            if out.exists() and not overwrite:  # before a download of hundreds of MB, not after
                raise FadscaleError(f"{out}: output already exists (pass --overwrite to replace it)")
            src = str(fetch(src, url=url, md5=md5, cache_dir=cache_dir))
        elif url is not None or md5 is not None or cache_dir is not None:
            raise FadscaleError(f"--url, --md5 and --cache-dir apply to a data set to download "
                                f"({', '.join(sorted(DATASETS))}), not to {src}")
        manifest = shard_dataset(src, out, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed, grayscale=grayscale,
                                 max_samples_per_shard=shard_samples, max_shard_bytes=shard_mb * 2**20,
                                 workers=workers, strict=strict, overwrite=overwrite)
    typer.echo(summary_line(manifest, out))


@app.command("tiles")
def tiles(
    out: Path = typer.Option(Path("tiles.png"), "--out", "-o", help="PNG file to write."),
    size: int = typer.Option(64, help="Tile size in pixels."),
    per_class: int = typer.Option(6, help="Tiles per class (one row per class)."),
    seed: int = typer.Option(0, help="Generator seed."),
    grayscale: bool = typer.Option(False, "--grayscale", help="Grayscale tiles."),
) -> None:
    """Write a contact sheet of the built-in procedural tiles (one row per class).

    Example: fadscale tiles --out sheet.png --size 128
    """
    from fadscale.data.procedural import contact_sheet

    contact_sheet(out, per_class=per_class, size=size, seed=seed, grayscale=grayscale)
    typer.echo(f"wrote {out}")


@app.command("train-expert")
def train_expert(
    config: Optional[Path] = ConfigOption,
    overrides: Optional[list[str]] = set_option("train.epochs=4"),
    nproc: int = typer.Option(1, help="Processes on this machine; > 1 runs torchrun."),
) -> None:
    """Train the expert classifier (timm backbone, raw PyTorch DDP); writes expert.safetensors + expert.json.

    Example: fadscale train-expert --config configs/tiny/expert.yaml --nproc 2 --set data.subset=B
    """
    _launch("train-expert", config, overrides, nproc)


@app.command("cache-features")
def cache_features(
    config: Optional[Path] = ConfigOption,
    overrides: Optional[list[str]] = set_option("cache.batch_size=128"),
    nproc: int = typer.Option(1, help="Processes on this machine; > 1 runs accelerate launch."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Rebuild every shard of the cache."),
) -> None:
    """Precompute expert features (8 views per tile) and class conditioning for a FAD config.

    Example: fadscale cache-features --config configs/fad.yaml
    """
    _launch("cache-features", config, overrides, nproc, ["--overwrite"] if overwrite else [])


@app.command("train")
def train(
    config: Optional[Path] = ConfigOption,
    overrides: Optional[list[str]] = set_option("train.max_steps=200"),
    nproc: int = typer.Option(1, help="Processes on this machine; > 1 runs accelerate launch."),
) -> None:
    """Train FAD (or the plain fine-tuning baseline with align.enabled=false); builds the feature cache first if missing.

    Example: fadscale train --config configs/tiny/fad.yaml --nproc 2
    (the same as: fadscale cache-features ... when the cache is missing, then
    accelerate launch -m fadscale.train_fad --config configs/tiny/fad.yaml)
    """
    from fadscale.config import uses_cache

    cfg = _checked("train", config, overrides)
    if uses_cache(cfg) and not (Path(cfg.cache.dir) / "manifest.json").is_file():
        typer.echo(f"feature cache {cfg.cache.dir} missing: building it first", err=True)
        code = _run_stage("cache-features", config, overrides, nproc)
        if code != 0:
            raise typer.Exit(code)
    _launch("train", config, overrides, nproc)


@app.command("sample")
def sample(
    config: Optional[Path] = ConfigOption,
    overrides: Optional[list[str]] = set_option("sample.per_class=100"),
    nproc: int = typer.Option(1, help="Processes on this machine; > 1 runs accelerate launch."),
) -> None:
    """Generate tiles per class from a trained run (EMA weights by default).

    Example: fadscale sample --config configs/tiny/sample.yaml --set sample.per_class=16
    """
    _launch("sample", config, overrides, nproc)


@app.command("evaluate")
def evaluate(
    config: Optional[Path] = ConfigOption,
    overrides: Optional[list[str]] = set_option("utility.enabled=false"),
) -> None:
    """Score generated tiles: generation accuracy, SSIM diversity, feature-space distances, utility.

    Example: fadscale evaluate --config configs/tiny/evaluate.yaml
    """
    _launch("evaluate", config, overrides, 1)


@app.command("export")
def export(
    run: Path = typer.Argument(..., help="A trained run folder (or its final/ folder)."),
    out: Path = typer.Option(..., "--out", "-o", help="The pipeline folder to write (must not exist unless --overwrite)."),
    weights: str = typer.Option("ema", help="ema (the EMA weights, what `fadscale sample` uses) or raw."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier export (only once the new one is complete)."),
    scheduler: str = typer.Option("dpm++", help="The pipeline's sampler: dpm++, dpm++-sde (the real-tile recipe's), ddim or ddpm."),
) -> None:
    """Write a run as a diffusers pipeline folder: DiffusionPipeline.from_pretrained(OUT, trust_remote_code=True).

    Example: fadscale export demo-out/fad --out exported/fad-demo
    """
    from fadscale.export import export_run

    with _one_line_errors(out):
        typer.echo(export_run(run, out, weights=weights, overwrite=overwrite, scheduler=scheduler))


@app.command("submit")
def submit(
    stage: str = typer.Argument(..., help="train-expert (or expert), cache-features (or cache), train or sample."),
    config: Path = typer.Option(..., "--config", "-c", help="The stage's YAML config."),
    nodes: int = typer.Option(1, help="Nodes."),
    gpus_per_node: int = typer.Option(1, help="GPUs per node (processes per node with --cpu)."),
    partition: Optional[str] = typer.Option(None, help="SLURM partition."),
    time: Optional[str] = typer.Option(None, help="Time limit, e.g. 04:00:00."),
    account: Optional[str] = typer.Option(None, help="SLURM account."),
    qos: Optional[str] = typer.Option(None, help="SLURM QOS."),
    constraint: Optional[str] = typer.Option(None, help="SLURM node constraint."),
    cpu: bool = typer.Option(False, "--cpu", help="CPU processes instead of GPUs."),
    accelerate_config: Optional[str] = typer.Option(None, help="accelerate config, e.g. launch/accelerate/deepspeed_zero2.yaml."),
    overrides: Optional[list[str]] = set_option("train.max_steps=200"),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the sbatch script instead of submitting it."),
    sbatch_args: Optional[list[str]] = typer.Option(
        None, "--sbatch-arg", help="Another #SBATCH option as KEY=VALUE, e.g. --sbatch-arg mem=64G (repeatable)."),
) -> None:
    """Render an sbatch script into the run folder and submit it (requeues itself on preemption).

    Example: fadscale submit train --config configs/fad.yaml --nodes 4 --gpus-per-node 8 --time 12:00:00
    """
    from fadscale.runtime.launcher import submit as submit_job

    try:
        script, job_id = submit_job(stage, config, nodes=nodes, gpus_per_node=gpus_per_node, cpu=cpu,
                                    partition=partition, time=time, account=account, qos=qos,
                                    constraint=constraint, accelerate_config=accelerate_config,
                                    overrides=overrides or [], dry_run=dry_run, sbatch_args=sbatch_args or [])
    except FadscaleError as exc:
        _fail(exc)
    typer.echo(script if dry_run else f"submitted job {job_id} ({script})")


config_app = typer.Typer(help="Show a stage's config keys, defaults and descriptions.", no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command("show")
def config_show(stage: str = typer.Argument(..., help="The command whose config to show: train-expert, cache-features, "
                                            "train, sample or evaluate.")) -> None:
    """Print every key of STAGE's config with its default and what it means, as YAML you can edit and pass
    to --config.

    Example: fadscale config show train > my-fad.yaml
    """
    from fadscale.config import describe_config
    from fadscale.stages import config_class, stage as find_stage

    try:
        model = config_class(find_stage(stage))
    except FadscaleError as exc:
        _fail(exc)
    typer.echo(describe_config(model), nl=False)


@app.command("demo")
def demo(
    out: Path = typer.Option(Path("demo-out"), "--out", "-o", help="Folder for every artifact and the report."),
    data: Optional[str] = typer.Option(None, help="Your own tiles (folder or zip) instead of the built-in ones, or "
                                       "'kather16' to download the published Kather 2016 tiles (cached)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing demo folder."),
    quick: bool = typer.Option(False, "--quick", help="The smallest setting: every stage in a minute or two."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Training steps per arm (default: the "
                                        "recipe's: 1,200 on built-in tiles, 2,500 on real ones), in proportionally "
                                        "more time; docs/results/ has what longer runs measured."),
    preset: str = typer.Option("cpu", "--preset", help="cpu: the CPU-sized recipe; gpu: tiny-sd's UNet at 64 px "
                               "(needs a CUDA GPU)."),
    grayscale: bool = typer.Option(False, "--grayscale", help="Train and judge grey tiles (the reference's "
                                   "setting) even when --data is in colour."),
) -> None:
    """Run the whole pipeline on built-in tiles with CPU-sized models and write report.html.

    Colour tiles in --data (real H&E) take the real-tile recipe (configs/kather16: RGB, a test split that
    only the evaluation reads). Example: fadscale demo --out demo-out, or
    fadscale demo --data ../shared/data/kather16 --out real-demo
    """
    from fadscale.pipeline.demo import run_demo
    from fadscale.runtime.distributed import set_cpu_threads

    with _one_line_errors(out):
        set_cpu_threads()
        report = run_demo(out, data=data, overwrite=overwrite, quick=quick, steps=steps, preset=preset,
                          grayscale=grayscale)
    typer.echo(f"report: {report}")


def main() -> None:
    try:
        app()
    except OSError as exc:  # a file-system error on a path (read-only, not a folder, disk full): one line
        if exc.filename is None:
            raise
        typer.echo(f"error: {file_error(exc)}", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
