"""Imports run one way (docs/design.md, "Layers"): cli, then api and train, then runtime and export (siblings that
never import each other), then engines, then models, then the leaf modules config, render and errors (config may use errors).
Inside the runtime the same rule holds between its concerns: execution, then evaluation, then
results, then algorithm and data (siblings).

Every `import` in the package is checked, at module top and inside functions alike: a
function-level import may delay an optional heavy dependency, never hide an upward edge or a
cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "diffcls"

# higher imports lower; equal ranks are siblings that must not import each other
RANK = {"cli": 6, "api": 5, "train": 5, "runtime": 4, "export": 4, "engines": 3, "models": 2, "config": 1, "render": 1, "errors": 0}
# the runtime's subpackages, ranked the same way
RUNTIME_RANK = {"execution": 4, "evaluation": 3, "results": 2, "algorithm": 1, "data": 1}
FACADES = {"diffcls", "diffcls.__main__"}  # the package's lazy re-exports and `python -m diffcls`


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """diffcls modules `name` imports (a `from pkg import sub` counts as importing pkg.sub)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "diffcls"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "diffcls":
                continue
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules]
            found |= set(subs) if len(subs) == len(node.names) else {target, *subs}
    found.discard(name)
    return found


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, name, modules) for name, path in modules.items()}


def _concern(module: str) -> str | None:
    """A runtime module's subpackage (`diffcls.runtime.algorithm.scoring` -> algorithm)."""
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "runtime" else None


def test_every_module_has_a_layer():
    unknown = sorted(m for m in _modules() if m not in FACADES and _layer(m) not in RANK)
    assert not unknown, f"modules outside the known layers: {unknown}; add them to RANK"
    loose = sorted(m for m in _modules() if _layer(m) == "runtime" and m != "diffcls.runtime" and _concern(m) not in RUNTIME_RANK)
    assert not loose, f"runtime modules outside its subpackages: {loose}; move them into one (RUNTIME_RANK)"


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, targets in graph.items():
        if mod in FACADES:
            continue
        src = _layer(mod)
        for t in targets:
            dst = _layer(t)
            if t in FACADES and RANK[src] < RANK["train"]:  # only the top (cli, api, train) may use the facade
                bad.append(f"{mod} -> {t} (the package facade)")
            elif t not in FACADES and dst != src and RANK[dst] >= RANK[src]:
                bad.append(f"{mod} -> {t}")
            elif src == dst == "runtime" and _concern(mod) and _concern(t) and _concern(mod) != _concern(t):
                if RUNTIME_RANK[_concern(t)] >= RUNTIME_RANK[_concern(mod)]:
                    bad.append(f"{mod} -> {t} (runtime concerns)")
    return sorted(bad)


def test_imports_only_go_down():
    bad = layer_violations(_graph())
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]) if nxt in stack else f"{node} -> {nxt}")
            elif nxt in graph and state.get(nxt) is None:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for n in sorted(graph):
        if state.get(n) is None:
            visit(n, [n])
    # a package __init__ re-exporting its submodules is not a cycle with them
    real = [c for c in cycles if not _init_reexport(c, graph)]
    assert not real, "import cycles:\n" + "\n".join(real)


def _init_reexport(cycle: str, graph) -> bool:
    nodes = cycle.split(" -> ")
    return any(b.startswith(a + ".") and (PACKAGE.parent / a.replace(".", "/") / "__init__.py").exists() for a, b in zip(nodes, nodes[1:]))


@pytest.mark.parametrize(
    "src, dst",
    [
        ("diffcls.engines.base", "diffcls.runtime.data.cache"),  # upward
        ("diffcls.runtime.algorithm.scoring", "diffcls.export.pipeline"),  # sideways, between siblings
        ("diffcls.models.loading", "diffcls"),  # through the facade
        ("diffcls.runtime.algorithm.scoring", "diffcls.runtime.execution.timing"),  # up inside the runtime
        ("diffcls.runtime.data.inputs", "diffcls.runtime.algorithm.ranking"),  # between runtime siblings
    ],
)
def test_the_check_catches_a_bad_edge(src, dst):
    graph = _graph()
    graph[src] = graph[src] | {dst}
    assert any(v.startswith(f"{src} -> {dst}") for v in layer_violations(graph))


# The CLI only turns options into a spec (JobSpec, ClassifyJob, MatchJob, ExportConfig, ...) and
# prints what the library returns (issue 20: "the run belongs to the library"); computations, file
# formats, validation and summaries the Python API would need too live below it. When cli/ grows,
# look for library work that crept into it before raising a limit. The goal is under 1,000 lines
# (issue 20: well under half of its 2.0k); the ceiling, a little above its size when the goal was
# met (892 lines), keeps it from growing back.
CLI_LINE_GOAL = 1000
CLI_LINE_CEILING = 920


def _cli_lines() -> dict[str, int]:
    return {p.name: len(p.read_text().splitlines()) for p in sorted((PACKAGE / "cli").glob("*.py"))}


def test_the_cli_does_not_grow_back():
    sizes = _cli_lines()
    assert sum(sizes.values()) <= CLI_LINE_CEILING, f"diffcls/cli/ is {sum(sizes.values())} lines (ceiling {CLI_LINE_CEILING}): {sizes}"


def test_the_cli_is_under_its_goal():
    sizes = _cli_lines()
    assert sum(sizes.values()) < CLI_LINE_GOAL, f"diffcls/cli/ is {sum(sizes.values())} lines (goal: under {CLI_LINE_GOAL}): {sizes}"
