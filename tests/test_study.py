"""The statistics of tools/study_fad.py (the preregistered FAD study): t distribution, paired test, Holm,
the detectable difference, the steps to the convergence bar."""

from __future__ import annotations

import json
import math

import pytest

from tools.study_fad import (analyse, detectable, holm, paired_test, steps_to_bar, t_cdf, t_quantile,
                             verdict_tables)


def test_t_distribution_matches_the_tables():
    # Two-sided 95% quantiles of Student's t (any textbook table).
    for df, q in {1: 12.706, 2: 4.303, 4: 2.776, 7: 2.365, 30: 2.042}.items():
        assert t_quantile(0.975, df) == pytest.approx(q, abs=2e-3)
    assert t_cdf(0.0, 5) == pytest.approx(0.5)
    assert t_cdf(-2.776, 4) == pytest.approx(0.025, abs=2e-4)
    assert t_quantile(0.8, 4) == pytest.approx(0.941, abs=2e-3)


def test_paired_test_on_known_differences():
    result = paired_test([0.02, 0.04, 0.06])  # mean 0.04, sd 0.02, t = 0.04 / (0.02 / sqrt 3) = 3.46, df 2
    assert result["mean"] == pytest.approx(0.04) and result["sd"] == pytest.approx(0.02)
    assert result["p"] == pytest.approx(0.0742, abs=1e-3)
    half = 4.303 * 0.02 / math.sqrt(3)
    assert result["ci95"] == pytest.approx([0.04 - half, 0.04 + half], abs=1e-3)
    assert paired_test([0.01])["p"] is None  # one seed: no test


def test_holm_adjusts_step_down_and_keeps_the_order():
    adjusted = holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.5})
    assert adjusted == pytest.approx({"a": 0.04, "c": 0.09, "b": 0.09, "d": 0.5})
    assert holm({"a": 0.6, "b": 0.7}) == pytest.approx({"a": 1.0, "b": 1.0})


def test_detectable_difference_shrinks_with_seeds_and_grows_with_spread():
    assert detectable(0.02, 8, 0.05 / 8) < detectable(0.02, 5, 0.05 / 8) < detectable(0.04, 5, 0.05 / 8)
    # n = 5, alpha 0.05: (t(0.975, 4) + t(0.8, 4)) * sd / sqrt(5)
    assert detectable(0.02, 5, 0.05) == pytest.approx((2.776 + 0.941) * 0.02 / math.sqrt(5), abs=1e-3)


def test_steps_to_bar_interpolates_between_probes_and_is_missing_when_never_reached():
    curve = [{"step": 150, "gen_acc": 0.5}, {"step": 300, "gen_acc": 0.6}, {"step": 450, "gen_acc": 0.8}]
    assert steps_to_bar(curve, 0.7) == pytest.approx(375)
    assert steps_to_bar(curve, 0.5) == pytest.approx(150)
    assert steps_to_bar(curve, 0.9) is None


def test_the_rule_calls_a_consistent_gain_helps_and_noise_no_effect(tmp_path):
    """Fake cells for 6 seeds: fad-seed gains 0.10 on every seed, fad-repa moves by +-0.02 at random."""
    arms = ["vanilla", "fad-seed", "fad-repa"]
    wobble = [0.02, -0.02, 0.01, -0.01, 0.02, -0.015]
    for regime in ("full", "low"):
        for seed in range(6):
            base = 0.7 + 0.01 * seed
            for arm, acc in (("vanilla", base), ("fad-seed", base + 0.1 + wobble[seed] / 4),
                             ("fad-repa", base + wobble[seed])):
                cell = tmp_path / f"seed-{seed}" / regime / arm
                cell.mkdir(parents=True)
                metrics = {"gen_acc": acc, "frechet_ratio": 5.0 - acc}
                (cell / "result.json").write_text(json.dumps(
                    {"seed": seed, "regime": regime, "arm": arm, "metrics": metrics}))
    analysis = analyse(tmp_path, arms)
    full = analysis["regimes"]["full"]
    assert full["seeds"] == list(range(6))
    assert full["differences"]["fad-seed"]["gen_acc"]["verdict"] == "helps"
    assert full["differences"]["fad-repa"]["gen_acc"]["verdict"] == "no effect shown"
    assert full["differences"]["fad-seed"]["gen_acc"]["p_holm"] >= full["differences"]["fad-seed"]["gen_acc"]["p"]
    table = verdict_tables(analysis)
    assert "| full | fad-seed | 6 | 0.725 | 0.825 | +0.100 [" in table and table.count("| helps |") == 2
    assert "| low | fad-repa |" in table and "frechet_ratio" in table


