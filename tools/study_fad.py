"""Does FAD help? The preregistered study of docs/results/fad-vs-vanilla.md, on real Kather 2016 tiles.

    python tools/study_fad.py run --out runs/study-fad --seeds 0 2 4 --threads 1 &   # one process per core:
    python tools/study_fad.py run --out runs/study-fad --seeds 1 3 --threads 1 &     # a seed's cells in order
    python tools/study_fad.py run --out runs/study-fad --seeds 2 --regimes low --arms fad-repa fad-seed-centred
                                                             # a part of a seed's cells (never the same cell twice)
    python tools/study_fad.py pilot --out runs/study-fad     # the internal pilot: spread only, no means
    python tools/study_fad.py report --out runs/study-fad    # verdicts, CSV, plot (after the runs)
    python tools/study_fad.py status --out runs/study-fad    # cells finished per seed and regime, and their cost
    python tools/study_fad.py run --quick --out /tmp/q --seeds 0   # smoke test: procedural tiles, a few steps

A cell is (seed, regime, arm): train the generator, sample it, evaluate the samples on the test split;
it ends with `<out>/seed-S/<regime>/<arm>/result.json`, so an interrupted study resumes where it stopped
(finished cells are kept; a half-trained generator continues from its newest checkpoint). What a seed
shares (its evaluator, its alignment experts, their feature caches) is built once, by the first cell that
needs it. Processes on different seeds share nothing but the shards.

The design is the protocol's (the file above holds the reasons; change it there first):
- Tiles: ../shared/data/kather16 sharded once, 70/10/20 train/val/test, stratified, fixed by path.
- Per seed S: the halves A/B are redrawn (data.subset_seed S). The evaluator is resnet10t at 32 px on half B,
  16 epochs, picking its epoch on half B of val; it never sees a test tile. The alignment expert is the
  recipe's (resnet10t, 32 px) on half A; the generator's seed, the sampling and evaluation seeds are S.
- Regimes: `full` (the generator on all 2,800 train tiles, the alignment expert on half A) and `low` (50
  tiles per class of half A, drawn by S, for the generator and the alignment expert, which trains 20 epochs
  instead of 6 so that it takes about as many optimizer steps).
- Arms (ARMS): vanilla and four alignment arms, configs/kather16/fad.yaml otherwise, on whole tiles (1,500 steps x 16).
- Probes every 150 steps (16 tiles per class, DPM-Solver++ 15, against val tiles): the learning curve and
  the steps to the convergence bar. Final: 64 tiles per class (DPM-Solver++ 25) scored on the test split.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "kather16"

ARMS = {
    "vanilla": ["align.enabled=false"],
    # The reference's projector (Linear on the expert side, pooled cosine) on the cached clean-tile feature.
    "fad-seed": ["align.enabled=true", "align.projector=seed", "align.target=cached"],
    # The reference's own step: the expert sees the reference's x_t (its [0, 1] range, full noise amplitude),
    # at the tile's size, unnormalised, BatchNorm in train mode.
    "fad-reference": ["align.enabled=true", "align.projector=seed", "align.target=noisy-reference"],
    # REPA: an MLP on the UNet side against the expert's stage-2 map (4x4 at 32 px, stride 8), no upsampling.
    "fad-repa": ["align.enabled=true", "align.projector=repa", "align.target=cached", "align.expert_stage=2"],
    "fad-seed-centred": ["align.enabled=true", "align.projector=seed", "align.target=cached",
                         "align.center_target=true"],
}
REGIMES = {  # (generator overrides, alignment expert overrides), beyond the seed's subset_seed
    "full": ([], []),
    "low": (["data.subset=A", "data.max_per_class=50"], ["data.max_per_class=50", "train.epochs=20"]),
}
PRIMARY = "gen_acc"
ALPHA = 0.05
TARGET_EFFECT = 0.05  # the difference in generation accuracy the design is sized to detect (the paper's ~9%)
POWER = 0.8
SEEDS_MIN, SEEDS_MAX, PILOT_SEEDS = 5, 8, 3
SEEDS = 8  # what the pilot chose (docs/results/fad-vs-vanilla.md, "The internal pilot"): seeds 0-7
CONVERGENCE_BAR = 0.70  # probe generation accuracy (val tiles, 128 tiles)

# The protocol's training, pinned here so that later recipe changes (configs/kather16) do not move it: 1,500
# whole-tile steps (the recipe's when the study ran; it trains on 24 px windows now).
SETTINGS = dict(steps=1500, probe_every=150, probe_per_class=16, per_class=64, sampler=("dpm++", 25),
                evaluator_epochs=16)
QUICK = dict(source="procedural:per_class=16,size=32,seed=0", steps=4, probe_every=2, probe_per_class=2, per_class=2,
             sampler=("dpm++", 3), evaluator_epochs=1, extra=["model.preset=cpu-tiny", "data.batch_size=8",
                                                             "eval.steps=2", "checkpoint.every=2"])
LOW_QUICK = ["data.max_per_class=3"]

# (key, path in the evaluation report, higher is better; None: no direction)
METRICS = [
    ("gen_acc", ("generation_accuracy", "overall"), True),
    ("frechet_ratio", ("distances", "frechet_ratio"), False),
    ("precision", ("distances", "overall", "precision"), True),
    ("recall", ("distances", "overall", "recall"), True),
    ("ssim_diversity", ("diversity", "mean", "generated"), None),
    ("syn_over_real", None, True),  # train-on-synthetic / train-on-real at the same count
    ("copy_share", ("copies", "share"), False),
    ("colour_gap", ("intensity", "max_abs_channel_gap"), False),
    ("steps_to_bar", None, False),
]


# ------------------------------------------------------------------------------------------ statistics


def t_cdf(t: float, df: int) -> float:
    """Student's t CDF by Simpson's rule on the density (no SciPy in the tested set)."""
    if t < 0:
        return 1.0 - t_cdf(-t, df)
    norm = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    n = 2000
    h = t / n

    def density(x):
        return norm * (1 + x * x / df) ** (-(df + 1) / 2)

    total = density(0) + density(t) + sum((4 if i % 2 else 2) * density(i * h) for i in range(1, n))
    return min(1.0, 0.5 + total * h / 3)


def t_quantile(p: float, df: int) -> float:
    low, high = -100.0, 100.0
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if t_cdf(mid, df) < p else (low, mid)
    return (low + high) / 2


def paired_test(diffs: list[float]) -> dict:
    """Two-sided paired t-test of the mean difference against 0, with its 95% interval."""
    n = len(diffs)
    mean = statistics.fmean(diffs)
    if n < 2:
        return {"n": n, "mean": mean, "sd": None, "p": None, "ci95": None}
    sd = statistics.stdev(diffs)
    half = t_quantile(0.975, n - 1) * sd / math.sqrt(n)
    p = 1.0 if sd == 0 and mean == 0 else (0.0 if sd == 0 else 2 * (1 - t_cdf(abs(mean) / (sd / math.sqrt(n)), n - 1)))
    return {"n": n, "mean": mean, "sd": sd, "p": p, "ci95": [mean - half, mean + half]}


def holm(pvalues: dict[str, float]) -> dict[str, float]:
    """Holm's step-down adjusted p-values (family-wise error at the level they are compared with)."""
    order = sorted(pvalues, key=pvalues.get)
    adjusted, running = {}, 0.0
    for i, key in enumerate(order):
        running = max(running, min(1.0, (len(order) - i) * pvalues[key]))
        adjusted[key] = running
    return adjusted


