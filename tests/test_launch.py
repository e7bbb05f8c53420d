"""The launch layer without a cluster: rendered sbatch scripts, launcher commands, config files, the
USR1 trap (with stub srun/scontrol), accelerate's CPU config, and DeepSpeed ZeRO-2 with our config."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fadscale.runtime import launcher as launch
from fadscale.runtime.launcher import render_sbatch, submit
from fadscale.stages import STAGES, stage
from fadscale.stages import stage as find_stage
from fadscale.errors import FadscaleError

REPO = Path(__file__).resolve().parents[1]
ACCEL = REPO / "launch" / "accelerate"
ZERO2 = REPO / "launch" / "deepspeed" / "zero2.json"


@pytest.fixture()
def config(tmp_path: Path) -> Path:
    path = tmp_path / "fad.yaml"
    path.write_text(yaml.safe_dump({"run": {"out_dir": str(tmp_path / "run")}}))  # valid for every stage
    return path


def sbatch_lines(text: str) -> dict[str, str]:
    found = {}
    for line in text.splitlines():
        if line.startswith("#SBATCH "):
            key, _, value = line[len("#SBATCH ") :].partition("=")
            found[key] = value
    return found


def launcher_of(text: str) -> str:
    """The command inside `srun ... bash -c '<command>' &`, as the task's bash sees it."""
    match = re.search(r"^\s*bash -c (.+) &$", text, re.M)
    assert match, "no `bash -c ... &` line"
    words = shlex.split(match.group(1))
    assert len(words) == 1
    return words[0]


def bash_syntax_ok(text: str, tmp_path: Path) -> None:
    script = tmp_path / "check.sbatch"
    script.write_text(text)
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------


def test_stages_table():
    assert list(STAGES) == ["train-expert", "cache-features", "train", "sample", "evaluate"]
    assert stage("expert") is STAGES["train-expert"] and stage("cache") is STAGES["cache-features"]
    assert STAGES["train-expert"].launcher == "torchrun" and STAGES["train-expert"].module == "fadscale.train_expert"
    assert {STAGES[s].launcher for s in ("cache-features", "train", "sample")} == {"accelerate"}
    assert STAGES["cache-features"].module == "fadscale.cache_features"
    assert STAGES["train"].module == "fadscale.train_fad"
    assert STAGES["sample"].module == "fadscale.sample"
    with pytest.raises(FadscaleError, match="expected one of train-expert, cache-features, train, sample$"):
        stage("evaluate", multi_process=True)  # one process only: nothing to submit


LAUNCHED = [name for name, spec in STAGES.items() if spec.launcher]


@pytest.mark.parametrize("stage", ["expert", "cache", *LAUNCHED])
@pytest.mark.parametrize("cpu", [False, True], ids=["gpu", "cpu"])
def test_render_every_stage(stage: str, cpu: bool, config: Path, tmp_path: Path):
    text = render_sbatch(stage, config, nodes=2, gpus_per_node=4, cpu=cpu)
    cmd = shlex.split(launcher_of(text))
    spec = find_stage(stage)
    launcher = "torch.distributed.run" if spec.launcher == "torchrun" else "accelerate.commands.launch"
    assert cmd[:3] == [sys.executable, "-m", launcher]
    assert cmd[-4:] == ["-m", spec.module, "--config", str(config.resolve())]
    assert ("--gpus-per-node" in sbatch_lines(text)) != cpu
    assert "$" not in "".join(l for l in text.splitlines() if l.startswith("#SBATCH"))
    bash_syntax_ok(text, tmp_path)


