"""tools/diag_adam_steps.py: a replay from a checkpoint logs the run's own losses and Adam's largest steps."""

from __future__ import annotations

import pytest

from fadscale.errors import FadscaleError
from fadscale.runtime.logging import read_metrics

from tests.conftest import fad_config, train_fad


def test_a_replay_from_a_checkpoint_logs_the_runs_own_losses_and_adams_largest_steps(tiny_shards, tiny_expert, tmp_path):
    from tools.diag_adam_steps import replay

    cfg = fad_config(tiny_shards, tiny_expert, tmp_path / "run", tmp_path / "cache", align__enabled=False,
                     train__max_steps=5, checkpoint__every=2, checkpoint__keep_last=3)
    train_fad(cfg)
    before = read_metrics(tmp_path / "run")
    logged = {row["step"]: row["loss/noise"] for row in before}
    rows = replay(tmp_path / "run", 2, 4, tmp_path / "replay", [], emit=lambda line: None)
    assert [row["step"] for row in rows] == [3, 4]
    for row in rows:
        assert row["loss"] == pytest.approx(logged[row["step"]], abs=1e-4)  # the same steps, not new ones
        assert row["adam_max"] > 0 and row["tensor"]
    assert read_metrics(tmp_path / "run") == before  # the replay trained in its own folder
    with pytest.raises(FadscaleError, match="no such checkpoint"):
        replay(tmp_path / "run", 1, 2, tmp_path / "replay", [], emit=lambda line: None)
    with pytest.raises(FadscaleError, match="must not train into the run"):
        replay(tmp_path / "run", 2, 4, tmp_path / "run", [], emit=lambda line: None)