def detectable(sd: float, n: int, alpha: float, power: float = POWER) -> float:
    """The smallest true paired difference a two-sided t-test at `alpha` finds with `power` (n seeds)."""
    return (t_quantile(1 - alpha / 2, n - 1) + t_quantile(power, n - 1)) * sd / math.sqrt(n)


# ------------------------------------------------------------------------------------------ the cells


def settings(quick: bool) -> dict:
    return {**SETTINGS, **(QUICK if quick else {})}


def ensure_shards(out: Path, quick: bool) -> Path:
    from fadscale.data.shard import shard_dataset

    from fadscale.runtime.lock import RunLock

    shards = out / "shards"
    lock = RunLock(out, ".study-shards.lock", remove=True).acquire(wait=True)  # one process shards
    try:
        if not (shards / "manifest.json").is_file():
            source = QUICK["source"] if quick else str(DATA)
            shard_dataset(source, shards, grayscale=False, val_fraction=0.1, test_fraction=0.2, seed=0,
                          progress=False, overwrite=True)
    finally:
        lock.release()
    return shards


def ensure_expert(folder: Path, shards: Path, subset: str, seed: int, overrides: list[str]) -> Path:
    from fadscale.config import ExpertConfig
    from fadscale.pipeline.plan import tiny_config
    from fadscale.runtime.lock import RunLock
    from fadscale.train_expert import train as train_expert

    card = folder / "expert.json"
    # Two workers may share a seed (one per regime): the first trains the expert, the other waits for it.
    lock = RunLock(folder.parent, f".{folder.name}.lock", guards=folder, remove=True).acquire(wait=True)
    try:
        if not card.is_file():
            cfg = tiny_config(ExpertConfig, "expert.yaml", [
                f"run.out_dir={folder}", f"data.shards={shards}", f"data.subset={subset}",
                f"data.subset_seed={seed}", f"run.seed={seed}", *overrides], "kather16")
            train_expert(cfg)
            if not card.is_file():  # stopped by a signal: checkpointed, not finished
                raise SystemExit(f"{card}: not written (the expert was stopped); the same command resumes it")
    finally:
        lock.release()
    return card


