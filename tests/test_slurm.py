"""`fadscale submit` against a real single-node SLURM on this machine (tests/helpers/slurm_cluster.py): a job
runs to the end with 2 processes, and a preempted job (USR1 to the batch shell) checkpoints, requeues
itself, resumes and finishes.

The stage under test is a `StageCase`: which stage (so which launcher), which module (None: the
stage's real entry point), how to write its config, how to read its progress and its result, and
what else to check at the end. The cases:

- `train` (the real FAD trainer, `fadscale.train_fad` under `accelerate launch --multi_gpu
  --num_processes 2`, CPU, cpu-tiny UNet on the session's procedural shards and expert, feature
  cache built in-process beforehand): run to the end, submitted through the CLI (`fadscale submit
  train --cpu --gpus-per-node 2`); and preempted with `scancel --signal=USR1 --batch`.
- `fake-torchrun` (`tests/helpers/slurm_fake_stage.py`, a stand-in that honours the trainers' STOP/resume
  contract): the torchrun launcher (the expert stage's) under SLURM, in ~12 s.

Cases dropped to keep the file short (they added nothing the `train` cases do not check): the
stand-in under `accelerate launch` (run to the end and preempted). test_launch.py still runs the
trap with stub srun/scontrol for both launchers.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import yaml

from fadscale.runtime.launcher import submit
from tests.conftest import fad_config
from tests.helpers.slurm_cluster import LocalSlurm, SlurmUnavailable

REPO = Path(__file__).resolve().parents[1]
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


@pytest.fixture(scope="session")
def slurm_cluster():
    """The cluster for the whole session. `start` stops what it started when it fails; the teardown
    runs on test failures and errors (and LocalSlurm also stops at interpreter exit)."""
    cluster = LocalSlurm()
    try:
        cluster.start()
    except SlurmUnavailable as exc:
        pytest.skip(f"no local SLURM: {exc}")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def slurm_fad_cache(tiny_shards: Path, tiny_expert: Path, tmp_path_factory) -> Path:
    """The FAD feature cache, built here in-process once, so the jobs spend their time training."""
    from fadscale.cache_features import build_cache

    root = tmp_path_factory.mktemp("slurm-fad")
    build_cache(fad_config(tiny_shards, tiny_expert, root / "unused", root / "cache"))
    assert (root / "cache" / "manifest.json").exists()
    return root / "cache"


@pytest.fixture()
def in_repo(monkeypatch):
    """Submit from the repository root: the job runs there, so `-m tests.helpers.slurm_fake_stage` imports."""
    monkeypatch.chdir(REPO)


# --------------------------------------------------------------------------------------------------
# Stage cases
# --------------------------------------------------------------------------------------------------


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _job_log(out_dir: Path) -> str:
    """Every job log in the run folder (one per job id; a requeued job appends to its own)."""
    return "".join(p.read_text(errors="replace") for p in sorted(out_dir.glob("slurm-*.out")))


@dataclass(frozen=True)
class StageCase:
    id: str
    stage: str  # picks the launcher: expert -> torchrun, cache/train/sample -> accelerate launch
    module: str | None  # None: the stage's own entry point
    # (folder, out_dir, steps, fixtures) -> config file; fixtures: the values of `fixtures` by name
    write_config: Callable[[Path, Path, int, dict], Path]
    progress: Callable[[Path], int]  # out_dir -> steps done so far (0 when unknown)
    final_step: Callable[[Path], int | None]  # out_dir -> step recorded when the run finished
    start_steps: Callable[[Path], list[int]] | None = None  # out_dir -> the step each start resumed from
    check_end: Callable[[Path, str, int, int], None] | None = None  # (out_dir, log, steps, starts) -> asserts
    fixtures: tuple[str, ...] = ()  # pytest fixtures write_config needs
    via_cli: bool = False  # run-to-the-end: submit with `fadscale submit` instead of launch.submit
    procs: int = 2  # processes on the one node (cpu=True: gpus_per_node means processes per node)
    steps_to_end: int = 6
    steps_preempt: int = 60
    start_timeout_s: float = 120  # submit -> first progress
    run_timeout_s: float = 120  # a start -> the end of the job


def _final_step(out_dir: Path) -> int | None:
    card = _read_json(out_dir / "final" / "run_card.json")
    return None if card is None else int(card["step"])


# ---- the stand-in (tests/helpers/slurm_fake_stage.py) ----------------------------------------------------


def _fake_config(step_s: float) -> Callable[[Path, Path, int, dict], Path]:
    def write(folder: Path, out_dir: Path, steps: int, _fixtures: dict) -> Path:
        path = folder / "stage.yaml"
        path.write_text(yaml.safe_dump({"run": {"out_dir": str(out_dir)}, "fake": {"steps": steps, "step_s": step_s}}))
        return path

    return write


def _fake_progress(out_dir: Path) -> int:
    return int((_read_json(out_dir / "progress.json") or {}).get("step", 0))


def _fake_starts(out_dir: Path) -> list[int]:
    path = out_dir / "starts.jsonl"
    return [json.loads(line)["start_step"] for line in path.read_text().splitlines()] if path.exists() else []


def _fake_check(out_dir: Path, log: str, steps: int, starts: int) -> None:
    card = json.loads((out_dir / "final" / "run_card.json").read_text())
    assert card["world_size"] == 2, card  # both processes joined one process group
    assert log.count("[fake] rank=") == 2 * 2 * starts, log[-3000:]  # start + done/stop per rank and start


def _fake_case(case_id: str, stage: str) -> StageCase:
    return StageCase(
        id=case_id,
        stage=stage,
        module="tests.helpers.slurm_fake_stage",
        write_config=_fake_config(step_s=0.2),
        progress=_fake_progress,
        final_step=_final_step,
        start_steps=_fake_starts,
        check_end=_fake_check,
    )


# ---- the real FAD trainer (fadscale.train_fad) ---------------------------------------------------

_RESUMED = re.compile(r"resumed from (\S+)/step-(\d{8}) at step (\d+)")


def _train_config(folder: Path, out_dir: Path, steps: int, fixtures: dict) -> Path:
    # cpu-tiny UNet, 32x32 grayscale, batch 4 per process, a metrics line per step; no periodic
    # checkpoint, so the only ones are the stop request's and the end's.
    cfg = fad_config(fixtures["tiny_shards"], fixtures["tiny_expert"], out_dir, fixtures["slurm_fad_cache"],
                     train__max_steps=steps, checkpoint__every=100_000, checkpoint__keep_last=2)
    from fadscale.config import dump_config

    path = folder / "fad.yaml"
    path.write_text(dump_config(cfg))
    return path


def _metric_steps(out_dir: Path) -> list[int]:
    """The steps logged to metrics.jsonl (a line being written is skipped)."""
    path = out_dir / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            steps.append(int(json.loads(line)["step"]))
        except (ValueError, KeyError, TypeError):
            pass
    return steps


def _train_progress(out_dir: Path) -> int:
    return max(_metric_steps(out_dir), default=0)


def _train_starts(out_dir: Path) -> list[int]:
    """From the job log: one entry per start of the batch script, the step its trainer resumed from."""
    starts: list[int] = []
    for line in _job_log(out_dir).splitlines():
        if "[fadscale]" in line and "SLURM_RESTART_COUNT=" in line:
            starts.append(0)
        elif (match := _RESUMED.search(line)) and starts:
            assert Path(match.group(1)) == out_dir / "checkpoints", line
            assert int(match.group(2)) == int(match.group(3)), line
            starts[-1] = int(match.group(3))
    return starts


def _train_check(out_dir: Path, log: str, steps: int, starts: int) -> None:
    card = json.loads((out_dir / "final" / "run_card.json").read_text())
    assert card["world_size"] == 2, card["world_size"]
    assert card["ranks_in_sync"], card["rank_weight_checksums"]
    assert card["method"] == "fad" and card["config"]["train"]["max_steps"] == steps
    # Across a stop and a resume no step is lost or logged twice.
    assert _metric_steps(out_dir) == list(range(1, steps + 1)), _metric_steps(out_dir)
    assert log.count("FAD training: UNet cpu-tiny") == starts, log[-3000:]
    assert "2 process(es) on cpu" in log
    assert "missing: building it first" not in log  # the cache was built beforehand, not by the job
    assert f"wrote {out_dir / 'final'} (step {steps})" in log
    assert (out_dir / "final" / "unet_ema" / "config.json").exists()


TRAIN = StageCase(
    id="train",
    stage="train",
    module=None,
    write_config=_train_config,
    progress=_train_progress,
    final_step=_final_step,
    start_steps=_train_starts,
    check_end=_train_check,
    fixtures=("tiny_shards", "tiny_expert", "slurm_fad_cache"),
    via_cli=True,
    steps_to_end=8,
    # ~0.6 s a step with 2 CPU processes: ~20 s of training left when the signal comes at step 2-4.
    steps_preempt=40,
    start_timeout_s=240,
    run_timeout_s=240,
)
FAKE_TORCHRUN = _fake_case("fake-torchrun", "expert")
CASES = [FAKE_TORCHRUN, TRAIN]
# The trap/requeue path does not depend on the launcher (test_launch.py also runs it under both
# with stub srun/scontrol); the real trainer under accelerate is the case that matters.
PREEMPT_CASES = [TRAIN]


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def _cli() -> list[str]:
    script = Path(sys.executable).with_name("fadscale")
    return [str(script)] if script.exists() else [sys.executable, "-m", "fadscale.cli"]


def _fixtures(case: StageCase, request) -> dict:
    """The fixtures the case's config needs (built on first use: shards, expert, cache)."""
    return {name: request.getfixturevalue(name) for name in case.fixtures}


