"""Cluster launch: render an sbatch script for a stage and submit it (`fadscale submit`).

One SLURM job runs one stage on N nodes. The script (template `launch/slurm/job.sbatch`, rendered
with `string.Template`) starts ONE srun task per node; each task runs the stage's launcher with its
node rank taken from `SLURM_NODEID`:

- expert: `python -m torch.distributed.run --nnodes N --nproc_per_node G --node_rank $SLURM_NODEID
  --master_addr $MASTER_ADDR --master_port $MASTER_PORT -m fadscale.train_expert --config F`
- cache / train / sample: `python -m accelerate.commands.launch --config_file <accelerate yaml>
  --num_machines N --num_processes N*G --machine_rank $SLURM_NODEID --main_process_ip $MASTER_ADDR
  --main_process_port $MASTER_PORT -m fadscale.<module> --config F`

`python` is the interpreter that submitted the job (`sys.executable`: the venv's), so the job does
not depend on PATH. MASTER_ADDR is the first host of the allocation, MASTER_PORT is
20000 + job id % 20000 (two jobs sharing a node do not collide; a requeued job keeps its id and port).

Preemption and time limits
--------------------------
1. The script asks SLURM for `--signal=B:USR1@<lead>`: USR1 goes to the batch shell only, `lead`
   seconds before the time limit. A preempting admin or a test sends the same with
   `scancel --signal=USR1 --batch JOBID`.
2. The batch shell's `trap on_usr1 USR1` touches `<run.out_dir>/STOP`. The signal is deliberately
   NOT forwarded to srun/torchrun/accelerate: torchrun's agent would die on USR1 and kill the workers
   without a checkpoint. The file, on the shared run folder, reaches every rank on every node.
3. The trainers check the file (and SIGUSR1/SIGTERM, for runs outside SLURM) once per step, agree
   across ranks, finish the step, write a checkpoint and exit 0.
4. The trap waits until srun is gone, removes STOP, and if the launcher exited 0 runs
   `scontrol requeue $SLURM_JOB_ID` (the job was submitted with `--requeue --open-mode=append`, so it
   keeps its id and log, and SLURM_RESTART_COUNT counts the restarts).
5. On the next start (`run.resume: auto`) the trainer removes a stale STOP file and resumes from the
   newest complete checkpoint. A launcher that fails (non-zero) is not requeued; the job fails with
   the launcher's exit code.
"""

from __future__ import annotations

import math
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from string import Template
from typing import Iterable

import yaml

from fadscale.errors import FadscaleError
from fadscale.resources import shipped
from fadscale.runtime.io import atomic_write_text
from fadscale.stages import Stage, stage as stage_named

LAUNCH_DIR = shipped("launch")  # launch/ of the source tree, or its copy inside the installed package
SBATCH_TEMPLATE = LAUNCH_DIR / "slurm" / "job.sbatch"
ACCELERATE_DIR = LAUNCH_DIR / "accelerate"


# Default CPUs per srun task (= per node) on GPU nodes, per GPU; override with cpus_per_task.
CPUS_PER_GPU = 8
_SAFE_PATH = re.compile(r"^[^\s'\"\\$`]+$")


def _stage(name: str) -> Stage:
    return stage_named(name, multi_process=True)


def _override(overrides: Iterable[str], key: str) -> str | None:
    value = None
    for item in overrides:
        name, sep, rest = item.partition("=")
        if sep and name.strip() == key:
            value = rest.strip()
    return value


def run_dir_of(stage: str, config: str | Path, overrides: Iterable[str] = ()) -> Path:
    """The run folder of a config: `--set run.out_dir=...`, else `run.out_dir`, else `runs/<stage>`;
    relative paths are taken from the current directory (the submit directory), made absolute."""
    config = Path(config)
    if not config.is_file():
        raise FadscaleError(f"{config}: config not found")
    out_dir = _override(overrides, "run.out_dir")
    if out_dir is None:
        try:
            data = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise FadscaleError(f"{config}: not valid YAML ({str(exc).splitlines()[0]})") from None
        run = data.get("run") if isinstance(data, dict) else None
        out_dir = run.get("out_dir") if isinstance(run, dict) else None
    return Path(out_dir or f"runs/{stage}").expanduser().resolve()


def _accelerate_config(name: str | None, *, nodes: int, procs: int, cpu: bool) -> Path:
    """A path, or a name in launch/accelerate/ (with or without .yaml); default by cluster shape."""
    if name is None:
        name = "cpu" if cpu else ("multi_node" if nodes > 1 else "multi_gpu" if procs > 1 else "single_gpu")
    path = Path(name).expanduser()
    candidates = [path]
    if not path.is_absolute() and path.parent == Path("."):
        stem = path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml"
        candidates.append(ACCELERATE_DIR / stem)
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    known = ", ".join(sorted(p.stem for p in ACCELERATE_DIR.glob("*.yaml")))
    raise FadscaleError(f"{name}: accelerate config not found (a path, or one of: {known})")