def run_cell(out: Path, seed: int, regime: str, arm: str, quick: bool) -> dict:
    """Train, sample and evaluate one (seed, regime, arm); returns (and keeps) its result record."""
    from fadscale.artifacts import EXPERT_CARD
    from fadscale.cache_features import build_cache
    from fadscale.config import uses_cache
    from fadscale.errors import FadscaleError
    from fadscale.pipeline.plan import Plan, Prepared, arm_config, evaluate_run, sample_run, train_run
    from fadscale.runtime.io import atomic_write_json

    cell = out / f"seed-{seed}" / regime / arm
    if (cell / "result.json").is_file():
        return json.loads((cell / "result.json").read_text())
    s = settings(quick)
    shards = out / "shards"
    generator, expert_extra = REGIMES[regime]
    if quick and regime == "low":
        generator, expert_extra = ["data.subset=A", *LOW_QUICK], LOW_QUICK
    quick_expert = ["train.epochs=1"] if quick else []
    evaluator = ensure_expert(out / f"seed-{seed}" / "evaluator", shards, "B", seed,
                              [f"train.epochs={s['evaluator_epochs']}", *quick_expert])
    alignment = ensure_expert(out / f"seed-{seed}" / regime / "expert-A", shards, "A", seed,
                              [*expert_extra, *quick_expert])
    scheduler, steps = s["sampler"]
    plan = Plan(out=out / f"seed-{seed}" / regime, recipe="kather16", channels=3, image_size=32, seed=seed,
                per_class=s["per_class"], eval_every=s["probe_every"],
                fad_overrides=[f"data.shards={shards}", f"eval.evaluator={evaluator}",
                               f"eval.per_class={s['probe_per_class']}", f"data.subset_seed={seed}",
                               f"train.max_steps={s['steps']}", "train.crop=null", *generator,
                               *s.get("extra", [])],
                sample_overrides=[f"sample.scheduler={scheduler}", f"sample.steps={steps}"],
                eval_overrides=["utility.steps=5"] if quick else [])
    prepared = Prepared(plan.out, shards, alignment, evaluator)
    started = time.perf_counter()
    cfg = arm_config(plan, arm, ARMS[arm], seed=seed, tag=f"{arm}/run", alignment=alignment)
    if uses_cache(cfg):
        build_cache(cfg)  # once per seed and regime (locked; a complete cache is reused)
    try:
        run_dir = train_run(plan, prepared, arm, ARMS[arm], seed=seed, tag=f"{arm}/run")
    except FadscaleError as exc:  # e.g. stopped by a signal: checkpointed, not finished; one line, no traceback
        raise SystemExit(str(exc)) from None
    train_s = time.perf_counter() - started
    manifest = sample_run(plan, run_dir, cell / "samples", seed=seed)
    report = evaluate_run(plan, prepared, cell / "samples", cell / "eval", seed=seed)
    result = {"seed": seed, "regime": regime, "arm": arm, "quick": quick, **record(report, run_dir),
              "train_s": round(train_s, 1), "sample_s": manifest["timing"]["wall_s"],
              "evaluator_accuracy_on_test": report_value(report, ("real_accuracy", "overall")),
              "alignment_expert_val_accuracy": EXPERT_CARD.read(alignment).get("val_accuracy")}
    atomic_write_json(cell / "result.json", result)
    return result