def test_render_train_4_nodes_8_gpus(config: Path, tmp_path: Path):
    text = render_sbatch("train", config, nodes=4, gpus_per_node=8, partition="gpu", time="04:00:00")
    run = tmp_path / "run"
    sb = sbatch_lines(text)
    assert sb["--job-name"] == "fadscale-train"
    assert sb["--nodes"] == "4"
    assert sb["--ntasks-per-node"] == "1"
    assert sb["--gpus-per-node"] == "8"
    assert sb["--cpus-per-task"] == str(8 * launch.CPUS_PER_GPU)
    assert sb["--partition"] == "gpu" and sb["--time"] == "04:00:00"
    for absent in ("--account", "--qos", "--constraint"):
        assert absent not in sb
    assert sb["--output"] == f"{run}/slurm-%j.out"
    assert sb["--signal"] == "B:USR1@300"
    assert "--requeue" in sb and sb["--open-mode"] == "append"
    # All #SBATCH lines come before the first command (sbatch stops reading at the first one).
    lines = text.splitlines()
    last_sbatch = max(i for i, l in enumerate(lines) if l.startswith("#SBATCH"))
    assert all(l.startswith("#") or not l.strip() for l in lines[1:last_sbatch])

    assert 'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)' in text
    assert "MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))" in text
    assert "export MASTER_ADDR MASTER_PORT" in text
    assert "SLURM_RESTART_COUNT=${SLURM_RESTART_COUNT:-0}" in text
    assert "trap on_usr1 USR1" in text
    assert 'STOP_FILE="$RUN_DIR/STOP"' in text and f"RUN_DIR={run}" in text
    assert 'scontrol requeue "$SLURM_JOB_ID"' in text
    assert "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in text and "export NCCL_DEBUG=WARN" in text
    assert "export OMP_NUM_THREADS=8" in text

    srun = next(l for l in lines if l.lstrip().startswith("srun "))
    assert "--ntasks-per-node=1" in srun and "--kill-on-bad-exit=1" in srun

    cmd = shlex.split(launcher_of(text))
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    args = dict(zip(cmd[3::2], cmd[4::2]))
    assert args["--num_machines"] == "4"
    assert args["--num_processes"] == "32"
    assert Path(args["--config_file"]) == ACCEL / "multi_node.yaml"
    # the variables stay for the srun task's shell to expand (one value per node)
    assert '--machine_rank "$SLURM_NODEID"' in launcher_of(text)
    assert '--main_process_ip "$MASTER_ADDR"' in launcher_of(text)
    assert '--main_process_port "$MASTER_PORT"' in launcher_of(text)
    assert "--multi_gpu" not in cmd and "--cpu" not in cmd
    assert cmd[-4:] == ["-m", "fadscale.train_fad", "--config", str(config.resolve())]
    bash_syntax_ok(text, tmp_path)


def test_render_expert_torchrun(config: Path, tmp_path: Path):
    text = render_sbatch("expert", config, nodes=2, gpus_per_node=4, overrides=["train.epochs=3", "model.pretrained=x y"])
    line = launcher_of(text)
    cmd = shlex.split(line)
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nnodes 2 --nproc_per_node 4" in line
    assert '--node_rank "$SLURM_NODEID" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"' in line
    assert cmd[cmd.index("-m", 3) :] == [
        "-m", "fadscale.train_expert", "--config", str(config.resolve()),
        "--set", "train.epochs=3", "--set", "model.pretrained=x y",
    ]  # fmt: skip
    bash_syntax_ok(text, tmp_path)


def test_render_cpu(config: Path, tmp_path: Path):
    text = render_sbatch("train", config, nodes=1, gpus_per_node=2, cpu=True)
    sb = sbatch_lines(text)
    assert "--gpus-per-node" not in sb
    assert sb["--cpus-per-task"] == "2"
    assert "NCCL" not in "".join(l for l in text.splitlines() if l.startswith("export"))
    cmd = shlex.split(launcher_of(text))
    assert Path(cmd[cmd.index("--config_file") + 1]) == ACCEL / "cpu.yaml"
    assert "--multi_gpu" in cmd and "--cpu" not in cmd
    assert cmd[cmd.index("--num_processes") + 1] == "2"
    assert "export OMP_NUM_THREADS=1" in text
    bash_syntax_ok(text, tmp_path)


