"""Configs from YAML files and `--set section.key=value` overrides, validated against the classes of
fadscale.config.schema.

Every problem (missing file, unknown key, wrong type, bad value) becomes one `FadscaleError` line
that names the file and key, what was given and what was expected, with a close-match suggestion
for a misspelt key.
"""

from __future__ import annotations

import difflib
import re
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from fadscale.config.schema import ConfigT
from fadscale.errors import FadscaleError
from fadscale.runtime.io import atomic_write_text


_FLOAT_WITHOUT_DOT = re.compile(r"^[-+]?[0-9]+[eE][-+]?[0-9]+$")
_NULLS = ("null", "Null", "NULL", "~", "none", "None")
# YAML 1.1 (PyYAML) reads these unquoted words as booleans.
_YAML_BOOL_WORDS = "yes/no/on/off/true/false"


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The config section class an annotation stands for (also inside `X | None`), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) in (Union, types.UnionType):
        for arg in get_args(annotation):
            found = _section_model(arg)
            if found is not None:
                return found
    return None


def _field_at(model: type[BaseModel], parts) -> tuple[FieldInfo | None, int]:
    """The field that `parts` (a key path) lands on and how many parts it used; (None, n) when part n
    is not a field."""
    current = model
    for depth, part in enumerate(parts):
        field = current.model_fields.get(str(part))
        if field is None:
            return None, depth
        nested = _section_model(field.annotation)
        if nested is None or depth == len(parts) - 1:
            return field, depth + 1
        current = nested
    return None, len(parts)


def _accepts_str(annotation: Any) -> bool:
    """A field whose values are text (str, a Literal of strings, optionally None)."""
    if annotation is str:
        return True
    origin = get_origin(annotation)
    if origin is Literal:
        return all(isinstance(arg, str) for arg in get_args(annotation))
    if origin in (Union, types.UnionType):
        args = [arg for arg in get_args(annotation) if arg is not type(None)]
        return bool(args) and all(_accepts_str(arg) for arg in args)
    return False


def _allows_none(annotation: Any) -> bool:
    return get_origin(annotation) in (Union, types.UnionType) and type(None) in get_args(annotation)


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _describe(annotation: Any) -> str:
    """'an integer', "one of 'auto', 'no', 'bf16'", 'a list of 2 numbers', ... for an error message."""
    if annotation in _TYPE_WORDS:
        return _TYPE_WORDS[annotation]
    section = _section_model(annotation)
    if section is not None and isinstance(annotation, type):
        return f"a section (a mapping with keys: {', '.join(section.model_fields)})"
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return "one of " + ", ".join(repr(arg) for arg in args)
    if origin in (Union, types.UnionType):
        words = [_describe(arg) for arg in args if arg is not type(None)]
        return " or ".join(words) + (" or null" if type(None) in args else "")
    if origin is tuple and args and args[-1] is not Ellipsis:
        kinds = {_describe(arg) for arg in args}
        if len(kinds) == 1:
            word = kinds.pop().removeprefix("an ").removeprefix("a ")
            return f"a list of {len(args)} {word}s"
        return "a list [" + ", ".join(_describe(arg) for arg in args) + "]"
    return getattr(annotation, "__name__", str(annotation))


def _bounds(field: FieldInfo) -> str:
    words = []
    for item in field.metadata:
        for attr, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            value = getattr(item, attr, None)
            if value is not None:
                words.append(f"{op} {value}")
    return " and ".join(words)


def _expected(field: FieldInfo) -> str:
    text = _describe(field.annotation)
    bounds = _bounds(field)
    if bounds:
        text = text.replace(" or null", "") + f" {bounds}" + (" (or null)" if _allows_none(field.annotation) else "")
    return text


def _value_at(tree: Any, parts) -> Any:
    for part in parts:
        if not isinstance(tree, dict):
            return None
        tree = tree.get(part)
    return tree


def _all_keys(model: type[BaseModel], prefix: tuple = ()) -> list[tuple]:
    """Every key path of a config class: sections and their keys, in declaration order."""
    paths = []
    for name, field in model.model_fields.items():
        paths.append(prefix + (name,))
        nested = _section_model(field.annotation)
        if nested is not None:
            paths.extend(_all_keys(nested, prefix + (name,)))
    return paths


