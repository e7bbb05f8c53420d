"""Every command the README and the usage guide show still exists: each `fadscale <command>` answers -h, each
`python -m` / `torchrun -m` / `accelerate launch -m` module is an entry point that answers -h. And the docs hold
together: every file they link exists, every results CSV is a rectangle."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fadscale.cli import app

REPO = Path(__file__).resolve().parents[1]
GUIDES = [REPO / "README.md", REPO / "docs" / "usage.md"]


def shown(pattern: str) -> set[str]:
    """Matches of `pattern` in the guides' code: fenced blocks and `inline code`, not prose."""
    found = set()
    for guide in GUIDES:
        text = guide.read_text(encoding="utf-8")
        code = re.findall(r"```.*?```", text, flags=re.S) + re.findall(r"`[^`\n]+`", text)
        for block in code:
            found.update(re.findall(pattern, block))
    return found


COMMANDS = sorted(shown(r"\bfadscale ((?:config )?[a-z][a-z-]+)\b") - {"config"})
MODULES = sorted(shown(r"-m (fadscale(?:\.[a-z_]+)+)"))


def test_the_guides_show_commands_and_modules():
    assert {"demo", "train", "shard-data", "submit"} <= set(COMMANDS) and "fadscale.train_fad" in MODULES


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_in_the_guides_answers_help(command):
    words = command.split()
    result = CliRunner().invoke(app, [*words, "-h"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


@pytest.mark.parametrize("module", MODULES)
def test_each_module_in_the_guides_is_an_entry_point(module, capsys):
    import importlib

    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as stop:
        main(["-h"])
    assert stop.value.code == 0
    assert "--config" in capsys.readouterr().out


RESULTS = REPO / "docs" / "results"


@pytest.mark.parametrize("table", sorted(RESULTS.glob("*.csv")), ids=lambda path: path.name)
def test_each_results_table_has_one_width(table):
    """A results CSV is read by spreadsheets and pandas: a name with an unquoted comma shifts its row."""
    import csv

    rows = list(csv.reader(table.read_text(encoding="utf-8").splitlines()))
    header = rows[0]
    wrong = [(number, row[0]) for number, row in enumerate(rows[1:], start=2) if len(row) != len(header)]
    assert not wrong, f"{table.name}: rows whose width is not the header's {len(header)}: {wrong}"


def test_each_file_the_docs_link_exists():
    linked = []
    for page in [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if "://" not in target and not target.startswith("mailto:"):
                linked.append((page, target))
    assert linked
    missing = [f"{page.relative_to(REPO)} -> {target}" for page, target in linked if not (page.parent / target).exists()]
    assert not missing, missing