def test_render_optional_lines_and_overrides(config: Path, tmp_path: Path):
    text = render_sbatch(
        "sample", config, account="proj", qos="high", constraint="h100", signal_lead_s=120,
        overrides=["run.out_dir=" + str(tmp_path / "elsewhere")], job_name="s1", cpus_per_task=12,
    )  # fmt: skip
    sb = sbatch_lines(text)
    assert sb["--account"] == "proj" and sb["--qos"] == "high" and sb["--constraint"] == "h100"
    assert "--partition" not in sb and "--time" not in sb
    assert sb["--signal"] == "B:USR1@120" and sb["--job-name"] == "s1" and sb["--cpus-per-task"] == "12"
    assert sb["--output"] == f"{tmp_path / 'elsewhere'}/slurm-%j.out"
    assert Path(shlex.split(launcher_of(text))[4]) == ACCEL / "single_gpu.yaml"


def test_relative_out_dir_resolved_from_submit_dir(tmp_path: Path, monkeypatch):
    (tmp_path / "cfg.yaml").write_text("run:\n  out_dir: runs/x\n")
    (tmp_path / "nodir.yaml").write_text("model: {}\n")
    monkeypatch.chdir(tmp_path)
    assert f"--output={tmp_path}/runs/x/slurm-%j.out" in render_sbatch("cache", "cfg.yaml")
    assert f"--output={tmp_path}/runs/expert/slurm-%j.out" in render_sbatch("expert", "nodir.yaml")
    assert f"#SBATCH --chdir={tmp_path}" in render_sbatch("expert", "nodir.yaml")


