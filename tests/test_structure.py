"""The code's shape: no import cycles among the modules of mlx_aim/ and cli/, no function over
100 lines."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mlx_aim", "cli")
MAX_FUNCTION_LINES = 100


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every Python file of the packages."""
    files = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def _imported(module: str, path: Path, node: ast.stmt) -> list[str]:
    """Dotted names a module-level import statement names (modules, or attributes of one)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
        base = f"{base}.{node.module}" if node.module else base
    else:
        base = node.module or ""
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports when it is imported (module-level statements;
    imports inside functions run later and cannot form an import-time cycle)."""
    files = module_files()
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        statements = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
        top = {id(n) for n in tree.body} | {
            id(child)
            for n in tree.body
            if isinstance(n, (ast.If, ast.Try))
            for child in ast.walk(n)
        }
        graph[module] = {
            name
            for node in statements
            if id(node) in top
            for name in _imported(module, path, node)
            if name in files and name != module
        }
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module], _ = "open", stack.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                return stack[stack.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[module], _ = "done", stack.pop()
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def import_depth(graph: dict[str, set[str]]) -> int:
    """The longest chain of imports (edges) in an acyclic graph."""
    depth: dict[str, int] = {}

    def longest(module: str) -> int:
        if module not in depth:
            depth[module] = max((1 + longest(t) for t in graph[module]), default=0)
        return depth[module]

    return max(longest(m) for m in graph)


def long_functions() -> list[str]:
    """``file:line name (n lines)`` for every function longer than MAX_FUNCTION_LINES."""
    found = []
    for path in module_files().values():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    where = path.relative_to(ROOT)
                    found.append(f"{where}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_the_import_graph_has_no_cycles():
    graph = import_graph()
    assert find_cycle(graph) is None
    assert import_depth(graph) >= 2  # the graph is really read: cli -> mlx_aim -> mlx_aim


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_function_is_longer_than_100_lines():
    assert long_functions() == []
