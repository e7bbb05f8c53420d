"""`fadscale evaluate`: real validation tiles fed as if they were samples, the alignment-expert refusal,
and one-line errors for bad sample folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from fadscale.evaluate import evaluate_samples
from fadscale.core.evaluation.inputs import export_real_tiles
from fadscale.errors import FadscaleError

from .conftest import run_module


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def real_as_samples(tiny_shards, tmp_path_factory) -> Path:
    """The real val tiles exported as a sample set (<CLASS>/<index>.png + manifest)."""
    return export_real_tiles(tiny_shards, tmp_path_factory.mktemp("evaluate") / "real-val")


def _copy(folder: Path, tmp_path: Path) -> Path:
    out = tmp_path / "samples"
    shutil.copytree(folder, out)
    return out


def test_evaluator_on_real_val_tiles_gives_its_card_accuracy(real_as_samples, tiny_expert, tiny_shards, tmp_path):
    out = tmp_path / "report"
    report = evaluate_samples(real_as_samples, tiny_expert, out, real__shards=str(tiny_shards),
                              utility__enabled=False, metrics__ssim_pairs=10, metrics__kid_subsets=5)
    card = json.loads(Path(tiny_expert).read_text())
    acc = report["generation_accuracy"]
    # Exact on CPU; on a GPU the card's accuracy was measured under bf16 autocast, the evaluator runs fp32.
    tolerance = 2 / card["val_count"] if torch.cuda.is_available() else 1e-9
    assert acc["overall"] == pytest.approx(card["val_accuracy"], abs=tolerance)
    if not torch.cuda.is_available():
        assert acc["per_class"] == pytest.approx(card["val_accuracy_per_class"], abs=1e-6)
    assert acc["count"] == card["val_count"] == report["real"]["count"]
    assert report["real_accuracy"]["overall"] == acc["overall"]
    # The same tiles on both sides: zero distance, full precision and recall, equal diversity.
    overall = report["distances"]["overall"]
    assert overall["frechet"] == pytest.approx(0.0, abs=1e-6)
    assert overall["precision"] == 1.0 and overall["recall"] == 1.0
    for name, entry in report["diversity"]["per_class"].items():
        assert entry["generated"] == pytest.approx(entry["real"], abs=1e-12), name
    # Orientation coherence: equal on the same tiles, and it tells stroma's fibres from lymphocytes' dots.
    orientation = report["orientation"]["per_class"]
    for name, entry in orientation.items():
        assert entry["generated"] == pytest.approx(entry["real"], abs=1e-12) and entry["gap"] == pytest.approx(0), name
    assert orientation["STROMA"]["real"] > 2 * orientation["LYMPHO"]["real"]
    assert report["inception_fid"]["computed"] is False
    assert report["utility"]["computed"] is False
    assert any("alignment expert is unknown" in w for w in report["warnings"])
    # The report folder.
    assert json.loads((out / "report.json").read_text())["generation_accuracy"]["overall"] == acc["overall"]
    markdown = (out / "report.md").read_text()
    assert "| generation accuracy" in markdown and "| TUMOR |" in markdown and "| orientation gen. |" in markdown
    assert "| Frechet distance, real train vs real val (reference) |" in markdown  # the split it scored
    assert (out / "confusion.png").is_file() and (out / "config.yaml").is_file()
    for name in card["classes"]:
        with Image.open(out / "grids" / f"{name}.png") as grid:
            assert grid.size == (32 * 6, 32 * 2)  # 6 real val tiles over 6 "generated" ones
    with pytest.raises(FadscaleError, match="already exists"):
        evaluate_samples(real_as_samples, tiny_expert, out, real__shards=str(tiny_shards), utility__enabled=False)


def test_alignment_expert_is_refused_as_evaluator_unless_allowed(real_as_samples, tiny_expert, tiny_shards, tmp_path):
    common = dict(real__shards=str(tiny_shards), utility__enabled=False, metrics__ssim_pairs=4, metrics__kid_subsets=2,
                  metrics__per_class=False)
    # Named explicitly ...
    with pytest.raises(FadscaleError, match="alignment expert"):
        evaluate_samples(real_as_samples, tiny_expert, evaluator__alignment_expert=str(tiny_expert), **common)
    # ... or through the run card recorded in the sample manifest.
    samples = _copy(real_as_samples, tmp_path)
    manifest = json.loads((samples / "manifest.json").read_text())
    sha = json.loads(Path(tiny_expert).read_text())["sha256"]
    manifest["run"] = {"path": "somewhere/final", "method": "fad", "step": 8,
                       "expert": {"card": str(tiny_expert), "sha256": sha}}
    (samples / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FadscaleError, match="alignment expert.*allow_alignment_expert"):
        evaluate_samples(samples, tiny_expert, **common)
    # The override works and is reported.
    out = tmp_path / "report"
    report = evaluate_samples(samples, tiny_expert, out, evaluator__allow_alignment_expert=True, **common)
    assert report["evaluator"]["is_alignment_expert"] is True
    assert report["evaluator"]["allowed_anyway"] is True
    assert any("IS the alignment expert" in w for w in report["warnings"])
    assert "the alignment expert itself" in (out / "report.md").read_text()


def test_independence_is_decided_from_the_cards_training_data(real_as_samples, tiny_expert, tiny_shards, tmp_path):
    common = dict(real__shards=str(tiny_shards), utility__enabled=False, metrics__ssim_pairs=4, metrics__kid_subsets=2,
                  metrics__per_class=False)
    evaluator = json.loads(Path(tiny_expert).read_text())

    def alignment(name: str, **data) -> str:  # another expert's card: other weights, the given training data
        card = {**evaluator, "sha256": "f" * 64, "data": {**evaluator["data"], **data}}
        path = tmp_path / name / "expert.json"
        path.parent.mkdir()
        path.write_text(json.dumps(card))
        return str(path)

    # The evaluator (subset "all") and an expert on half A of the same shards share A's tiles: refused.
    with pytest.raises(FadscaleError, match="shares training tiles with the alignment expert.*subsets all and A"):
        evaluate_samples(real_as_samples, tiny_expert, evaluator__alignment_expert=alignment("a", subset="A"), **common)
    # Another shard set: independent, and the report says on what basis.
    report = evaluate_samples(real_as_samples, tiny_expert, tmp_path / "r1",
                              evaluator__alignment_expert=alignment("other", manifest_sha256="0" * 64), **common)
    assert report["evaluator"]["shares_training_tiles"] is False
    assert "different shard sets" in (tmp_path / "r1/report.md").read_text()
    from fadscale.core.models.expert import shared_training_tiles

    a, b = ({"sha256": s, "data": {"manifest_sha256": "m", "subset": h, "subset_seed": 0}} for s, h in (("1", "A"), ("2", "B")))
    assert shared_training_tiles(a, b) == (False, "disjoint halves A and B of the same shards (subset seed 0)")
    assert shared_training_tiles(a, {**b, "data": {**b["data"], "subset_seed": 1}})[0] is True
    assert shared_training_tiles(a, {**a, "sha256": "3"})[0] is True


def test_utility_classifiers(real_as_samples, tiny_expert, tiny_shards):
    report = evaluate_samples(real_as_samples, tiny_expert, real__shards=str(tiny_shards), utility__epochs=1,
                              metrics__ssim_pairs=4, metrics__kid_subsets=2, metrics__per_class=False)
    utility = report["utility"]
    assert utility["computed"] is True
    assert set(utility["setups"]) == {"real", "real (same count)", "synthetic", "real+synthetic"}
    real_train = utility["real_train_tiles"]
    assert utility["setups"]["synthetic"]["train_tiles"] == 48
    assert utility["setups"]["real (same count)"]["train_tiles"] == 48  # as many real tiles as synthetic ones
    assert utility["setups"]["real+synthetic"]["train_tiles"] == real_train + 48
    for result in utility["setups"].values():
        assert 0.0 <= result["overall"] <= 1.0 and result["count"] == 48


def test_copy_check_passes_unseen_tiles_and_fails_a_generator_that_memorises(real_as_samples, tiny_expert,
                                                                            tiny_shards, tmp_path):
    common = dict(real__shards=str(tiny_shards), utility__enabled=False, metrics__ssim_pairs=4, metrics__kid_subsets=2,
                  metrics__per_class=False)
    # The scored val tiles themselves, as if generated: exactly as near to the training tiles as held-out ones.
    honest = evaluate_samples(real_as_samples, tiny_expert, tmp_path / "honest", **common)["copies"]
    assert honest["computed"] and honest["held_out_tiles"] == 48
    for space in ("pixels", "features"):
        assert honest[space]["share"] == honest[space]["held_out_share"] <= 0.1
    # A "generator" that hands back its training tiles, some of them rotated or mirrored.
    copies = export_real_tiles(tiny_shards, tmp_path / "train-tiles", split="train", max_per_class=6)
    for i, tile in enumerate(sorted(copies.glob("images/*/*.png"))):
        with Image.open(tile) as image:
            image.transpose([Image.Transpose.ROTATE_90, Image.Transpose.FLIP_LEFT_RIGHT][i % 2]).save(tile)
    memorised = evaluate_samples(copies, tiny_expert, tmp_path / "copied", **common)
    assert memorised["copies"]["pixels"]["share"] == 1.0 and memorised["copies"]["share"] == 1.0
    assert all(pair["distance"] == pytest.approx(0.0, abs=1e-3) for pair in memorised["copies"]["closest"])
    assert "## Copy check" in (tmp_path / "copied/report.md").read_text()
    with Image.open(tmp_path / "copied/copies.png") as picture:  # the closest pairs, one pair a row
        assert picture.size == (128 * 2, 128 * 8)  # enlarged 4x to be judged by eye
    # Scoring the training tiles themselves holds nothing out: no copy check, and the report says why.
    on_train = evaluate_samples(real_as_samples, tiny_expert, real__split="train", **common)
    assert on_train["copies"] == {"computed": False,
                                  "reason": "the scored real tiles are the train split: nothing is held out"}
    from fadscale.core.evaluation.report import markdown_report

    assert "| Frechet distance, real train vs real train (reference) |" in markdown_report(on_train)


def test_class_colour_is_compared_channel_by_channel():
    from fadscale.core.evaluation.distances import intensity_by_class

    torch.manual_seed(0)
    real = {"A": torch.randint(60, 200, (10, 3, 8, 8), dtype=torch.uint8)}
    train = {"A": torch.randint(60, 200, (30, 3, 8, 8), dtype=torch.uint8)}
    reddened = torch.cat([real["A"], train["A"]]).clone()
    reddened[:, 0] += 26  # +0.10 in red only: a third of that in grey level
    result = intensity_by_class({"A": reddened}, real, train, ["A"])
    entry = result["per_class"]["A"]
    assert entry["channel_gap"] == pytest.approx([26 / 255, 0.0, 0.0], abs=1e-6)
    assert entry["gap"] == pytest.approx(26 / 255 / 3, abs=1e-6)
    assert result["max_abs_channel_gap"] == pytest.approx(26 / 255, abs=1e-6)
    assert result["max_abs_channel_gap"] > 0.05 > result["max_abs_gap"]  # a colour bar sees what grey would miss


def test_auto_scores_the_test_part_where_the_shards_have_one(tmp_path):
    from fadscale.data.shard import shard_dataset
    from fadscale.evaluate import scored_split

    plain = tmp_path / "plain"
    shard_dataset("procedural:per_class=10,size=16,seed=0", plain, val_fraction=0.2, progress=False)
    held = tmp_path / "held"
    shard_dataset("procedural:per_class=10,size=16,seed=0", held, val_fraction=0.2, test_fraction=0.2, progress=False)
    assert scored_split(plain, "auto") == "val" and scored_split(held, "auto") == "test"
    assert scored_split(held, "val") == "val"


def test_bad_sample_folders_give_one_line_errors(real_as_samples, tiny_expert, tiny_shards, tmp_path):
    def check(folder, pattern):
        with pytest.raises(FadscaleError, match=pattern) as info:
            evaluate_samples(folder, tiny_expert, real__shards=str(tiny_shards), utility__enabled=False)
        assert "\n" not in str(info.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    check(empty, "no generated tiles")
    check(tmp_path / "absent", "not found")

    missing = _copy(real_as_samples, tmp_path / "m")
    shutil.rmtree(missing / "images/04_LYMPHO")
    check(missing, "LYMPHO missing")

    sizes = _copy(real_as_samples, tmp_path / "s")
    Image.new("L", (16, 16), 128).save(sizes / "images/05_DEBRIS" / "00002.png")
    check(sizes, "mismatched image sizes: images/05_DEBRIS/00002.png is 16x16")

    short = _copy(real_as_samples, tmp_path / "c")
    (short / "images/08_EMPTY" / "00000.png").unlink()
    check(short, "counts differ from its manifest: EMPTY")

    stranger = _copy(real_as_samples, tmp_path / "x")
    (stranger / "images/tumour").mkdir()
    shutil.copy(stranger / "images/01_TUMOR" / "00000.png", stranger / "images/tumour" / "00000.png")
    check(stranger, "images/tumour are not classes")


def test_cli_reports_a_bad_folder_in_one_line(tiny_expert, tiny_shards, tmp_path):
    (tmp_path / "empty").mkdir()
    config = tmp_path / "evaluate.yaml"
    config.write_text(yaml.safe_dump({"run": {"out_dir": str(tmp_path / "report")}, "samples": str(tmp_path / "empty"),
                                      "real": {"shards": str(tiny_shards)}, "evaluator": {"card": str(tiny_expert)}}))
    proc = run_module("fadscale.evaluate", "--config", str(config), "--set", "utility.enabled=false")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: samples ")
    assert "no generated tiles" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "report").exists()
