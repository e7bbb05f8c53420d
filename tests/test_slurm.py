"""`fadscale.launch.submit` against a real single-node SLURM on this machine (tests/slurm_cluster.py):
a job runs to the end with 2 processes, and a preempted job (USR1 to the batch shell) checkpoints,
requeues itself, resumes and finishes.

The stage under test is a `StageCase`: which stage (so which launcher), which module (None: the
stage's real entry point), how to write its config, and how to read its progress and its result.
The cases here use `tests/slurm_fake_stage.py`, a stand-in that honours the trainers' STOP/resume
contract, through both launchers. To run the same tests with the real FAD trainer, add a case with
stage="train", module=None, a config writer for a tiny CPU run, and readers for its progress and
`final/run_card.json` to CASES / PREEMPT_CASES.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import yaml

from fadscale.launch import submit
from tests.slurm_cluster import LocalSlurm, SlurmUnavailable

REPO = Path(__file__).resolve().parents[1]
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


@pytest.fixture(scope="session")
def slurm_cluster():
    cluster = LocalSlurm()
    try:
        cluster.start()
    except SlurmUnavailable as exc:
        pytest.skip(f"no local SLURM: {exc}")
    yield cluster
    cluster.stop()


# --------------------------------------------------------------------------------------------------
# Stage cases
# --------------------------------------------------------------------------------------------------


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class StageCase:
    id: str
    stage: str  # picks the launcher: expert -> torchrun, cache/train/sample -> accelerate launch
    module: str | None  # None: the stage's own entry point
    write_config: Callable[[Path, Path, int], Path]  # (folder, out_dir, steps) -> config file
    progress: Callable[[Path], int]  # out_dir -> steps done so far (0 when unknown)
    final_step: Callable[[Path], int | None]  # out_dir -> step recorded when the run finished
    start_steps: Callable[[Path], list[int]] | None = None  # out_dir -> the step each start resumed from
    procs: int = 2  # processes on the one node (cpu=True: gpus_per_node means processes per node)
    steps_to_end: int = 6
    steps_preempt: int = 60


def _fake_config(step_s: float) -> Callable[[Path, Path, int], Path]:
    def write(folder: Path, out_dir: Path, steps: int) -> Path:
        path = folder / "stage.yaml"
        path.write_text(yaml.safe_dump({"run": {"out_dir": str(out_dir)}, "fake": {"steps": steps, "step_s": step_s}}))
        return path

    return write


def _fake_progress(out_dir: Path) -> int:
    return int((_read_json(out_dir / "progress.json") or {}).get("step", 0))


def _final_step(out_dir: Path) -> int | None:
    card = _read_json(out_dir / "final" / "run_card.json")
    return None if card is None else int(card["step"])


def _fake_starts(out_dir: Path) -> list[int]:
    path = out_dir / "starts.jsonl"
    return [json.loads(line)["start_step"] for line in path.read_text().splitlines()] if path.exists() else []


def _fake_case(case_id: str, stage: str) -> StageCase:
    return StageCase(
        id=case_id,
        stage=stage,
        module="tests.slurm_fake_stage",
        write_config=_fake_config(step_s=0.2),
        progress=_fake_progress,
        final_step=_final_step,
        start_steps=_fake_starts,
    )


FAKE_TORCHRUN = _fake_case("fake-torchrun", "expert")
FAKE_ACCELERATE = _fake_case("fake-accelerate", "train")
CASES = [FAKE_TORCHRUN, FAKE_ACCELERATE]
# The trap/requeue path does not depend on the launcher (test_launch.py also runs it under torchrun
# with stub srun/scontrol); one launcher keeps the suite short.
PREEMPT_CASES = [FAKE_ACCELERATE]


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def _submit(case: StageCase, tmp_path: Path, steps: int, **options) -> tuple[Path, str]:
    out_dir = tmp_path / "run"
    config = case.write_config(tmp_path, out_dir, steps)
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


def _describe(cluster: LocalSlurm, job_id: str, out_dir: Path) -> Callable[[], str]:
    def describe() -> str:
        log = out_dir / f"slurm-{job_id}.out"
        text = log.read_text(errors="replace")[-4000:] if log.exists() else "(no job log yet)"
        return f"job {job_id}: {cluster.job_info(job_id)}\n--- {log}:\n{text}"

    return describe


def _wait_done(cluster: LocalSlurm, job_id: str, out_dir: Path, timeout: float = 120) -> dict[str, str]:
    def done():
        info = cluster.job_info(job_id)
        return info if info.get("JobState") in TERMINAL else None

    return _wait(done, timeout, f"job {job_id} to end", _describe(cluster, job_id, out_dir))


@pytest.fixture()
def in_repo(monkeypatch):
    """Submit from the repository root: the job runs there, so `-m tests.slurm_fake_stage` imports."""
    monkeypatch.chdir(REPO)


# --------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_job_runs_to_the_end(slurm_cluster: LocalSlurm, case: StageCase, tmp_path: Path, in_repo):
    t0 = time.monotonic()
    out_dir, job_id = _submit(case, tmp_path, case.steps_to_end)
    try:
        info = _wait_done(slurm_cluster, job_id, out_dir)
    finally:
        slurm_cluster.run("scancel", job_id, check=False)
    describe = _describe(slurm_cluster, job_id, out_dir)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", describe()
    assert info["Restarts"] == "0"
    assert case.final_step(out_dir) == case.steps_to_end, describe()
    log = (out_dir / f"slurm-{job_id}.out").read_text()
    assert f"SLURM_JOB_ID={job_id} SLURM_RESTART_COUNT=0" in log
    assert f"master={slurm_cluster.host}:{20000 + int(job_id) % 20000}" in log
    assert "launcher exited with 0" in log
    if case.module == "tests.slurm_fake_stage":
        card = json.loads((out_dir / "final" / "run_card.json").read_text())
        assert card["world_size"] == case.procs  # both processes joined one process group
        assert log.count("[fake] rank=") == 2 * case.procs  # start + done per rank
    print(f"{case.id}: job {job_id} finished in {time.monotonic() - t0:.1f} s")


@pytest.mark.parametrize("case", PREEMPT_CASES, ids=lambda c: c.id)
def test_preempted_job_checkpoints_requeues_and_resumes(
    slurm_cluster: LocalSlurm, case: StageCase, tmp_path: Path, in_repo
):
    t0 = time.monotonic()
    steps = case.steps_preempt
    out_dir, job_id = _submit(case, tmp_path, steps, signal_lead_s=60)
    describe = _describe(slurm_cluster, job_id, out_dir)
    try:
        # Running and past its first steps, not near its end.
        _wait(lambda: case.progress(out_dir) >= 2, 120, "the job to make progress", describe)
        at_signal = case.progress(out_dir)
        assert at_signal < steps, "the job finished before it could be preempted; give it more steps"
        t_signal = time.monotonic()
        slurm_cluster.run("scancel", "--signal=USR1", "--batch", job_id)
        # It checkpoints, requeues itself and runs again.
        _wait(
            lambda: "SLURM_RESTART_COUNT=1" in (out_dir / f"slurm-{job_id}.out").read_text(),
            120, "the requeued job to start again", describe,
        )  # fmt: skip
        t_restart = time.monotonic()
        info = _wait_done(slurm_cluster, job_id, out_dir)
    finally:
        slurm_cluster.run("scancel", job_id, check=False)
    log = (out_dir / f"slurm-{job_id}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", describe()
    assert info["Restarts"] == "1", describe()
    assert "USR1: writing" in log and "launcher exited 0 after the stop request; requeueing" in log, log
    assert f"SLURM_JOB_ID={job_id} SLURM_RESTART_COUNT=0" in log
    assert f"SLURM_JOB_ID={job_id} SLURM_RESTART_COUNT=1" in log
    assert not (out_dir / "STOP").exists()
    checkpoints = sorted(p.name for p in (out_dir / "checkpoints").glob("step-*"))
    assert checkpoints, describe()
    assert case.final_step(out_dir) == steps, describe()
    if case.start_steps is not None:
        starts = case.start_steps(out_dir)
        assert len(starts) == 2 and starts[0] == 0, starts
        assert at_signal <= starts[1] < steps, starts  # resumed from the stop checkpoint, not from 0
        assert checkpoints == [f"step-{starts[1]:08d}"]
    print(
        f"{case.id}: job {job_id}: signal at step {at_signal} after {t_signal - t0:.1f} s, "
        f"restarted {t_restart - t_signal:.1f} s later, finished after {time.monotonic() - t0:.1f} s"
    )
