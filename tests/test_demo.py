"""`fadscale demo` at its smallest setting, end to end, through the real CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_demo_runs_every_stage_and_writes_the_report(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "fadscale.cli", "demo", "--out", str(out), "--quick"],
                          capture_output=True, text=True, timeout=900, cwd=REPO,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == f"report: {out / 'report.html'}"
    assert len(re.findall(r"^\[\d+/10\] ", proc.stderr, flags=re.M)) == 10  # one progress line per stage
    for artifact in ("shards/manifest.json", "expert-A/expert.json", "expert-B/expert.json",
                     "expert-A/confusion.png", "cache/manifest.json", "vanilla/final/run_card.json",
                     "fad/final/run_card.json", "fad/final/unet_ema/config.json",
                     "samples-vanilla/samples/manifest.json", "samples-fad/samples/manifest.json",
                     "eval-vanilla/report.json", "eval-fad/report.json", "report.md", "report.html",
                     "report-samples.png", "report-losses.png", "report-confusion.png"):
        assert (out / artifact).is_file(), artifact
    a, b = (json.loads((out / f"expert-{s}/expert.json").read_text()) for s in "AB")
    assert (a["data"]["subset"], b["data"]["subset"]) == ("A", "B")
    assert json.loads((out / "fad/final/run_card.json").read_text())["method"] == "fad"
    assert json.loads((out / "vanilla/final/run_card.json").read_text())["method"] == "vanilla"
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3  # self-contained: every plot inlined
    report_md = (out / "report.md").read_text()
    for expected in ("generation accuracy", "SSIM diversity", "Frechet distance", "FAD - vanilla",
                     "train fad", "fadscale demo"):
        assert expected in report_md
    fad_acc = json.loads((out / "eval-fad/report.json").read_text())["generation_accuracy"]["overall"]
    assert f"{fad_acc:.4f}" in report_md