def report_value(report: dict, path):
    from fadscale.core.evaluation.report import report_value as value

    return value(report, path)


def record(report: dict, run_dir: Path) -> dict:
    """The metrics of one cell: the report's figures and the learning curve's."""
    from fadscale.runtime.logging import read_metrics

    metrics = {key: report_value(report, path) for key, path, _ in METRICS if path}
    syn = report_value(report, ("utility", "setups", "synthetic", "overall"))
    same = report_value(report, ("utility", "setups", "real (same count)", "overall"))
    metrics["syn_over_real"] = syn / same if syn is not None and same else None
    curve = [{"step": r["step"], "gen_acc": r["eval/generation_accuracy"], "frechet": r["eval/frechet"],
              "train_s": r.get("eval/train_seconds")} for r in read_metrics(run_dir) if "eval/generation_accuracy" in r]
    metrics["steps_to_bar"] = steps_to_bar(curve, CONVERGENCE_BAR)
    return {"metrics": metrics, "curve": curve}


def steps_to_bar(curve: list[dict], bar: float) -> float | None:
    """The step at which the probe accuracy first reaches `bar`, linear between probes (None: never)."""
    previous = {"step": 0, "gen_acc": 0.0}
    for point in curve:
        if point["gen_acc"] >= bar:
            rise = point["gen_acc"] - previous["gen_acc"]
            fraction = (bar - previous["gen_acc"]) / rise if rise > 0 else 1.0
            return previous["step"] + fraction * (point["step"] - previous["step"])
        previous = point
    return None


def cells(seeds: list[int], regimes: list[str], arms: list[str]) -> list[tuple[int, str, str]]:
    return [(seed, regime, arm) for seed in seeds for regime in regimes for arm in arms]


# ------------------------------------------------------------------------------------------ analysis


def results(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("seed-*/*/*/result.json"))]


def complete_seeds(rows: list[dict], regime: str, arms: list[str]) -> list[int]:
    seeds = {}
    for r in rows:
        if r["regime"] == regime:
            seeds.setdefault(r["seed"], set()).add(r["arm"])
    return sorted(s for s, have in seeds.items() if set(arms) <= have)


def differences(rows: list[dict], regime: str, arm: str, key: str, seeds: list[int]) -> list[float]:
    by = {(r["seed"], r["arm"]): r["metrics"].get(key) for r in rows if r["regime"] == regime}
    return [by[(s, arm)] - by[(s, "vanilla")] for s in seeds
            if by.get((s, arm)) is not None and by.get((s, "vanilla")) is not None]


