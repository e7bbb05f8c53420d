"""The JSON artifacts the stages hand each other, each with its one writer and its one reader.

| artifact          | file (in its folder)   | written by             | read by                                |
|-------------------|------------------------|------------------------|----------------------------------------|
| expert card       | expert.json            | train_expert           | cache_features, train_fad, evaluate    |
| cache manifest    | manifest.json          | cache_features         | train_fad (and the loader, as shards)  |
| run card          | final/run_card.json    | train_fad              | sample, tools                          |
| sample manifest   | samples/manifest.json  | sample (and evaluate's real-tile export) | evaluate             |
| evaluation report | report.json            | evaluate               | demo, tools                            |

An artifact is a JSON object with a format tag and required keys of known types (`Artifact.required`);
`write` adds the tag, checks the keys and writes atomically; `read` checks the tag and the keys and
answers a malformed file with one line naming the file and the key. Extra keys are kept: a reader of
an older fadscale ignores what it does not know.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fadscale.errors import FadscaleError
from fadscale.runtime.io import atomic_write_json, read_json

HEAD_FILE = "fad_head.safetensors"  # final/: the conditioning table and the projector, beside the UNet folders

_JSON_TYPES = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number",
               bool: "true or false"}


@dataclass(frozen=True)
class Artifact:
    name: str  # in messages: "expert card"
    filename: str  # the file inside the artifact's folder
    format: str  # the value of the format tag
    required: dict[str, tuple[type, ...]] = field(default_factory=dict)  # key -> accepted JSON types
    format_key: tuple[str, ...] = ("format",)  # where the tag lives (the cache's is nested)

    def path(self, where: str | os.PathLike) -> Path:
        """`where` may be the file itself or its folder."""
        where = Path(where)
        return where / self.filename if where.is_dir() or where.suffix != ".json" else where

    def write(self, where: str | os.PathLike, data: dict) -> dict:
        """Tag, check and write atomically; returns what was written."""
        data = {k: v for k, v in data.items() if not k.startswith("_")}
        _set(data, self.format_key, self.format)
        path = self.path(where)
        self._check(data, path)
        atomic_write_json(path, data)
        return data

    def read(self, where: str | os.PathLike) -> dict:
        """The checked object, with `_path` (the file it came from) added."""
        path = self.path(where)
        data = read_json(path, self.name)
        if not isinstance(data, dict) or _get(data, self.format_key) != self.format:
            raise FadscaleError(f"{path}: not a fadscale {self.name} (no {'.'.join(self.format_key)} "
                                f"{self.format!r})")
        self._check(data, path)
        data["_path"] = str(path)
        return data

    def _check(self, data: dict, path: Path) -> None:
        for key, types in self.required.items():
            value = _get(data, tuple(key.split(".")))
            if value is _MISSING:
                raise FadscaleError(f"{path}: {self.name} without {key!r}")
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                expected = " or ".join(_JSON_TYPES.get(t, t.__name__) for t in types)
                raise FadscaleError(f"{path}: {self.name} key {key!r} is {type(value).__name__}; expected {expected}")


_MISSING = object()


def _get(data: Any, keys: tuple[str, ...]) -> Any:
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return _MISSING
        data = data[key]
    return data


def _set(data: dict, keys: tuple[str, ...], value: Any) -> None:
    for key in keys[:-1]:
        data = data.setdefault(key, {})
    data[keys[-1]] = value


NUMBER = (int, float)

EXPERT_CARD = Artifact("expert card", "expert.json", "fadscale-expert", {
    "arch": (str,), "head": (str,), "classes": (list,), "in_chans": (int,), "input_size": (int,),
    "normalization": (dict,), "feature_dim": (int,), "weights": (str,), "sha256": (str,)})

CACHE_MANIFEST = Artifact("feature cache manifest", "manifest.json", "fadscale-feature-cache", {
    "splits": (dict,), "classes": (list,), "cache.fingerprint": (dict,), "cache.arrays": (dict,)},
    format_key=("cache", "format"))

RUN_CARD = Artifact("run card", "run_card.json", "fadscale-fad-run", {
    "step": (int,), "method": (str,), "classes": (list,), "space": (str,), "channels": (int,),
    "image_size": (int,), "sample_size": (int,), "null_index": (int,), "noise": (dict,), "config": (dict,)})

SAMPLE_MANIFEST = Artifact("sample manifest", "manifest.json", "fadscale-samples", {
    "format_version": (int,), "classes": (list,), "class_folders": (dict,), "image": (dict,), "per_class": (dict,),
    "count": (int,)})

EVALUATION_REPORT = Artifact("evaluation report", "report.json", "fadscale-evaluation", {
    "classes": (list,), "generation_accuracy": (dict,), "real_accuracy": (dict,), "distances": (dict,),
    "evaluator": (dict,), "samples": (dict,)})