def _deepspeed_json(accel_cfg: Path, data: dict) -> Path | None:
    """The absolute path of a DeepSpeed accelerate config's deepspeed_config_file, if any.

    accelerate resolves a relative one against the current directory; we try the submit directory,
    the shipped launch/ folder (`launch/deepspeed/zero2.json`) and the yaml's folder."""
    ds = data.get("deepspeed_config") or {}
    value = ds.get("deepspeed_config_file") if isinstance(ds, dict) else None
    if not value:
        return None
    path = Path(value).expanduser()
    tries = [path] if path.is_absolute() else [Path.cwd() / path, LAUNCH_DIR.parent / path, accel_cfg.parent / path]
    if not path.is_absolute() and path.parts[:1] == ("launch",):  # launch/... inside an installed package
        tries.append(LAUNCH_DIR.joinpath(*path.parts[1:]))
    for candidate in tries:
        if candidate.is_file():
            return candidate.resolve()
    raise FadscaleError(f"{accel_cfg}: deepspeed_config_file {value} not found")


def _q(arg: str | Path) -> str:
    return shlex.quote(str(arg))


# SLURM values go into "#SBATCH --key=value" lines: anything beyond these characters (whitespace, a newline
# in particular, quotes, '$') could end the directive block or add a command to the script.
_SLURM_NAME = re.compile(r"^[A-Za-z0-9._,@+-]+$")  # partition (a comma list), account, qos, job name
_SLURM_CONSTRAINT = re.compile(r"^[A-Za-z0-9._,&|*:!()\[\]-]+$")  # features joined by & | , [] *N
# sbatch --time: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S, or UNLIMITED/INFINITE
_SLURM_TIME = re.compile(r"^(\d+(-\d+)?(:\d{1,2}){0,2}|UNLIMITED|INFINITE|unlimited|infinite)$")


# Directives the template writes itself (from submit's options or the run): not to be passed again.
_SET_BY_FADSCALE = {"job-name", "nodes", "ntasks-per-node", "cpus-per-task", "chdir", "output", "error", "signal",
                    "requeue", "no-requeue", "open-mode", "gpus-per-node", "partition", "time", "account", "qos",
                    "constraint", "ntasks", "wrap"}
_SBATCH_KEY = re.compile(r"^[a-z][a-z0-9-]*$")
_SBATCH_VALUE = re.compile(r"^[A-Za-z0-9._,:=@%+/&|*()\[\]-]*$")


def sbatch_directive(arg: str) -> str:
    """`--sbatch-arg KEY=VALUE` (or KEY alone) as `--KEY=VALUE`, checked: a known-shaped key that the
    template does not set itself, and a value without spaces, quotes, '$' or control characters."""
    key, sep, value = arg.partition("=")
    key = key.strip().removeprefix("--")
    if not _SBATCH_KEY.match(key):
        raise FadscaleError(f"--sbatch-arg {arg!r}: expected KEY=VALUE with an sbatch option name, e.g. mem=64G")
    if key in _SET_BY_FADSCALE:
        raise FadscaleError(f"--sbatch-arg {arg!r}: --{key} is set by fadscale (use submit's own options)")
    if not _SBATCH_VALUE.match(value):
        raise FadscaleError(f"--sbatch-arg {arg!r}: the value may not contain spaces, quotes, '$' or control "
                            f"characters")
    return f"--{key}={value}" if sep else f"--{key}"


def check_slurm_value(flag: str, value: str) -> str:
    """`value` for `--flag`, or a one-line error naming it and what SLURM accepts."""
    if flag == "time":
        if not _SLURM_TIME.match(value):
            raise FadscaleError(f"--time {value!r}: expected minutes, M:S, H:M:S, D-H, D-H:M or D-H:M:S "
                                f"(e.g. 04:00:00 or 1-12:00:00)")
    elif not (_SLURM_CONSTRAINT if flag == "constraint" else _SLURM_NAME).match(value):
        raise FadscaleError(f"--{flag.replace('_', '-')} {value!r}: expected letters, digits and . _ , - "
                            f"(no spaces, quotes, '$' or control characters)")
    return value


def _check_path(what: str, path: Path) -> None:
    if not _SAFE_PATH.match(str(path)):
        raise FadscaleError(f"{path}: {what} must not contain spaces, quotes, '$' or backslashes for SLURM")