def _submit(case: StageCase, fixtures: dict, tmp_path: Path, steps: int, *, via_cli: bool = False,
            **options) -> tuple[Path, str]:
    out_dir = tmp_path / "run"
    config = case.write_config(tmp_path, out_dir, steps, fixtures)
    if via_cli:
        assert case.module is None and not options
        cmd = [*_cli(), "submit", case.stage, "--config", str(config), "--cpu", "--gpus-per-node", str(case.procs)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"{' '.join(cmd)}: {proc.stdout}{proc.stderr}"
        match = re.search(r"submitted job (\d+) \((\S+)\)", proc.stdout)
        assert match, proc.stdout
        job_id, script = match.groups()
    else:
        extra = {"module": case.module} if case.module else {}
        script, job_id = submit(case.stage, config, nodes=1, gpus_per_node=case.procs, cpu=True, **extra, **options)
    assert Path(script) == out_dir / f"submit-{case.stage}.sbatch"
    return out_dir, job_id


def _wait(predicate: Callable[[], object], timeout: float, what: str, describe: Callable[[], str]) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{describe()}")


def _describe(cluster: LocalSlurm, job_id: str, out_dir: Path, case: StageCase) -> Callable[[], str]:
    """For failure messages: the job's state, the run folder's progress and the job log's tail."""

    def describe() -> str:
        log = out_dir / f"slurm-{job_id}.out"
        # As a terminal shows it: a progress bar's \r-rewritten line counts once.
        text = re.sub(r"[^\n]*\r", "", log.read_text(errors="replace"))[-4000:] if log.exists() else "(no job log yet)"
        checkpoints = sorted(p.name for p in (out_dir / "checkpoints").glob("*step-*"))
        info = cluster.job_info(job_id)
        state = " ".join(f"{k}={info[k]}" for k in ("JobState", "Reason", "ExitCode", "Restarts", "RunTime") if k in info)
        return (
            f"job {job_id}: {state or '(unknown to slurmctld)'}\n"
            f"progress: step {case.progress(out_dir)}, checkpoints {checkpoints}, final step {case.final_step(out_dir)}\n"
            f"--- {log} (tail):\n{text}"
        )

    return describe


def _wait_done(cluster: LocalSlurm, job_id: str, timeout: float, describe: Callable[[], str]) -> dict[str, str]:
    def done():
        info = cluster.job_info(job_id)
        return info if info.get("JobState") in TERMINAL else None

    return _wait(done, timeout, f"job {job_id} to end", describe)


def _cancel(cluster: LocalSlurm, job_id: str) -> None:
    """Cancel the job (a no-op when it ended) and wait until it has left the node, so a failed test
    does not leave processes behind for the next one."""
    cluster.run("scancel", job_id, check=False)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        state = cluster.job_info(job_id).get("JobState")
        if state is None or (state in TERMINAL and not cluster.run(
                "squeue", "-h", "-j", job_id, "-t", "CG", check=False).stdout.strip()):
            return
        time.sleep(0.5)


# --------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_job_runs_to_the_end(slurm_cluster: LocalSlurm, case: StageCase, tmp_path: Path, in_repo, request):
    fixtures = _fixtures(case, request)
    t0 = time.monotonic()
    steps = case.steps_to_end
    out_dir, job_id = _submit(case, fixtures, tmp_path, steps, via_cli=case.via_cli)
    describe = _describe(slurm_cluster, job_id, out_dir, case)
    try:
        info = _wait_done(slurm_cluster, job_id, case.start_timeout_s + case.run_timeout_s, describe)
    finally:
        _cancel(slurm_cluster, job_id)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", describe()
    assert info["Restarts"] == "0", describe()
    assert case.final_step(out_dir) == steps, describe()
    log = (out_dir / f"slurm-{job_id}.out").read_text(errors="replace")
    assert f"SLURM_JOB_ID={job_id} SLURM_RESTART_COUNT=0" in log, describe()
    assert f"master={slurm_cluster.host}:{20000 + int(job_id) % 20000} processes_per_node={case.procs}" in log
    assert "launcher exited with 0" in log, describe()
    if case.start_steps is not None:
        assert case.start_steps(out_dir) == [0], describe()
    if case.check_end is not None:
        case.check_end(out_dir, log, steps, 1)
    print(f"{case.id}: job {job_id} finished in {time.monotonic() - t0:.1f} s")


@pytest.mark.parametrize("case", PREEMPT_CASES, ids=lambda c: c.id)
def test_preempted_job_checkpoints_requeues_and_resumes(
    slurm_cluster: LocalSlurm, case: StageCase, tmp_path: Path, in_repo, request
):
    fixtures = _fixtures(case, request)
    t0 = time.monotonic()
    steps = case.steps_preempt
    out_dir, job_id = _submit(case, fixtures, tmp_path, steps, signal_lead_s=60)
    describe = _describe(slurm_cluster, job_id, out_dir, case)
    log_path = out_dir / f"slurm-{job_id}.out"
    try:
        # Running and past its first steps, not near its end.
        _wait(lambda: case.progress(out_dir) >= 2, case.start_timeout_s, "the job to make progress", describe)
        at_signal = case.progress(out_dir)
        assert at_signal < steps - 5, f"the job is near its end before the signal; give it more steps\n{describe()}"
        t_signal = time.monotonic()
        slurm_cluster.run("scancel", "--signal=USR1", "--batch", job_id)
        # It checkpoints, requeues itself and runs again.
        _wait(
            lambda: "SLURM_RESTART_COUNT=1" in log_path.read_text(errors="replace"),
            120, "the requeued job to start again", describe,
        )  # fmt: skip
        t_restart = time.monotonic()
        info = _wait_done(slurm_cluster, job_id, case.start_timeout_s + case.run_timeout_s, describe)
    finally:
        _cancel(slurm_cluster, job_id)
    log = log_path.read_text(errors="replace")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", describe()
    assert info["Restarts"] == "1", describe()  # scontrol: requeued once
    assert "USR1: writing" in log and "launcher exited 0 after the stop request; requeueing" in log, describe()
    assert f"SLURM_JOB_ID={job_id} SLURM_RESTART_COUNT=0" in log
    assert f"SLURM_JOB_ID={job_id} SLURM_RESTART_COUNT=1" in log
    assert log.count("launcher exited with 0") == 1, describe()  # only the second start ran to the end
    assert not (out_dir / "STOP").exists()
    checkpoints = sorted(p.name for p in (out_dir / "checkpoints").glob("step-*"))
    assert checkpoints, describe()
    assert case.final_step(out_dir) == steps, describe()
    starts = case.start_steps(out_dir) if case.start_steps is not None else None
    if starts is not None:
        assert len(starts) == 2 and starts[0] == 0, f"starts {starts}\n{describe()}"
        stopped_at = starts[1]
        assert at_signal <= stopped_at < steps, starts  # resumed from the stop checkpoint, not from 0
        assert f"step-{stopped_at:08d}" in checkpoints, checkpoints
        assert all(name >= f"step-{stopped_at:08d}" for name in checkpoints), checkpoints  # no periodic ones
    if case.module is None and starts is not None:  # the real trainer says why it stopped, where it resumed
        # The ranks look for STOP each on their own; whichever sees it first stops them all, so the main rank
        # names the file or says another rank saw it.
        assert re.search(r"stop requested \((.*STOP exists|on another rank)\): checkpoint at step \d+, exit", log), describe()
        assert f"resumed from {out_dir / 'checkpoints'}/step-{stopped_at:08d} at step {stopped_at}" in log
    if case.check_end is not None:
        case.check_end(out_dir, log, steps, 2)
    print(
        f"{case.id}: job {job_id}: signal at step {at_signal} after {t_signal - t0:.1f} s, "
        f"restarted {t_restart - t_signal:.1f} s later from step {starts[1] if starts else '?'}, "
        f"finished after {time.monotonic() - t0:.1f} s"
    )
