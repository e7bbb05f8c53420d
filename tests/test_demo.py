"""`fadscale demo` at its smallest setting, end to end, through the real CLI of a non-editable install
(`pip install .` into a folder outside the source tree), which must also render a SLURM script."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """fadscale installed with `pip install .` (no dependencies: those of this environment are used) into a
    folder of its own; returns the folder to put first on PYTHONPATH."""
    target = tmp_path_factory.mktemp("installed")
    build = tmp_path_factory.mktemp("build")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                           "--target", str(target), str(REPO)], capture_output=True, text=True, timeout=600,
                          cwd=build, env={**os.environ, "PIP_NO_INPUT": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (target / "fadscale" / "bundled" / "configs" / "tiny" / "fad.yaml").is_file()
    return target


def _run(installed: Path, cwd: Path, *args: str, timeout: int = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    """The CLI under umask 0022, the usual one on a shared cluster."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(installed), **(env or {})}
    return subprocess.run([sys.executable, "-m", "fadscale.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env, preexec_fn=lambda: os.umask(0o022))


@pytest.mark.slow
def test_demo_runs_every_stage_and_writes_the_report(installed, tmp_path):
    out = tmp_path / "demo"
    # Two CPUs' worth of threads: the two arms train side by side, one process and one thread each.
    proc = _run(installed, tmp_path, "demo", "--out", str(out), "--quick",
                env={"FADSCALE_THREADS": "2", "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == f"report: {out / 'report.html'}"
    assert "vanilla and fad side by side: 2 processes, 1 torch thread(s) each" in proc.stderr
    for stage in ("shard", "expert A (alignment)", "expert B (evaluator)", "feature cache", "train vanilla",
                  "sample vanilla", "evaluate vanilla", "train fad", "sample fad", "evaluate fad"):
        assert len(re.findall(rf"\[\d+/\d+\] {re.escape(stage)} \(", proc.stderr)) == 1, stage
    for artifact in ("shards/manifest.json", "expert-A/expert.json", "expert-B/expert.json",
                     "expert-A/confusion.png", "cache/manifest.json", "vanilla/final/run_card.json",
                     "fad/final/run_card.json", "fad/final/unet_ema/config.json",
                     "samples-vanilla/samples/manifest.json", "samples-fad/samples/manifest.json",
                     "eval-vanilla/report.json", "eval-fad/report.json", "report.md", "report.html",
                     "report-samples.png", "report-losses.png", "report-confusion.png", "report-curves.png",
                     "report-generated-confusion.png"):
        assert (out / artifact).is_file(), artifact
    a, b = (json.loads((out / f"expert-{s}/expert.json").read_text()) for s in "AB")
    assert (a["data"]["subset"], b["data"]["subset"]) == ("A", "B")
    fad_card = json.loads((out / "fad/final/run_card.json").read_text())
    assert fad_card["method"] == "fad" and fad_card["config"]["conditioning"]["class_embedding"]
    assert json.loads((out / "vanilla/final/run_card.json").read_text())["method"] == "vanilla"
    # Learning curves: points at steps 3 and 6, scored by the split-B evaluator.
    points = [json.loads(line) for line in (out / "vanilla/metrics.jsonl").read_text().splitlines()
              if "eval/generation_accuracy" in line]
    assert [p["step"] for p in points] == [3, 6]
    assert all(0 <= p["eval/generation_accuracy"] <= 1 and p["eval/frechet"] > 0 for p in points)
    html = (out / "report.html").read_text()
    # Self-contained: every plot inlined (grid, losses, curves, confusions, each arm's copy-check pairs).
    assert html.count("data:image/png;base64,") == 7
    report_md = (out / "report.md").read_text()
    for expected in ("Class-faithful? The bar", "generation accuracy", "Frechet ratio", "intensity gap",
                     "SSIM diversity", "FAD - vanilla", "| better |", "train fad", "fadscale demo",
                     "Alignment target collapse check", "Evaluator on generated tiles: confusion",
                     "copy share, pixels", "train-on-real accuracy, same count"):
        assert expected in report_md, expected
    assert "steps (6 at batch 8), UNet (cpu-tiny)" in report_md and "steps (6 at batch 8), UNet (cpu-tiny)" in html
    fad_report = json.loads((out / "eval-fad/report.json").read_text())
    assert f"{fad_report['generation_accuracy']['overall']:.3f}" in report_md
    # The bar's accuracies carry the 95% interval of one draw of tiles (the arm's, and the evaluator's on real tiles).
    for key in ("generation_accuracy", "real_accuracy"):
        low, high = fad_report[key]["interval95"]
        assert low <= fad_report[key]["overall"] <= high and f"95%: {low:.3f}-{high:.3f}" in report_md, key
    reference = fad_report["distances"]["reference"]
    assert reference["frechet"] > 0 and fad_report["distances"]["frechet_ratio"] == pytest.approx(
        fad_report["distances"]["overall"]["frechet"] / reference["frechet"])
    assert set(fad_report["intensity"]["per_class"]) == set(fad_report["classes"])
    # Teammates can read every output (atomic writes must not leave mkstemp's private 0600 / 0700 modes).
    private = [str(path.relative_to(out)) for path in out.rglob("*")
               if path.stat().st_mode & 0o777 != (0o755 if path.is_dir() else 0o644)]
    assert private == [], private[:10]


KATHER16 = REPO.parent / "shared" / "data" / "kather16"


@pytest.mark.slow
def test_demo_on_real_colour_tiles_takes_the_real_tile_recipe(installed, tmp_path):
    """Colour tiles in --data: configs/kather16 (RGB), a test part that only the evaluation reads, the copy
    check and the real-tile bar in the report."""
    if not KATHER16.is_dir():
        pytest.skip(f"real tiles not found at {KATHER16}")
    data = tmp_path / "tiles"
    for folder in sorted(p for p in KATHER16.iterdir() if p.is_dir()):
        (data / folder.name).mkdir(parents=True)
        for tile in sorted(folder.glob("*.png"))[:20]:
            (data / folder.name / tile.name).write_bytes(tile.read_bytes())
    out = tmp_path / "demo"
    proc = _run(installed, tmp_path, "demo", "--out", str(out), "--quick", "--data", str(data))
    assert proc.returncode == 0, proc.stderr[-3000:]
    shards = json.loads((out / "shards/manifest.json").read_text())
    assert shards["image"]["channels"] == 3
    assert {split: shards["splits"][split]["count"] for split in ("train", "val", "test")} == {
        "train": 8 * 14, "val": 8 * 2, "test": 8 * 4}
    card = json.loads((out / "fad/final/run_card.json").read_text())
    assert card["config"]["data"]["channels"] == 3
    assert card["config"]["train"]["crop"] == 24 and card["config"]["align"]["enabled"]  # FAD trains on windows too
    for arm in ("vanilla", "fad"):
        report = json.loads((out / f"eval-{arm}/report.json").read_text())
        assert report["real"]["split"] == "test" and report["real"]["count"] == 32
        assert report["copies"]["computed"] and report["copies"]["train_tiles"] == 8 * 14
        assert len(report["intensity"]["per_class"]["TUMOR"]["channels_generated"]) == 3
        sampled = json.loads((out / f"samples-{arm}/samples/manifest.json").read_text())
        assert sampled["sampler"]["scheduler"] == "dpm++-sde"  # the real-tile recipe's sampler, quick or not
    report_md = (out / "report.md").read_text()
    for expected in ("copy share (nearer a training tile than 95% of held-out tiles)", "mean colour gap (R, G, B)",
                     "train-on-synthetic / train-on-real, same count", "against real test tiles",
                     "configs/kather16/fad.yaml", "--test-fraction 0.2", "random 24 px windows of the 32 px tiles"):
        assert expected in report_md, expected


def test_an_installed_package_renders_a_slurm_script(installed, tmp_path):
    config = installed / "fadscale" / "bundled" / "configs" / "tiny" / "fad.yaml"
    proc = _run(installed, tmp_path, "submit", "train", "--config", str(config), "--nodes", "2",
                "--gpus-per-node", "4", "--accelerate-config", "deepspeed_zero2", "--dry-run", timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "#SBATCH --nodes=2" in proc.stdout
    assert str(installed / "fadscale" / "bundled" / "launch" / "accelerate" / "deepspeed_zero2.yaml") in proc.stdout
    assert str(installed / "fadscale" / "bundled" / "launch" / "deepspeed" / "zero2.json") in proc.stdout


def test_overwrite_replaces_only_an_earlier_demo_and_never_the_data(tmp_path):
    from fadscale.pipeline.demo import run_demo
    from fadscale.errors import FadscaleError

    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FadscaleError, match="already exists"):
        run_demo(out)
    with pytest.raises(FadscaleError, match="not a demo folder"):
        run_demo(out, overwrite=True)
    data = out / "shards" / "tiles"  # an earlier demo's folder that the user put their tiles in
    (data / "A").mkdir(parents=True)
    (out / "shards" / "manifest.json").write_text("{}")
    with pytest.raises(FadscaleError, match="holds the --data"):
        run_demo(out, data=str(data), overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and (data / "A").is_dir()


def test_dependencies_are_ranges_and_the_constraints_pin_what_is_installed():
    """pyproject.toml states ranges (fadscale installs beside a user's own diffusers); constraints.txt
    pins the exact tested set, and this environment is that set."""
    import importlib.metadata as metadata
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    assert all("==" not in r and ">=" in r and "<" in r for r in requirements), requirements
    pins = dict(line.split("==") for line in (REPO / "constraints.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    canonical = {name.lower().replace("_", "-"): version for name, version in pins.items()}
    for requirement in project["dependencies"] + project["optional-dependencies"]["dev"]:
        name = re.split(r"[<>=]", requirement)[0].lower()
        assert canonical.get(name) == metadata.version(name), (name, canonical.get(name))


def test_the_stage_clock_reports_with_and_without_expected_costs(capsys):
    from fadscale.pipeline.plan import StageClock

    for expected in ({"a": 1.0, "b": 2.0}, {}):
        clock = StageClock(expected)
        assert [clock.run(name, lambda: name * 2) for name in ("a", "b")] == ["aa", "bb"]
        assert set(clock.timings) == {"a", "b"}
    err = capsys.readouterr().err
    assert "[2/2] b (elapsed" in err and "ETA" in err and "[2] b (elapsed" in err


def test_steps_sets_each_arms_training_length_and_keeps_a_dozen_curve_points(tmp_path):
    from fadscale.pipeline.demo import EVAL_EVERY, demo_plan, run_demo
    from fadscale.pipeline.plan import arm_config
    from fadscale.errors import FadscaleError

    default = demo_plan(tmp_path / "out")
    recipe = arm_config(default, "vanilla").train.max_steps
    assert default.eval_every == EVAL_EVERY and recipe // EVAL_EVERY == 12
    for quick in (False, True):
        plan = demo_plan(tmp_path / "out", quick=quick, steps=3600)
        for arm in plan.arms:
            cfg = arm_config(plan, arm)
            assert cfg.train.max_steps == 3600 and cfg.checkpoint.every == 1200
        assert plan.eval_every == (1800 if quick else 300)
    with pytest.raises(FadscaleError, match="--steps 0"):
        run_demo(tmp_path / "out", steps=0)
    assert not (tmp_path / "out").exists()


def test_colour_tiles_take_the_real_tile_recipe_and_the_gpu_preset_needs_a_gpu(tmp_path, monkeypatch):
    import numpy as np
    import torch
    from PIL import Image

    from fadscale.pipeline.demo import demo_plan, run_demo
    from fadscale.pipeline.plan import arm_config
    from fadscale.errors import FadscaleError

    rng = np.random.default_rng(0)
    for kind, mode in (("grey", "L"), ("stained", "RGB")):
        for cls in ("A", "B"):
            (tmp_path / kind / cls).mkdir(parents=True)
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).convert(mode).save(
                tmp_path / kind / cls / "t.png")
    grey, stained = demo_plan(tmp_path / "o", str(tmp_path / "grey")), demo_plan(tmp_path / "o", str(tmp_path / "stained"))
    assert (grey.recipe, grey.channels, grey.test_fraction) == ("tiny", 1, 0.0)
    assert (stained.recipe, stained.channels, stained.test_fraction) == ("kather16", 3, 0.2)
    cfg = arm_config(stained, "fad")
    assert cfg.data.channels == 3 and "kather16" not in cfg.run.out_dir  # the recipe's config, the demo's folders
    assert "sample.scheduler=dpm++-sde" in stained.sample_overrides
    assert "sample.scheduler=dpm++" in grey.sample_overrides  # the built-in recipe keeps the deterministic solver
    reference = demo_plan(tmp_path / "o", str(tmp_path / "stained"), grayscale=True)
    assert arm_config(reference, "vanilla").data.channels == 1
    # Long real-tile runs train with update clipping (AdamW at the recipe's rate collapsed on them); the demo's
    # own length, and the built-in recipe at any length, keep AdamW.
    for steps, data, name in ((20000, "stained", "stableadamw"), (10000, "stained", "adamw"), (None, "stained", "adamw"),
                              (20000, "grey", "adamw")):
        assert arm_config(demo_plan(tmp_path / "o", str(tmp_path / data), steps=steps), "vanilla").optim.name == name
    gpu = arm_config(demo_plan(tmp_path / "o", str(tmp_path / "stained"), preset="gpu"), "fad")
    assert (gpu.model.preset, gpu.data.image_size, gpu.data.channels) == ("tiny-sd", 64, 3)
    # A data set by name goes through the downloader (tests/test_download.py serves it over loopback).
    import fadscale.pipeline.demo

    def offline(name, **_):
        raise FadscaleError(f"{name}: could not download (offline)")

    monkeypatch.setattr(fadscale.pipeline.demo, "fetch", offline)
    with pytest.raises(FadscaleError, match="kather16: could not download"):
        run_demo(tmp_path / "out", data="kather16")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(FadscaleError, match="--preset gpu .* needs a CUDA GPU"):
        run_demo(tmp_path / "out", data=str(tmp_path / "stained"), preset="gpu")
    assert not (tmp_path / "out").exists()


def test_the_report_says_the_same_in_markdown_and_html():
    """One list of blocks renders report.md and report.html: the same text, the same order."""
    from fadscale.pipeline import document as report

    blocks = [report.Heading("The bar"), report.Paragraph("accuracy < bar", "bad"),
              report.Table(["check", "vanilla"], [["Frechet ratio", "1.6 pass"]], [["", "good"]]),
              report.Image("samples"), report.Code(["fadscale demo --out demo-out"])]
    md = report.markdown(blocks)
    page = report.html(blocks, "fadscale demo report", {"samples": b"\x89PNG-bytes"})
    assert md.index("## The bar") < md.index("accuracy < bar") < md.index("| Frechet ratio | 1.6 pass |") \
        < md.index("![samples](report-samples.png)") < md.index("fadscale demo --out demo-out")
    assert page.index("<h2>The bar</h2>") < page.index("<p class='bad'>accuracy &lt; bar</p>") \
        < page.index("<td class='good'>1.6 pass</td>") < page.index("data:image/png;base64,") \
        < page.index("<pre>fadscale demo --out demo-out</pre>")


def test_the_reports_stage_commands_build_the_configs_the_demo_runs(tmp_path, monkeypatch):
    """The report's "each stage on its own" commands, read as the CLI reads them (--config, then each --set),
    give the very configs the demo's stages build, for the built-in and the real-tile recipe; the shard
    command runs."""
    import shlex

    from typer.testing import CliRunner

    from fadscale.cli import app
    from fadscale.config import EvaluateConfig, ExpertConfig, SampleConfig, load_config
    from fadscale.evaluate import evaluate_config
    from fadscale.pipeline.demo import demo_plan
    from fadscale.pipeline.plan import _settings, arm_config, evaluate_overrides, expert_overrides, \
        sample_overrides, stage_commands, tiny_config
    from fadscale.sample import sample_config
    from fadscale.stages import config_class, stage

    import numpy as np
    from PIL import Image

    for cls in ("A", "B"):
        (tmp_path / "stained" / cls).mkdir(parents=True)
        Image.fromarray(np.full((16, 16, 3), (200, 80, 150), dtype=np.uint8)).save(tmp_path / "stained" / cls / "t.png")
    for plan in (demo_plan(tmp_path / "built in", quick=True), demo_plan(tmp_path / "real", str(tmp_path / "stained"))):
        commands = [shlex.split(c.replace("\\\n", " ")) for c in stage_commands(plan)]
        assert [c[1] for c in commands] == ["shard-data", "train-expert", "train-expert",
                                             *["train", "sample", "evaluate"] * len(plan.arms)]
        built = []
        for words in commands[1:]:
            config = words[words.index("--config") + 1] if "--config" in words else None
            sets = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
            built.append(load_config(config_class(stage(words[1])), config, sets).model_dump())
        expected = [tiny_config(ExpertConfig, "expert.yaml", expert_overrides(plan, s), plan.recipe).model_dump()
                    for s in "AB"]
        for arm in plan.arms:
            samples, evaluator = plan.out / f"samples-{arm}", plan.out / "expert-B" / "expert.json"
            expected += [  # what train_run, sample_run and evaluate_run build
                arm_config(plan, arm).model_dump(),
                sample_config(plan.out / arm, samples, **_settings(sample_overrides(plan), SampleConfig)).model_dump(),
                evaluate_config(samples, evaluator, plan.out / f"eval-{arm}",
                                **_settings(evaluate_overrides(plan), EvaluateConfig)).model_dump()]
        assert built == expected
    shard = commands[0]
    result = CliRunner().invoke(app, shard[1:shard.index("--out") + 1] + [str(tmp_path / "shards")]
                                + shard[shard.index("--out") + 2:])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "shards" / "manifest.json").is_file()


def test_arms_side_by_side_give_the_figures_of_arms_one_after_the_other(tmp_path, monkeypatch):
    """The arms' processes (one thread each) compute what the same arms compute one after the other in this
    process at one thread: every figure of both reports is equal."""
    import torch

    from fadscale.pipeline.demo import demo_plan
    from fadscale.pipeline.plan import arm_processes, run_pipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def figures(node, path=""):
        if isinstance(node, dict):
            return {k: v for key, value in node.items() if "time" not in key and "second" not in key
                    for k, v in figures(value, f"{path}/{key}").items()}
        if isinstance(node, list):
            return {k: v for i, value in enumerate(node) for k, v in figures(value, f"{path}/{i}").items()}
        return {path: node} if isinstance(node, (int, float)) and not isinstance(node, bool) else {}

    reports = {}
    threads = torch.get_num_threads()
    try:
        for mode, cores in (("after", "1"), ("side", "2")):
            monkeypatch.setenv("FADSCALE_THREADS", cores)
            torch.set_num_threads(1)
            plan = demo_plan(tmp_path / mode, quick=True)
            plan.arm_processes = int(cores)  # side by side even where a GPU is visible
            assert arm_processes(plan) == int(cores)
            reports[mode] = run_pipeline(plan)["reports"]
    finally:
        torch.set_num_threads(threads)
    for arm in ("vanilla", "fad"):
        after, side = figures(reports["after"][arm]), figures(reports["side"][arm])
        assert len(after) > 50 and after == side, arm


def test_the_arms_processes_stop_when_the_demo_is_killed(tmp_path):
    """SIGKILL to the demo while its arms train (no cleanup code of its own can run): its arms' processes stop
    too, rather than go on writing into its folder."""
    import signal
    import threading
    import time
    import uuid

    marker = f"FADSCALE_TEST_MARKER={uuid.uuid4().hex}".encode()

    def marked() -> list[int]:
        found = []
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and marker in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
        return found

    key, value = marker.decode().split("=")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FADSCALE_THREADS": "2", "CUDA_VISIBLE_DEVICES": "", key: value}
    out = tmp_path / "demo"
    demo = subprocess.Popen([sys.executable, "-c", "import sys; from fadscale.pipeline.demo import run_demo; "
                             "run_demo(sys.argv[1], quick=True, steps=300)", str(out)],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    log: list[str] = []
    threading.Thread(target=lambda: log.extend(demo.stderr), daemon=True).start()  # never blocks on a full pipe
    try:
        deadline = time.monotonic() + 300
        while not all((out / arm / "run.lock").is_file() for arm in ("vanilla", "fad")):  # both trainers started
            assert demo.poll() is None and time.monotonic() < deadline, "".join(log)[-3000:]
            time.sleep(0.2)
        time.sleep(1)
    finally:
        demo.send_signal(signal.SIGKILL)
        demo.wait()
    assert not (out / "vanilla" / "final").exists()  # killed while training, as meant
    deadline = time.monotonic() + 90
    while marked() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert marked() == []


def test_an_arm_that_fails_stops_the_other_and_its_error_is_raised(tmp_path, monkeypatch):
    """Side by side, the second arm failing at once is raised at once: the first arm is stopped, not waited for."""
    from fadscale.errors import FadscaleError
    from fadscale.pipeline.demo import demo_plan
    from fadscale.pipeline.plan import run_pipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("FADSCALE_THREADS", "2")
    plan = demo_plan(tmp_path / "demo", quick=True)
    plan.arm_processes = 2
    plan.arms = {"vanilla": ["align.enabled=false", "train.max_steps=300"],
                 "broken": ["align.enabled=false", f"model.pretrained={tmp_path / 'no-such-unet'}"]}
    with pytest.raises(FadscaleError, match="no-such-unet"):
        run_pipeline(plan)
    assert not (tmp_path / "demo" / "eval-vanilla" / "report.json").exists()