def test_deepspeed_accelerate_config(config: Path, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the repo: the relative JSON path must still be found
    text = render_sbatch("train", config, nodes=2, gpus_per_node=8, accelerate_config="deepspeed_zero2")
    cmd = shlex.split(launcher_of(text))
    assert Path(cmd[cmd.index("--config_file") + 1]) == ACCEL / "deepspeed_zero2.yaml"
    assert Path(cmd[cmd.index("--deepspeed_config_file") + 1]) == ZERO2
    assert "--multi_gpu" not in cmd  # it would turn DeepSpeed off
    with pytest.raises(FadscaleError, match="does not run on CPU"):
        render_sbatch("train", config, cpu=True, accelerate_config="deepspeed_zero2")


def test_single_gpu_config_refuses_many_processes(config: Path):
    with pytest.raises(FadscaleError, match="starts one process"):
        render_sbatch("train", config, nodes=1, gpus_per_node=8, accelerate_config="single_gpu")
    with pytest.raises(FadscaleError, match="accelerate config not found"):
        render_sbatch("train", config, accelerate_config="nope")


def test_errors(config: Path, tmp_path: Path):
    with pytest.raises(FadscaleError, match="unknown stage 'evaluate'") as err:
        render_sbatch("evaluate", config)
    assert "\n" not in str(err.value)
    with pytest.raises(FadscaleError, match="config not found") as err:
        render_sbatch("train", tmp_path / "missing.yaml")
    assert "\n" not in str(err.value)
    with pytest.raises(FadscaleError, match="config not found"):
        submit("train", tmp_path / "missing.yaml", dry_run=True)
    with pytest.raises(FadscaleError, match="unknown stage"):
        submit("nope", config)
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed\n")
    with pytest.raises(FadscaleError, match="not valid YAML"):
        render_sbatch("train", bad)
    spaced = tmp_path / "sp.yaml"
    spaced.write_text(yaml.safe_dump({"run": {"out_dir": str(tmp_path / "a b")}}))
    with pytest.raises(FadscaleError, match="must not contain spaces"):
        render_sbatch("train", spaced)


@pytest.mark.parametrize("key,value", [("partition", "gpu\ntouch X"), ("account", "lab $(id)"), ("qos", "a'b"),
                                       ("time", "04:00:00\ntouch X"), ("time", "4 hours"), ("constraint", "a\rb"),
                                       ("job_name", "x y")])
def test_slurm_values_that_could_inject_lines_are_refused(config: Path, key: str, value: str):
    with pytest.raises(FadscaleError, match=f"--{key.replace('_', '-')} ") as err:
        render_sbatch("train", config, **{key: value})
    assert "\n" not in str(err.value).replace("\\n", "")  # one line; the value shown escaped


def test_slurm_values_in_their_formats_are_rendered(config: Path):
    for limit in ("30", "30:00", "04:00:00", "1-12", "1-12:30", "2-00:00:00", "UNLIMITED"):
        assert f"#SBATCH --time={limit}\n" in render_sbatch("train", config, time=limit)
    text = render_sbatch("train", config, partition="gpu,gpu-long", account="lab_1", qos="high",
                         constraint="a100&ib|h100", job_name="fad-run.2")
    for line in ("--partition=gpu,gpu-long", "--account=lab_1", "--qos=high", "--constraint=a100&ib|h100"):
        assert f"#SBATCH {line}\n" in text


def test_other_sbatch_options_pass_through_checked(config: Path):
    text = render_sbatch("train", config, sbatch_args=["mem=64G", "--gres=gpu:8", "mail-type=END,FAIL", "exclusive"])
    for line in ("--mem=64G", "--gres=gpu:8", "--mail-type=END,FAIL", "--exclusive"):
        assert f"#SBATCH {line}\n" in text
    for bad, why in (("mem=64G\ntouch X", "may not contain"), ("mail-user=a b", "may not contain"),
                     ("time=1:00:00", "set by fadscale"), ("output=/tmp/x", "set by fadscale"), ("=5", "expected KEY")):
        with pytest.raises(FadscaleError, match=why):
            render_sbatch("train", config, sbatch_args=[bad])


def test_submit_dry_run_writes_nothing(config: Path, tmp_path: Path):
    text, job = submit("train", config, dry_run=True, nodes=2, gpus_per_node=4)
    assert job is None and text.startswith("#!/bin/bash") and "--num_processes 8" in text
    assert not (tmp_path / "run").exists()


def _fake_sbatch(bin_dir: Path, body: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    exe = bin_dir / "sbatch"
    exe.write_text("#!/bin/bash\n" + body)
    exe.chmod(0o755)


def test_submit_with_stub_sbatch(config: Path, tmp_path: Path, monkeypatch):
    bin_dir = tmp_path / "bin"
    _fake_sbatch(bin_dir, f'echo "$@" > {tmp_path}/sbatch-args\necho "4242;cluster"\n')
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    script, job = submit("expert", config, nodes=1, gpus_per_node=2, cpu=True)
    assert job == "4242"
    assert script == str(tmp_path / "run" / "submit-expert.sbatch")
    assert Path(script).read_text() == render_sbatch("expert", config, nodes=1, gpus_per_node=2, cpu=True)
    assert (tmp_path / "sbatch-args").read_text().split() == ["--parsable", script]


def test_submit_errors(config: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(FadscaleError, match="sbatch not found"):
        submit("expert", config)
    bin_dir = tmp_path / "bin"
    _fake_sbatch(bin_dir, 'echo "sbatch: error: Invalid partition name specified" >&2\nexit 1\n')
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    with pytest.raises(FadscaleError, match="failed: sbatch: error: Invalid partition name specified") as err:
        submit("expert", config, partition="nope")
    assert "\n" not in str(err.value)


def test_submit_validates_the_whole_config_and_the_train_stage_needs_its_cache(config: Path, tmp_path: Path,
                                                                               monkeypatch):
    with pytest.raises(FadscaleError, match=r"--set optim.lrr=1e-4: unknown key 'optim.lrr'.*did you mean 'optim.lr'"):
        submit("train", config, dry_run=True, overrides=["optim.lrr=1e-4"])
    bin_dir = tmp_path / "bin"
    _fake_sbatch(bin_dir, 'echo 77\n')
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    cache = tmp_path / "cache"
    with pytest.raises(FadscaleError, match=f"feature cache {cache} missing: submit the cache stage first"):
        submit("train", config, overrides=[f"cache.dir={cache}"])
    assert not (tmp_path / "run" / "submit-train.sbatch").exists()
    cache.mkdir()
    (cache / "manifest.json").write_text("{}")
    assert submit("train", config, overrides=[f"cache.dir={cache}"])[1] == "77"
    # Plain training that reads no cache (align off, pixel space, learned tokens) needs none.
    assert submit("train", config, overrides=["align.enabled=false", f"cache.dir={tmp_path / 'none'}"])[1] == "77"


# --------------------------------------------------------------------------------------------------
# Config files
# --------------------------------------------------------------------------------------------------


def test_accelerate_and_deepspeed_configs_parse():
    expected = {
        "single_gpu": "NO",
        "multi_gpu": "MULTI_GPU",
        "multi_node": "MULTI_GPU",
        "deepspeed_zero2": "DEEPSPEED",
        "cpu": "MULTI_GPU",  # MULTI_CPU would start one process (see the file)
    }
    for name, dist_type in expected.items():
        data = yaml.safe_load((ACCEL / f"{name}.yaml").read_text())
        assert data["distributed_type"] == dist_type, name
        assert data["compute_environment"] == "LOCAL_MACHINE"
    assert yaml.safe_load((ACCEL / "cpu.yaml").read_text())["use_cpu"] is True
    ds_yaml = yaml.safe_load((ACCEL / "deepspeed_zero2.yaml").read_text())
    assert ds_yaml["deepspeed_config"]["deepspeed_config_file"] == "launch/deepspeed/zero2.json"
    assert "mixed_precision" not in ds_yaml  # accelerate refuses it next to deepspeed_config_file
    ds = json.loads(ZERO2.read_text())
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["bf16"]["enabled"] is True
    assert ds["zero_optimization"]["overlap_comm"] and ds["zero_optimization"]["contiguous_gradients"]
    assert ds["zero_optimization"]["reduce_bucket_size"] > 0
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert ds[key] == "auto"


# --------------------------------------------------------------------------------------------------
# Multi-process checks (CPU)
# --------------------------------------------------------------------------------------------------

RANK_SCRIPT = """
import os, torch, torch.distributed as dist
from accelerate import Accelerator
acc = Accelerator(cpu=not torch.cuda.is_available())
with open(f"rank-{acc.process_index}.txt", "w") as f:
    f.write(f"RANK {acc.process_index} WORLD {acc.num_processes} TYPE {acc.distributed_type}")
acc.wait_for_everyone()
if dist.is_initialized():
    dist.barrier(); dist.destroy_process_group()
os._exit(0)
"""


@pytest.mark.slow
def test_accelerate_cpu_yaml_starts_two_processes(tmp_path: Path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCEL / "cpu.yaml"),
        "--num_processes", "2", "--main_process_port", "0", str(script),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = "\n".join(p.read_text() for p in sorted(tmp_path.glob("rank-*.txt")))
    ranks = sorted(re.findall(r"RANK (\d) WORLD (\d) TYPE (\S+)", found))
    assert ranks == [("0", "2", "DistributedType.MULTI_CPU"), ("1", "2", "DistributedType.MULTI_CPU")]


def _stub_bin(bin_dir: Path, log: Path) -> None:
    """srun: drop its options and start the command once per node (SLURM_NODEID=0..N-1, N from
    SLURM_JOB_NUM_NODES), all on this machine; scontrol: `show hostnames` and `requeue` (logged)."""
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        "#!/bin/bash\n"
        "while [[ $1 == -* ]]; do shift; done\n"
        "pids=()\n"
        "for ((i = 0; i < ${SLURM_JOB_NUM_NODES:-1}; i++)); do SLURM_NODEID=$i \"$@\" & pids+=($!); done\n"
        "rc=0\n"
        'for p in "${pids[@]}"; do wait "$p" || rc=$?; done\n'
        "exit $rc\n"
    )
    (bin_dir / "scontrol").write_text(
        f'#!/bin/bash\necho "scontrol $*" >> {log}\n'
        'if [ "$1 $2" = "show hostnames" ]; then echo 127.0.0.1; fi\n'
    )
    for exe in bin_dir.iterdir():
        exe.chmod(0o755)


def _stub_env(tmp_path: Path, nodes: int) -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}",
        "SLURM_JOB_ID": str(10000 + (os.getpid() * 7 + nodes) % 10000),
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_JOB_NUM_NODES": str(nodes),
        "SLURM_CPUS_PER_TASK": "1",
    }


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["expert", "train"], ids=["torchrun", "accelerate"])
def test_two_nodes_with_stub_srun(stage: str, tmp_path: Path):
    """The rendered 2-node script, with a stub srun that starts both "nodes" here: the launcher line
    (node rank from SLURM_NODEID, master address/port) forms one 2-process group."""
    run = tmp_path / "run"
    cfg = tmp_path / "fake.yaml"
    cfg.write_text(yaml.safe_dump({"run": {"out_dir": str(run)}, "fake": {"steps": 3, "step_s": 0.05}}))
    text = render_sbatch(stage, cfg, nodes=2, gpus_per_node=1, cpu=True, module="tests.helpers.slurm_fake_stage")
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    _stub_bin(tmp_path / "bin", tmp_path / "scontrol.log")
    proc = subprocess.run(
        ["bash", str(script)], cwd=REPO, env=_stub_env(tmp_path, 2), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    card = json.loads((run / "final" / "run_card.json").read_text())
    assert card == {"step": 3, "world_size": 2, "resumed_from": 0, "restart_count": 0}
    assert "launcher exited with 0" in proc.stdout


@pytest.mark.slow
def test_usr1_trap_with_stub_slurm(tmp_path: Path):
    """The rendered script's trap, run by plain bash with stub srun/scontrol: USR1 -> STOP file ->
    the stage checkpoints and exits 0 -> STOP removed -> `scontrol requeue` -> exit 0."""
    run = tmp_path / "run"
    cfg = tmp_path / "fake.yaml"
    cfg.write_text(yaml.safe_dump({"run": {"out_dir": str(run)}, "fake": {"steps": 400, "step_s": 0.1}}))
    text = render_sbatch("expert", cfg, nodes=1, gpus_per_node=2, cpu=True, module="tests.helpers.slurm_fake_stage")
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    log = tmp_path / "scontrol.log"
    _stub_bin(tmp_path / "bin", log)
    env = _stub_env(tmp_path, 1)
    out = open(tmp_path / "job.out", "w")
    proc = subprocess.Popen(["bash", str(script)], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        progress = run / "progress.json"
        while time.monotonic() < deadline and proc.poll() is None:
            if progress.exists() and json.loads(progress.read_text())["step"] >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, (tmp_path / "job.out").read_text()
        proc.send_signal(signal.SIGUSR1)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        out.close()
    job_out = (tmp_path / "job.out").read_text()
    assert "USR1: writing" in job_out and "requeueing job" in job_out, job_out
    assert "scontrol requeue" in log.read_text()
    assert not (run / "STOP").exists()
    ckpts = sorted((run / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1 and sorted(p.name for p in ckpts[0].iterdir()) == ["rank-0.json", "rank-1.json"]
    assert not (run / "final").exists()


@pytest.mark.slow
def test_deepspeed_zero2_cpu_two_ranks(tmp_path: Path):
    """Our zero2.json with deepspeed.initialize, a tiny UNet2DConditionModel and torch AdamW, 2 gloo ranks."""
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "TORCH_EXTENSIONS_DIR": str(tmp_path / "torch_extensions"),
        "OMP_NUM_THREADS": "1",
    }
    result = tmp_path / "result.json"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(REPO / "tests" / "helpers" / "ds_zero2_check.py"), "--config", str(ZERO2), "--steps", "6", "--out", str(result),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    data = json.loads(result.read_text())
    assert data["world_size"] == 2 and data["zero_stage"] == 2 and data["engine_zero_stage"] == 2
    assert data["bf16"] and data["engine_bf16"]
    assert data["optimizer"] == "AdamW"
    assert data["losses"][-1] < data["losses"][0]
    assert data["weights_identical"] and data["checksums"][0] == data["checksums"][1]


# --------------------------------------------------------------------------------------------------
# On a GPU: accelerate with our GPU configs, through the launcher line `fadscale submit` renders
# --------------------------------------------------------------------------------------------------

GPU_TRAIN_SCRIPT = """
import json, os, sys
import torch
from accelerate import Accelerator

acc = Accelerator(gradient_accumulation_steps=2)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 256), torch.nn.GELU(), torch.nn.Linear(256, 1))
opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
x = torch.randn(512, 16)
y = x.sum(1, keepdim=True)
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=True)
model, opt, loader = acc.prepare(model, opt, loader)
dtype = next(model.parameters()).dtype  # bf16 under DeepSpeed bf16: inputs must match
losses = []
for epoch in range(3):
    for xb, yb in loader:
        with acc.accumulate(model):
            with acc.autocast():
                loss = torch.nn.functional.mse_loss(model(xb.to(dtype)).float(), yb.float())
            acc.backward(loss)
            opt.step()
            opt.zero_grad()
        losses.append(loss.item())
result = {
    "distributed_type": str(acc.distributed_type),
    "mixed_precision": acc.mixed_precision,
    "device": str(acc.device),
    "num_processes": acc.num_processes,
    "param_dtype": str(dtype),
    "first_loss": sum(losses[:8]) / 8,
    "last_loss": sum(losses[-8:]) / 8,
}
plugin = acc.state.deepspeed_plugin
if plugin is not None:
    ds = plugin.deepspeed_config
    result["ds"] = {k: ds.get(k) for k in (
        "train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps", "gradient_clipping")}
    result["ds"]["stage"] = ds["zero_optimization"]["stage"]
    result["ds"]["bf16"] = ds["bf16"]["enabled"]
    result["ds"]["engine"] = type(model).__name__
if acc.is_main_process:
    with open(os.environ["GPU_CHECK_OUT"], "w") as f:
        json.dump(result, f)
acc.end_training() if hasattr(acc, "end_training") else None
"""


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("accel_config", ["single_gpu", "deepspeed_zero2"])
def test_accelerate_gpu_configs(accel_config: str, tmp_path: Path):
    """One GPU: the launcher line for `train` with our accelerate config trains a small model; with
    DeepSpeed, accelerate fills zero2.json's "auto" values and the engine runs ZeRO-2 in bf16."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    if accel_config.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
    (tmp_path / "gpu_check.py").write_text(GPU_TRAIN_SCRIPT)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"run": {"out_dir": str(tmp_path / "run")}}))
    text = render_sbatch(
        "train", cfg, nodes=1, gpus_per_node=1, accelerate_config=accel_config, module="gpu_check"
    )
    line = launcher_of(text).replace(" --config " + str(cfg.resolve()), "")  # the check takes no config
    out = tmp_path / "result.json"
    env = {
        **os.environ,
        "SLURM_NODEID": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "PYTHONPATH": f"{tmp_path}:{os.environ.get('PYTHONPATH', '')}",
        "GPU_CHECK_OUT": str(out),
        "TORCH_EXTENSIONS_DIR": str(tmp_path / "torch_extensions"),
    }
    proc = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    result = json.loads(out.read_text())
    print(accel_config, json.dumps(result))
    assert result["device"].startswith("cuda") and result["num_processes"] == 1
    assert result["mixed_precision"] == "bf16"
    assert result["last_loss"] < result["first_loss"]
    if accel_config == "deepspeed_zero2":
        assert result["distributed_type"] == "DistributedType.DEEPSPEED"
        assert result["ds"] == {
            "train_micro_batch_size_per_gpu": 8, "train_batch_size": 16, "gradient_accumulation_steps": 2,
            "gradient_clipping": 1.0, "stage": 2, "bf16": True, "engine": "DeepSpeedEngine",
        }  # fmt: skip
        assert result["param_dtype"] == "torch.bfloat16"
    else:
        assert result["distributed_type"] == "DistributedType.NO"
