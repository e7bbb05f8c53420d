"""The settings a run was trained with, kept in every checkpoint and compared when it resumes.

A resumed run must stay the run its records describe: resuming with another prediction type, learning
rate, batch, seed or data set would train something the run card does not say. So every checkpoint
holds `settings_fingerprint(config)`: the config flattened to dotted keys, less the keys that may change
on resume (`MAY_CHANGE`), with the data and the expert named by the digest of what they are, not by
their path (a moved folder is the same data; another data set at the same path is not).

`run.resume: force` continues despite a difference; the trainer records it in the checkpoint state,
the run's metrics and its card.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from fadscale.runtime.io import sha256_file

# Keys (or key prefixes ending in ".") that may differ between a run and its resume: more steps or
# epochs, where and how often to log, evaluate and checkpoint, the process layout, the loader's workers.
MAY_CHANGE = (
    "run.out_dir", "run.resume",
    "train.max_steps", "train.epochs", "train.early_stopping", "train.log_every", "train.sample_every",
    "train.nan_tolerance", "checkpoint.", "eval.", "data.workers", "data.on_corrupt", "cache.dir", "cache.batch_size",
)

# Path-valued keys replaced by the digest of the file they name.
_IDENTITY_FILES = {"data.shards": "manifest.json", "expert": ""}


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: list(tree) if isinstance(tree, tuple) else tree}


def _may_change(key: str) -> bool:
    return any(key == rule or (rule.endswith(".") and key.startswith(rule)) for rule in MAY_CHANGE)


def _identity(path: str, member: str) -> str:
    file = Path(path) / member if member else Path(path)
    try:
        return "sha256:" + sha256_file(file)
    except OSError:
        return f"unreadable:{file}"


def settings_fingerprint(config: BaseModel) -> dict[str, Any]:
    """{dotted key: value} of every setting that changes what is trained."""
    flat = _flatten(config.model_dump(mode="json"))
    out = {}
    for key, value in flat.items():
        if _may_change(key):
            continue
        if key in _IDENTITY_FILES and isinstance(value, str):
            value = _identity(value, _IDENTITY_FILES[key])
        out[key] = value
    return out


def digest(fingerprint: dict[str, Any]) -> str:
    """A short digest of a fingerprint (for cards and log lines)."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:16]


# Settings added after runs had been saved, with what every run saved before them trained with: a checkpoint
# without the key resumes unchanged when the config says that value. (Other added keys default to None, which
# is how a missing key reads.)
ADDED_LATER = {"optim.name": "adamw"}


def changed_settings(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, list]:
    """{key: [saved value, current value]} for every key that differs (a missing key reads as None, or as
    its ADDED_LATER value on the saved side)."""
    keys = sorted(set(saved) | set(current))
    old = {k: saved.get(k, ADDED_LATER.get(k)) for k in keys}
    return {k: [old[k], current.get(k)] for k in keys if old[k] != current.get(k)}


def describe_changes(changes: dict[str, list], limit: int = 6) -> str:
    """'optim.lr 0.002 -> 0.004, data.batch_size 16 -> 32' (long values cut, at most `limit` keys)."""
    def short(value: Any) -> str:
        text = json.dumps(value, default=str)
        return text if len(text) <= 40 else text[:30] + "..." + text[-6:]

    parts = [f"{key} {short(old)} -> {short(new)}" for key, (old, new) in list(changes.items())[:limit]]
    if len(changes) > limit:
        parts.append(f"and {len(changes) - limit} more")
    return ", ".join(parts)