def pilot(out: Path, arms: list[str]) -> dict:
    """The internal pilot's decision, blind to the effects: the pooled spread of the paired differences on
    the primary metric over the first PILOT_SEEDS seeds, and the number of seeds it asks for."""
    rows = results(out)
    variances, used = [], {}
    for regime in REGIMES:
        seeds = complete_seeds(rows, regime, arms)[:PILOT_SEEDS]
        used[regime] = seeds
        for arm in arms[1:]:
            diffs = differences(rows, regime, arm, PRIMARY, seeds)
            if len(diffs) >= 2:
                variances.append(statistics.variance(diffs))
    if not variances:
        raise SystemExit(f"{out}: no seed has every arm of a regime yet: nothing to size the study from")
    sd = math.sqrt(statistics.fmean(variances))
    comparisons = len(REGIMES) * (len(arms) - 1)
    alpha = ALPHA / comparisons  # Holm's first step: the strictest level any comparison meets
    table = {n: detectable(sd, n, alpha) for n in range(SEEDS_MIN, SEEDS_MAX + 1)}
    chosen = next((n for n, d in table.items() if d <= TARGET_EFFECT), SEEDS_MAX)
    return {"pilot_seeds": used, "pooled_sd_of_differences": sd, "comparisons": comparisons, "alpha_first_step": alpha,
            "detectable_by_seeds": table, "target_effect": TARGET_EFFECT, "seeds": chosen,
            "detectable_at_chosen": table[chosen]}


def analyse(out: Path, arms: list[str]) -> dict:
    rows = results(out)
    analysis: dict = {"rule": RULE, "regimes": {}}
    pvalues = {}
    for regime in REGIMES:
        seeds = complete_seeds(rows, regime, arms)
        per_arm = {}
        for arm in arms[1:]:
            per_metric = {}
            for key, _, higher in METRICS:
                diffs = differences(rows, regime, arm, key, seeds)
                if len(diffs) < 2:
                    continue
                test = paired_test(diffs)
                test["seeds_up"] = sum(d > 0 for d in diffs)
                test["per_seed"] = diffs
                test["higher_is_better"] = higher
                per_metric[key] = test
            per_arm[arm] = per_metric
            if PRIMARY in per_metric and per_metric[PRIMARY]["p"] is not None:
                pvalues[f"{regime}/{arm}"] = per_metric[PRIMARY]["p"]
        means = {arm: {key: statistics.fmean(v) for key in dict.fromkeys(k for k, _, _ in METRICS)
                       if (v := [r["metrics"][key] for r in rows if r["regime"] == regime and r["arm"] == arm
                                 and r["seed"] in seeds and r["metrics"].get(key) is not None])}
                 for arm in arms}
        analysis["regimes"][regime] = {"seeds": seeds, "differences": per_arm, "means": means}
    adjusted = holm(pvalues)
    for name, p in adjusted.items():
        regime, arm = name.split("/")
        test = analysis["regimes"][regime]["differences"][arm][PRIMARY]
        test["p_holm"] = p
        n = test["n"]
        if p < ALPHA and test["mean"] > 0 and test["seeds_up"] > n / 2:
            test["verdict"] = "helps"
        elif p < ALPHA and test["mean"] < 0 and n - test["seeds_up"] > n / 2:
            test["verdict"] = "hurts"
        else:
            test["verdict"] = "no effect shown"
    return analysis


RULE = (f"primary: generation accuracy on the test split; per regime and arm, the paired difference arm - vanilla over "
        f"seeds, a two-sided paired t-test, Holm-adjusted over every (regime, arm) comparison; 'helps' only when the "
        f"adjusted p < {ALPHA}, the mean difference is positive and most seeds moved up ('hurts' the mirror), "
        f"else 'no effect shown'. Secondary metrics: mean difference and 95% interval, exploratory (no correction).")


