"""No function in the package is over 80 lines, unless a comment on the line above its `def`
starting `# long:` says why (the project's rule; a long function hides what it does)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "diffcls"
LIMIT = 80


def long_functions(source: str, where: str = "") -> list[str]:
    """'file:line name (N lines)' for each function or method over LIMIT lines without a reason."""
    lines = source.splitlines()
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        first = min([node.lineno] + [d.lineno for d in node.decorator_list])
        n = node.end_lineno - node.lineno + 1
        above = lines[first - 2].strip() if first >= 2 else ""
        if n > LIMIT and not above.startswith("# long:"):
            found.append(f"{where}:{node.lineno} {node.name} ({n} lines)")
    return found


def test_no_function_is_over_80_lines():
    found = [f for p in sorted(PACKAGE.rglob("*.py")) for f in long_functions(p.read_text(), str(p.relative_to(PACKAGE.parent)))]
    assert not found, "functions over 80 lines (split them, or say why in a '# long:' comment above):\n" + "\n".join(found)


def test_the_check_finds_a_long_function_and_accepts_a_reason():
    body = "".join(f"    x{i} = {i}\n" for i in range(LIMIT))
    long_def = "def f():\n" + body
    assert long_functions(long_def, "m.py") == [f"m.py:1 f ({LIMIT + 1} lines)"]
    method = "class C:\n    @staticmethod\n" + "".join("    " + line + "\n" for line in long_def.splitlines())
    assert long_functions(method, "m.py") == [f"m.py:3 f ({LIMIT + 1} lines)"]
    assert long_functions("# long: one table, read top to bottom\n" + long_def) == []
    assert long_functions("def f():\n" + "".join(f"    x{i} = {i}\n" for i in range(LIMIT - 1))) == []