def _suggest(model: type[BaseModel], loc: tuple) -> str | None:
    """The closest valid key for an unknown one: first a sibling (`optim.lrr` -> `optim.lr`), then the
    same or a close name anywhere (`train.lr` -> `optim.lr`, `batchsize` -> `data.batch_size`)."""
    name = loc[-1].lower()
    field, used = _field_at(model, loc[:-1]) if loc[:-1] else (None, 0)
    section = _section_model(field.annotation) if field is not None and used == len(loc) - 1 else model
    if section is not None:
        close = difflib.get_close_matches(name, list(section.model_fields), n=1, cutoff=0.6)
        if close:
            return ".".join(loc[:-1] + (close[0],))
    scored = [(difflib.SequenceMatcher(None, name, path[-1].lower()).ratio(), -i, path)
              for i, path in enumerate(_all_keys(model)) if path[:-1] != loc[:-1]]
    best = max(scored, default=None)
    return ".".join(best[2]) if best is not None and best[0] >= 0.6 else None


# A config is a few hundred values: these limits refuse YAML alias bombs, huge lists and deep nesting in one
# line, before anything expands them (validation, error messages).
MAX_VALUES = 100_000
MAX_DEPTH = 50
MAX_CONFIG_BYTES = 1 << 20


def _shown(value: Any, limit: int = 80) -> str:
    """repr(value), cut to about `limit` characters (a message must stay one readable line)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 20]}... ({len(text):,} characters)"


def _check_size(tree: Any, source: str) -> None:
    """Refuse a tree of more than MAX_VALUES values or deeper than MAX_DEPTH, counting each alias's
    expansion (walked iteratively, with a budget: a bomb is refused without being expanded)."""
    stack, count = [(tree, 0)], 0
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_VALUES:
            raise FadscaleError(f"{source}: more than {MAX_VALUES:,} values (YAML aliases counted as expanded); "
                                "a config holds a few hundred")
        if depth > MAX_DEPTH:
            raise FadscaleError(f"{source}: nested more than {MAX_DEPTH} levels deep; a config has two or three")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
            stack.extend((k, depth + 1) for k in node.keys())
        elif isinstance(node, (list, tuple)):
            stack.extend((v, depth + 1) for v in node)


def _explain(model: type[BaseModel], err: dict, tree: Any = None) -> tuple[str, str]:
    """(the key at fault, the message without its source) for one pydantic error."""
    loc = tuple(str(p) for p in err["loc"])
    if not loc:  # a check across keys (a model validator): its message says it all
        return "", err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        key = ".".join(loc)
        parent, _ = _field_at(model, loc[:-1]) if len(loc) > 1 else (None, 0)
        section = _section_model(parent.annotation) if parent is not None else model
        where = f"in {'.'.join(loc[:-1])!r}" if len(loc) > 1 else "at the top level"
        known = ", ".join(section.model_fields) if section is not None else "(none)"
        close = _suggest(model, loc)
        hint = f"; did you mean {close!r}?" if close else "."
        return key, f"unknown key {key!r} (given {_shown(err.get('input'))}){hint} Valid keys {where}: {known}"
    field, used = _field_at(model, loc)
    if field is None:  # not expected: pydantic's own words, on one line
        return ".".join(loc), f"key {'.'.join(loc)!r}: got {_shown(err.get('input'))}; {' '.join(err['msg'].split())[:200]}"
    key = ".".join(loc[:used])
    if err["type"] == "missing" and used == len(loc):
        return key, f"key {key!r} is required; expected {_expected(field)}"
    given = _value_at(tree, loc[:used]) if isinstance(tree, dict) else err.get("input")
    given_text = f"{_shown(given)} ({type(given).__name__})" if given is not None else "null"
    message = f"key {key!r}: got {given_text}; expected {_expected(field)}"
    if isinstance(given, bool) and _accepts_str(field.annotation):
        message += f" (YAML reads unquoted {_YAML_BOOL_WORDS} as true/false: quote the value)"
    return key, message


def _validate(model: type[ConfigT], tree: dict) -> ConfigT | tuple[str, str]:
    """The config, or (key, message) for the first problem."""
    tree = _fill_sections(model, tree)
    try:
        return model.model_validate(tree)
    except ValidationError as exc:
        return _explain(model, exc.errors()[0], tree)


def _fill_sections(model: type[BaseModel], tree: Any) -> Any:
    """An empty section (`data:` with every key commented out) is read as YAML null: make it {}."""
    if not isinstance(tree, dict):
        return tree
    out = dict(tree)
    for name, field in model.model_fields.items():
        nested = _section_model(field.annotation)
        if nested is not None and name in out:
            out[name] = {} if out[name] is None else _fill_sections(nested, out[name])
    return out


def build_config(model: type[ConfigT], tree: dict, source: str = "config") -> ConfigT:
    """Validate a tree of plain values; any problem is one FadscaleError line."""
    result = _validate(model, tree)
    if isinstance(result, tuple):
        raise FadscaleError(f"{source}: {result[1]}")
    return result


def with_settings(tree: dict, settings: dict[str, Any]) -> dict:
    """Library callers' overrides as keyword names `section__key=value` (e.g. train__max_steps=10),
    merged into `tree` (changed in place and returned)."""
    for name, value in settings.items():
        section, _, key = name.partition("__")
        if key:
            tree.setdefault(section, {})[key] = value
        else:
            tree[section] = value
    return tree


def parse_override(text: str, model: type[BaseModel] | None = None) -> tuple[list[str], Any]:
    """`optim.lr=2e-4` -> (["optim", "lr"], 0.0002). Values are parsed as YAML scalars/lists, except for
    a text field of `model` (a path, a Literal of words), which takes the text as given: `--set
    train.mixed_precision=no` is "no", not false, and `--set run.out_dir=2024` is "2024"."""
    if "=" not in text:
        raise FadscaleError(f"--set {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise FadscaleError(f"--set {text!r}: expected section.key=value")
    field, used = _field_at(model, parts) if model is not None else (None, 0)
    if field is not None and used == len(parts) and _accepts_str(field.annotation):
        value = raw.strip()
        if value in _NULLS and _allows_none(field.annotation):
            return parts, None
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        return parts, value
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    except RecursionError:
        raise FadscaleError(f"--set {key.strip()}: the value is nested too deeply to read") from None
    if isinstance(value, str) and _FLOAT_WITHOUT_DOT.match(value):
        value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as text
    return parts, value


def _apply_override(tree: dict, parts: list[str], value: Any) -> None:
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise FadscaleError(f"--set {'.'.join(parts)}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key given twice in one mapping (PyYAML silently keeps the last)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r}", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"line {mark.line + 1}: {problem}" if mark is not None else problem


def load_config(model: type[ConfigT], path: str | Path | None, overrides: list[str] | None = None) -> ConfigT:
    """Read YAML `path` (or start from defaults when None), apply `section.key=value` overrides, validate."""
    tree: dict = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.exists():
            raise FadscaleError(f"{path}: config file not found")
        if not path.is_file():
            raise FadscaleError(f"{path}: not a file (expected a YAML config file)")
        if path.stat().st_size > MAX_CONFIG_BYTES:  # PyYAML would take minutes over a file of many MB
            raise FadscaleError(f"{path}: {path.stat().st_size:,} bytes; a config file is a few KB (at most "
                                f"{MAX_CONFIG_BYTES:,} bytes are read)")
        try:
            loaded = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
        except yaml.YAMLError as exc:
            raise FadscaleError(f"{path}: not valid YAML ({_yaml_problem(exc)})") from None
        except UnicodeDecodeError:
            raise FadscaleError(f"{path}: not a text file (expected a YAML config file)") from None
        except RecursionError:
            raise FadscaleError(f"{path}: nested too deeply to read (a config has two or three levels)") from None
        _check_size(loaded, str(path))
        if loaded is not None and not isinstance(loaded, dict):
            raise FadscaleError(f"{path}: expected a mapping of sections, got {type(loaded).__name__}")
        tree = loaded or {}
    parsed = []
    for text in overrides or []:
        parts, value = parse_override(text, model)
        _check_size(value, f"--set {text[:60]}")
        _apply_override(tree, parts, value)
        parsed.append((".".join(parts), text))
    result = _validate(model, tree)
    if not isinstance(result, tuple):
        return result
    key, message = result
    # Name the --set that caused it, when one did (the last one given for that key or a key around it).
    for dotted, text in reversed(parsed):
        if key and (key == dotted or key.startswith(dotted + ".") or dotted.startswith(key + ".")):
            raise FadscaleError(f"--set {text}: {message}")
    raise FadscaleError(f"{source}: {message}")


def dump_config(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def save_config(config: BaseModel, path: str | Path) -> None:
    """Every run saves its effective config (after overrides) beside its outputs; `load_config` reads it back."""
    atomic_write_text(path, dump_config(config))


def describe_config(model: type[BaseModel]) -> str:
    """Every key of a config class with its default and description: a YAML file `load_config` reads."""
    lines: list[str] = []

    def walk(value: BaseModel, indent: str) -> None:
        for name, field in type(value).model_fields.items():
            item = getattr(value, name)
            if isinstance(item, BaseModel):
                lines.append(f"{indent}{name}:")
                walk(item, indent + "  ")
                continue
            text = yaml.safe_dump(list(item) if isinstance(item, tuple) else item, default_flow_style=True)
            text = text.split("\n...")[0].strip()
            lines.append(f"{indent}{name}: {text}" + (f"  # {field.description}" if field.description else ""))

    walk(model(), "")
    return "\n".join(lines) + "\n"