@pytest.mark.slow
def test_the_study_runs_each_cell_once_and_reports(tmp_path, monkeypatch, capsys):
    """--quick (procedural tiles, a few steps): the low-data regime's capped tiles, the repa arm's inner-stage
    cache; a second run reuses every finished cell; the report writes the per-seed CSV and the curves."""
    import csv
    import json

    from tools import study_fad

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "study"
    args = ["run", "--quick", "--out", str(out), "--seeds", "0", "--regimes", "low", "--arms", "vanilla", "fad-repa",
            "--threads", "1"]
    study_fad.main(args)
    cell = out / "seed-0" / "low" / "fad-repa"
    result = json.loads((cell / "result.json").read_text())
    assert result["arm"] == "fad-repa" and 0 <= result["metrics"]["gen_acc"] <= 1 and result["curve"]
    card = json.loads((cell / "run" / "final" / "run_card.json").read_text())
    assert card["config"]["data"]["max_per_class"] == 3 and card["config"]["align"]["expert_stage"] == 2
    stamp = (cell / "result.json").stat().st_mtime_ns
    study_fad.main(args)  # everything finished: nothing is trained again
    assert (cell / "result.json").stat().st_mtime_ns == stamp
    study_fad.main(["report", "--out", str(out), "--arms", "vanilla", "fad-repa"])
    rows = list(csv.DictReader((out / "per-seed.csv").open()))
    assert [(r["regime"], r["arm"], r["seed"]) for r in rows] == [("low", "vanilla", "0"), ("low", "fad-repa", "0")]
    assert (out / "curves.png").stat().st_size > 0
    assert (out / "verdicts.md").read_text().startswith("| regime | arm | seeds |")  # one seed: no test, headers only
    capsys.readouterr()
    study_fad.main(["status", "--out", str(out), "--seeds", "0", "--regimes", "low", "--arms", "vanilla", "fad-repa"])
    status = capsys.readouterr().out
    assert "seed 0 low   vanilla fad-repa" in status and "2 of 2 cells" in status
    study_fad.main(["status", "--out", str(out), "--seeds", "0", "1", "--regimes", "low", "--arms", "vanilla", "fad-repa"])
    status = capsys.readouterr().out
    assert "2 of 4 cells" in status and "; 2 left" in status
    study_fad.main(["status", "--out", str(out), "--seeds", "1", "--regimes", "low", "--arms", "vanilla", "fad-repa"])
    assert "0 of 2 cells" in capsys.readouterr().out  # only the cells asked about count
    with pytest.raises(SystemExit, match="must start with vanilla"):  # the differences are against vanilla
        study_fad.main(["report", "--out", str(out), "--arms", "fad-repa", "vanilla"])


def test_a_second_worker_waits_for_the_expert_another_is_training(tmp_path, monkeypatch):
    """Two workers on one seed (one per regime) share its evaluator: the one that finds it being trained waits
    for it and uses it, rather than failing on the trainer's lock or training it a second time."""
    import threading

    import fadscale.train_expert
    from fadscale.runtime.lock import RunLock
    from tools.study_fad import ensure_expert

    def must_not_train(cfg):
        raise AssertionError("trained an expert that another worker was training")

    monkeypatch.setattr(fadscale.train_expert, "train", must_not_train)
    folder = tmp_path / "seed-0" / "evaluator"
    other = RunLock(folder.parent, ".evaluator.lock", guards=folder, remove=True).acquire()  # the other worker
    found = {}
    waiter = threading.Thread(target=lambda: found.update(card=ensure_expert(folder, tmp_path, "B", 0, [])))
    waiter.start()
    waiter.join(timeout=1.0)
    assert waiter.is_alive()  # waiting, not failed and not training
    folder.mkdir(parents=True)
    (folder / "expert.json").write_text("{}")
    other.release()
    waiter.join(timeout=10)
    assert not waiter.is_alive() and found["card"] == folder / "expert.json"
