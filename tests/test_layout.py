"""The package's shape, read from its imports: no module imports (directly or through others) a module that
imports it back, counting imports inside functions too (a circle there still ties the two together)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fadscale"


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fadscale"):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    deps.add(full if full in modules else node.module)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("fadscale"))
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan's algorithm, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    groups.append(sorted(group))
    return groups


def test_the_circle_finder_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    assert circles(import_graph()) == []


def test_the_stage_list_lives_in_stages_py_only():
    """Each stage's module is named in fadscale/stages.py and nowhere else in the package (the entry
    points name themselves in run_entry; that is not a list of stages)."""
    from fadscale.stages import STAGES

    modules = {spec.module for spec in STAGES.values()}
    for path in PACKAGE.rglob("*.py"):
        if path.name == "stages.py":
            continue
        text = path.read_text(encoding="utf-8")
        named = {m for m in modules if f'"{m}"' in text or f"'{m}'" in text}
        assert not named, (path, named)


# The layers, from the bottom: what the method and the formats are built from, then the stages (the modules
# `python -m` and `fadscale <command>` run), then what composes stages (pipeline/) and the CLI over all.
STAGE_MODULES = {"fadscale.train_expert", "fadscale.cache_features", "fadscale.train_fad", "fadscale.sample",
                 "fadscale.evaluate", "fadscale.export"}
LIBRARY = ("fadscale.core", "fadscale.artifacts", "fadscale.config", "fadscale.data", "fadscale.training",
           "fadscale.runtime", "fadscale.errors", "fadscale.resources", "fadscale.stages")
COMPOSERS = ("fadscale.pipeline", "fadscale.cli")


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """Imports against the layering: the library never imports a stage or a composer; a stage never imports
    another stage or a composer. Only pipeline/ and the CLI put stages together."""
    found = []
    for module, deps in sorted(graph.items()):
        for dep in sorted(deps):
            if module.startswith(LIBRARY) and (dep in STAGE_MODULES or dep.startswith(COMPOSERS)):
                found.append(f"library {module} imports {dep}")
            elif module in STAGE_MODULES and (dep in STAGE_MODULES or dep.startswith(COMPOSERS)):
                found.append(f"stage {module} imports {dep}")
    return found


def test_the_layer_rule_finds_a_stage_importing_a_stage():
    graph = {"fadscale.train_fad": {"fadscale.cache_features"}, "fadscale.core.probe": {"fadscale.evaluate"},
             "fadscale.pipeline.plan": {"fadscale.train_fad", "fadscale.sample"}, "fadscale.cache_features": set()}
    assert layer_violations(graph) == ["library fadscale.core.probe imports fadscale.evaluate",
                                       "stage fadscale.train_fad imports fadscale.cache_features"]


def test_stages_import_only_the_library_and_only_pipeline_composes_stages():
    graph = import_graph()
    assert STAGE_MODULES <= set(graph)  # the rule names modules that exist
    assert layer_violations(graph) == []
    every = {m for m in graph if m not in ("fadscale", "fadscale.bundled")}
    placed = {m for m in every if m in STAGE_MODULES or m.startswith(LIBRARY + COMPOSERS)}
    assert placed == every, f"modules in no layer: {sorted(every - placed)}"


def test_every_package_folder_is_installed():
    """pyproject lists the packages explicitly (configs/ and launch/ are mapped in): a new folder must be there."""
    import tomllib

    listed = set(tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {".".join(p.parent.relative_to(PACKAGE.parent).parts) for p in PACKAGE.rglob("__init__.py")}
    assert folders - {"fadscale.bundled"} <= listed


def test_no_card_is_parsed_outside_artifacts():
    """Cards and manifests are read through fadscale.artifacts (one checked reader per format): no line
    elsewhere parses JSON from a card."""
    for path in PACKAGE.rglob("*.py"):
        if "artifacts" in path.relative_to(PACKAGE).parts:
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if "json.load" in line:
                assert not any(word in line for word in ("card", "expert.json", "manifest.json", "report.json")), \
                    f"{path}:{number}: {line.strip()}"