def write_outputs(out: Path, analysis: dict, arms: list[str]) -> None:
    """summary.json, per-seed.csv, curves.png and verdicts.md in `out`."""
    from fadscale.runtime.io import atomic_write_json, atomic_write_text

    rows = results(out)
    atomic_write_json(out / "summary.json", analysis)
    keys = [k for k, _, _ in METRICS]
    with open(out / "per-seed.csv.partial", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["regime", "arm", "seed", *keys, "evaluator_accuracy_on_test", "alignment_expert_val_accuracy",
                         "train_s"])
        for r in sorted(rows, key=lambda r: (r["regime"], arms.index(r["arm"]) if r["arm"] in arms else 99, r["seed"])):
            writer.writerow([r["regime"], r["arm"], r["seed"],
                             *(_fmt(r["metrics"].get(k)) for k in keys),
                             _fmt(r.get("evaluator_accuracy_on_test")), _fmt(r.get("alignment_expert_val_accuracy")),
                             r.get("train_s")])
    os.replace(out / "per-seed.csv.partial", out / "per-seed.csv")
    plot_curves(rows, arms, out / "curves.png")
    atomic_write_text(out / "verdicts.md", verdict_tables(analysis))


def verdict_tables(analysis: dict) -> str:
    """The results page's two tables, in Markdown: the primary metric under the rule, then the secondary ones."""
    def interval(t: dict, digits: int) -> str:
        if t.get("ci95") is None:
            return f"{t['mean']:+.{digits}f}"
        return f"{t['mean']:+.{digits}f} [{t['ci95'][0]:+.{digits}f}, {t['ci95'][1]:+.{digits}f}]"

    lines = ["| regime | arm | seeds | vanilla | arm | difference [95% interval] | p | Holm p | seeds up | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for regime, block in analysis["regimes"].items():
        for arm, per_metric in block["differences"].items():
            t = per_metric.get(PRIMARY)
            if t is None:
                continue
            p = "" if t["p"] is None else f"{t['p']:.3f}"
            holm_p = f"{t['p_holm']:.3f}" if "p_holm" in t else ""
            lines.append(f"| {regime} | {arm} | {t['n']} | {block['means']['vanilla'][PRIMARY]:.3f} | "
                         f"{block['means'][arm][PRIMARY]:.3f} | {interval(t, 3)} | {p} | {holm_p} | "
                         f"{t['seeds_up']}/{t['n']} | {t.get('verdict', '-')} |")
    secondary = [key for key, _, _ in METRICS if key != PRIMARY]
    lines += ["", "| regime | arm | " + " | ".join(secondary) + " |", "|---|---|" + "---|" * len(secondary)]
    for regime, block in analysis["regimes"].items():
        for arm, per_metric in block["differences"].items():
            cells = [interval(per_metric[key], 1 if key == "steps_to_bar" else 3) + f" (n={per_metric[key]['n']})"
                     if key in per_metric else "" for key in secondary]
            lines.append(f"| {regime} | {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    return "" if value is None else f"{value:.4f}"


def plot_curves(rows: list[dict], arms: list[str], path: Path) -> None:
    """Probe generation accuracy against steps: per regime, each arm's mean over seeds and its min-max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(REGIMES), figsize=(6 * len(REGIMES), 4), sharey=True)
    for ax, regime in zip(axes, REGIMES):
        for arm in arms:
            curves = [r["curve"] for r in rows if r["regime"] == regime and r["arm"] == arm and r["curve"]]
            if not curves:
                continue
            steps = [p["step"] for p in curves[0]]
            values = [[c[i]["gen_acc"] for c in curves if len(c) > i] for i in range(len(steps))]
            mean = [statistics.fmean(v) for v in values]
            ax.plot(steps, mean, label=f"{arm} (n={len(curves)})")
            ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], alpha=0.15)
        ax.axhline(CONVERGENCE_BAR, color="grey", lw=0.8, ls="--")
        ax.set_title(f"regime {regime}")
        ax.set_xlabel("training step")
    axes[0].set_ylabel("probe generation accuracy (val, 128 tiles)")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(str(path) + ".partial.png", dpi=110)
    os.replace(str(path) + ".partial.png", path)
    plt.close(fig)


def print_analysis(analysis: dict) -> None:
    for regime, block in analysis["regimes"].items():
        print(f"regime {regime}: seeds {block['seeds']}")
        for arm, per_metric in block["differences"].items():
            primary = per_metric.get(PRIMARY, {})
            print(f"  {arm}: {primary.get('verdict', '-')}")
            for key, t in per_metric.items():
                ci = "" if t["ci95"] is None else f" [{t['ci95'][0]:+.4f}, {t['ci95'][1]:+.4f}]"
                p = "" if t["p"] is None else f" p {t['p']:.3f}"
                holm_p = f" Holm p {t['p_holm']:.3f}" if "p_holm" in t else ""
                print(f"    {key:<15} {t['mean']:+.4f}{ci}{p}{holm_p}  up {t['seeds_up']}/{t['n']}")


def print_status(out: Path, seeds: list[int], regimes: list[str], arms: list[str]) -> None:
    """Which cells are finished (no figures: the effects are not looked at before the pilot's decision)."""
    rows = results(out)
    done = {(r["seed"], r["regime"], r["arm"]) for r in rows}
    for seed in sorted(set(seeds) | {r["seed"] for r in rows}):
        for regime in regimes:
            mark = " ".join(arm if (seed, regime, arm) in done else "." for arm in arms)
            print(f"seed {seed} {regime:<5} {mark}")
    if rows:
        seconds = [r["train_s"] + r["sample_s"] for r in rows]
        wanted = set(cells(seeds, regimes, arms))
        left = len(wanted - done)
        print(f"{len(wanted & done)} of {len(wanted)} cells; train + sample per cell: median "
              f"{statistics.median(seconds):.0f} s (the evaluation and each seed's experts come on top); "
              f"{left} left: about {left * statistics.median(seconds) / 3600:.1f} core-hours of that")


# ------------------------------------------------------------------------------------------ main


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("command", choices=["run", "pilot", "report", "status"])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "study-fad")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(SEEDS)))
    parser.add_argument("--regimes", nargs="+", choices=list(REGIMES), default=list(REGIMES))
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (set it on a shared machine)")
    parser.add_argument("--quick", action="store_true", help="procedural tiles, a few steps: a smoke test")
    args = parser.parse_args(argv)
    if args.command in ("pilot", "report") and args.arms[0] != "vanilla":
        raise SystemExit("--arms must start with vanilla (the differences are against it)")
    if args.command == "status":
        print_status(args.out, args.seeds, args.regimes, args.arms)
        return
    if args.command == "pilot":
        print(json.dumps(pilot(args.out, args.arms), indent=1))
        return
    if args.command == "report":
        analysis = analyse(args.out, args.arms)
        write_outputs(args.out, analysis, args.arms)
        print_analysis(analysis)
        return
    from fadscale.runtime.distributed import set_cpu_threads

    set_cpu_threads(args.threads)
    if not args.quick and not DATA.is_dir():
        raise SystemExit(f"{DATA}: the real tiles are not there (see ../shared/data/README)")
    args.out.mkdir(parents=True, exist_ok=True)
    ensure_shards(args.out, args.quick)
    todo = cells(args.seeds, args.regimes, args.arms)
    for i, (seed, regime, arm) in enumerate(todo, 1):
        started = time.perf_counter()
        result = run_cell(args.out, seed, regime, arm, args.quick)
        print(f"[{i}/{len(todo)}] seed {seed} {regime} {arm}: generation accuracy {result['metrics']['gen_acc']:.3f}, "
              f"Frechet ratio {result['metrics']['frechet_ratio']:.2f} ({time.perf_counter() - started:.0f} s)",
              file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
