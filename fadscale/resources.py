"""Where the shipped YAML configs and launch templates are: the source tree's configs/ and launch/ in a
clone (or an editable install), or their copies inside the installed package (`pip install .`, see
pyproject.toml: they are installed as fadscale/bundled/)."""

from __future__ import annotations

from pathlib import Path

from fadscale.errors import FadscaleError

_PACKAGE = Path(__file__).resolve().parent


def shipped(kind: str) -> Path:
    """The folder of `kind` ("configs" or "launch")."""
    for candidate in (_PACKAGE.parent / kind, _PACKAGE / "bundled" / kind):
        if candidate.is_dir():
            return candidate
    raise FadscaleError(f"fadscale's {kind}/ folder is missing from this installation ({_PACKAGE}); reinstall it")