def launcher_command(
    stage: str,
    config: Path,
    *,
    nodes: int,
    procs_per_node: int,
    cpu: bool,
    accelerate_config: str | None,
    overrides: Iterable[str],
    python: str,
    module: str | None = None,
) -> str:
    """The per-node launcher command (bash; `$SLURM_NODEID`, `$MASTER_ADDR`, `$MASTER_PORT` are
    expanded by the srun task's shell)."""
    spec = _stage(stage)
    module = module or spec.module
    tail = ["-m", module, "--config", _q(config)]
    for item in overrides:
        tail += ["--set", _q(item)]
    node_rank, addr, port = '"$SLURM_NODEID"', '"$MASTER_ADDR"', '"$MASTER_PORT"'
    if spec.launcher == "torchrun":
        head = [
            _q(python), "-m", "torch.distributed.run",
            "--nnodes", str(nodes), "--nproc_per_node", str(procs_per_node),
            "--node_rank", node_rank, "--master_addr", addr, "--master_port", port,
        ]  # fmt: skip
        return " ".join(head + tail)
    accel_cfg = _accelerate_config(accelerate_config, nodes=nodes, procs=nodes * procs_per_node, cpu=cpu)
    try:
        data = yaml.safe_load(accel_cfg.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise FadscaleError(f"{accel_cfg}: not valid YAML ({str(exc).splitlines()[0]})") from None
    dist_type = str(data.get("distributed_type", "NO")).upper()
    total = nodes * procs_per_node
    if dist_type == "NO" and total > 1 and not cpu:
        raise FadscaleError(
            f"{accel_cfg}: distributed_type NO starts one process, but {nodes} node(s) x {procs_per_node} "
            "GPU(s) were asked for; use multi_gpu, multi_node or deepspeed_zero2"
        )
    if cpu and dist_type == "DEEPSPEED":
        raise FadscaleError(f"{accel_cfg}: accelerate + DeepSpeed does not run on CPU; drop --cpu or the config")
    head = [
        _q(python), "-m", "accelerate.commands.launch", "--config_file", _q(accel_cfg),
        "--num_machines", str(nodes), "--num_processes", str(total),
        "--machine_rank", node_rank, "--main_process_ip", addr, "--main_process_port", port,
    ]  # fmt: skip
    if cpu:
        # --cpu would force accelerate's single-process launcher; --multi_gpu goes through torchrun
        # and the entry points pick Accelerator(cpu=True) when no GPU is visible.
        head.append("--multi_gpu")
    ds_json = _deepspeed_json(accel_cfg, data) if dist_type == "DEEPSPEED" else None
    if ds_json is not None:
        head += ["--deepspeed_config_file", _q(ds_json)]
    return " ".join(head + tail)


def _env_block(cpu: bool, omp_threads: int) -> str:
    lines = [
        f"export OMP_NUM_THREADS={omp_threads}   # CPUs per task / processes per node",
        "export PYTHONUNBUFFERED=1",
    ]
    if cpu:
        lines.append("# --cpu: gloo on CPU, no NCCL settings")
    else:
        lines += [
            "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1   # a failed collective raises instead of hanging",
            "export NCCL_DEBUG=WARN",
            "# export NCCL_SOCKET_IFNAME=ib0            # site-specific: the interface between nodes",
            "# export NCCL_IB_DISABLE=1                 # site-specific: no InfiniBand",
        ]
    return "\n".join(lines)


def render_sbatch(
    stage: str,
    config: str | Path,
    *,
    nodes: int = 1,
    gpus_per_node: int = 1,
    cpu: bool = False,
    partition: str | None = None,
    time: str | None = None,
    account: str | None = None,
    qos: str | None = None,
    constraint: str | None = None,
    signal_lead_s: int = 300,
    accelerate_config: str | None = None,
    overrides: Iterable[str] = (),
    python: str | None = None,
    cpus_per_task: int | None = None,
    job_name: str | None = None,
    module: str | None = None,
    sbatch_args: Iterable[str] = (),
) -> str:
    """The sbatch script for `stage` on `nodes` x `gpus_per_node` (processes per node with `cpu`).
    `sbatch_args`: further `#SBATCH` options as KEY=VALUE (mem=64G, gres=gpu:8, mail-type=END, ...).

    `module` replaces the stage's Python module (the launcher stays the stage's): for tests of the
    launch machinery with a stand-in entry point."""
    _stage(stage)
    overrides = list(overrides or ())
    config = Path(config)
    if not config.is_file():
        raise FadscaleError(f"{config}: config not found")
    config = config.resolve()
    if module is None:  # the real stage: its whole config must be valid before a job is rendered
        stage_config(stage, config, overrides)
    if nodes < 1 or gpus_per_node < 1:
        raise FadscaleError(f"nodes ({nodes}) and gpus per node ({gpus_per_node}) must be at least 1")
    if signal_lead_s < 1:
        raise FadscaleError(f"signal lead time must be at least 1 s, got {signal_lead_s}")
    if job_name:
        check_slurm_value("job_name", job_name)
    run_dir = run_dir_of(stage, config, overrides)
    workdir = Path.cwd().resolve()
    _check_path("run.out_dir", run_dir)
    _check_path("the submit directory", workdir)
    if cpus_per_task is None:
        cpus_per_task = gpus_per_node if cpu else CPUS_PER_GPU * gpus_per_node
    omp_threads = max(1, math.floor(cpus_per_task / gpus_per_node))

    extra = []
    if not cpu:
        extra.append(f"--gpus-per-node={gpus_per_node}")
    for flag, value in (
        ("partition", partition),
        ("time", time),
        ("account", account),
        ("qos", qos),
        ("constraint", constraint),
    ):
        if value not in (None, ""):
            extra.append(f"--{flag}={check_slurm_value(flag, value)}")
    extra += [sbatch_directive(arg) for arg in sbatch_args]
    sbatch_extra = "".join(f"#SBATCH {line}\n" for line in extra)

    command = launcher_command(
        stage,
        config,
        nodes=nodes,
        procs_per_node=gpus_per_node,
        cpu=cpu,
        accelerate_config=accelerate_config,
        overrides=overrides,
        python=python or sys.executable,
        module=module,
    )
    spec = _stage(stage)
    template = Template(SBATCH_TEMPLATE.read_text(encoding="utf-8"))
    return template.substitute(
        stage=stage,
        job_name=job_name or f"fadscale-{stage}",
        nodes=nodes,
        cpus_per_task=cpus_per_task,
        sbatch_extra=sbatch_extra,
        workdir=workdir,
        run_dir=str(run_dir).replace("%", "%%"),
        run_dir_q=_q(run_dir),
        signal_lead_s=signal_lead_s,
        env_block=_env_block(cpu, omp_threads),
        procs_per_node=gpus_per_node,
        launcher="torchrun" if spec.launcher == "torchrun" else "accelerate launch",
        launch_cmd=_q(command),
    )


def stage_config(stage: str, config: str | Path, overrides: Iterable[str] = ()):
    """The stage's validated config (a one-line FadscaleError names the file or --set at fault)."""
    from fadscale.config import load_config
    from fadscale.stages import config_class

    return load_config(config_class(_stage(stage)), config, list(overrides))


def check_inputs(stage: str, config: str | Path, overrides: Iterable[str] = ()) -> None:
    """What a job needs before it starts and would otherwise fail on: the train stage reads the feature
    cache, which the cache stage builds (submit that first; a job does not start another stage)."""
    if _stage(stage).command != "train":
        return
    from fadscale.config import uses_cache

    cfg = stage_config(stage, config, overrides)
    if uses_cache(cfg) and not (Path(cfg.cache.dir) / "manifest.json").is_file():
        raise FadscaleError(f"feature cache {cfg.cache.dir} missing: submit the cache stage first "
                            f"(fadscale submit cache-features --config {config} ...), then this one")


def submit(stage: str, config: str | Path, *, dry_run: bool = False, **options) -> tuple[str, str | None]:
    """Render the script for `stage`; with `dry_run` return (script text, None) and write nothing.

    Otherwise write it to `<run.out_dir>/submit-<stage>.sbatch`, run `sbatch --parsable` on it and
    return (script path, job id). `options` are `render_sbatch`'s keywords."""
    text = render_sbatch(stage, config, **options)
    if dry_run:
        return text, None
    if options.get("module") is None:
        check_inputs(stage, config, options.get("overrides") or ())
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise FadscaleError("sbatch not found: submit on a SLURM login node, or use --dry-run to see the script")
    run_dir = run_dir_of(stage, config, options.get("overrides") or ())
    script = run_dir / f"submit-{stage}.sbatch"
    atomic_write_text(script, text)
    script.chmod(0o755)
    try:
        proc = subprocess.run([sbatch, "--parsable", str(script)], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        raise FadscaleError(f"sbatch {script}: no answer within 120 s") from None
    if proc.returncode != 0:
        detail = " ".join((proc.stderr or proc.stdout).split()) or f"exit code {proc.returncode}"
        raise FadscaleError(f"sbatch {script} failed: {detail}")
    # --parsable prints "jobid" or "jobid;cluster"
    job_id = proc.stdout.strip().splitlines()[-1].split(";")[0].strip() if proc.stdout.strip() else ""
    if not job_id.isdigit():
        raise FadscaleError(f"sbatch {script}: unexpected answer {proc.stdout.strip()!r}")
    return str(script), job_id
