"""The code's shape: no import cycles among the modules of mlx_aim/ and cli/, no function over
100 lines, no module over 600, a short top level, a thin CLI with static imports, and the
repository files (LICENSE, py.typed, lint in CI, the pyproject package list)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mlx_aim", "cli")
MAX_FUNCTION_LINES = 100
MAX_MODULE_LINES = 600
MAX_TOP_LEVEL_MODULES = 8
# What a command module of cli/ may import from mlx_aim when it is imported: the small modules
# and the config dataclasses its flags come from. The task code is imported inside the commands.
CLI_TOP_LEVEL_IMPORTS = {
    "mlx_aim.errors",
    "mlx_aim.io",
    "mlx_aim.messages",
    "mlx_aim.tasks.config",
    "mlx_aim.tasks.probe.config",
    "mlx_aim.train.config",
}


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


def _type_checking_only(node: ast.stmt) -> bool:
    """``if TYPE_CHECKING:``: imports for type checkers, never run."""
    return isinstance(node, ast.If) and ast.unparse(node.test) in (
        "TYPE_CHECKING",
        "typing.TYPE_CHECKING",
    )


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports when it is imported (module-level statements;
    imports inside functions run later and those under ``if TYPE_CHECKING:`` never, so neither
    can form an import-time cycle)."""
    files = module_files()
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        statements = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
        top = {id(n) for n in tree.body} | {
            id(child)
            for n in tree.body
            if isinstance(n, (ast.If, ast.Try)) and not _type_checking_only(n)
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


def longest_chain(graph: dict[str, set[str]]) -> list[str]:
    """The longest chain of imports in an acyclic graph, as the modules along it."""
    chains: dict[str, list[str]] = {}

    def longest(module: str) -> list[str]:
        if module not in chains:
            tails = [longest(t) for t in sorted(graph[module])]
            chains[module] = [module, *max(tails, key=len, default=[])]
        return chains[module]

    return max((longest(m) for m in sorted(graph)), key=len)


def import_depth(graph: dict[str, set[str]]) -> int:
    """The longest chain of imports (edges) in an acyclic graph."""
    return len(longest_chain(graph)) - 1


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


def test_the_longest_chain_is_a_path_of_the_graph():
    graph = {"a": {"b", "c"}, "b": {"c"}, "c": set(), "d": {"a"}}
    assert longest_chain(graph) == ["d", "a", "b", "c"] and import_depth(graph) == 3


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_function_is_longer_than_100_lines():
    assert long_functions() == []


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _module_level_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return [name for node in tree.body for name in _imported(module, path, node)]


def test_no_module_is_longer_than_600_lines():
    long = {
        str(path.relative_to(ROOT)): n
        for path in module_files().values()
        if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}


def test_the_top_level_of_mlx_aim_holds_at_most_8_modules():
    modules = sorted(p.name for p in (ROOT / "mlx_aim").glob("*.py"))
    assert len(modules) <= MAX_TOP_LEVEL_MODULES, modules


def test_commands_are_imported_statically():
    """No importlib or __import__ in cli/; main.py imports every command module at its top."""
    for path in (ROOT / "cli").glob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names = _imported("cli." + path.stem, path, node) if isinstance(node, ast.stmt) else []
            assert not any(n.split(".")[0] == "importlib" for n in names), path.name
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id != "__import__", path.name
    commands = {p.stem for p in (ROOT / "cli").glob("*.py") if "def register(" in p.read_text()}
    imported = {n.rpartition(".")[2] for n in _module_level_imports(ROOT / "cli" / "main.py")}
    assert commands and commands <= imported


def test_command_modules_import_only_configs_and_small_modules_at_their_top():
    """The same lazy-import rule in every command: MLX and the task code load inside it."""
    for path in (ROOT / "cli").glob("*.py"):
        for name in _module_level_imports(path):
            top = name.split(".")[0]
            assert top != "mlx", f"{path.name} imports {name} at its top"
            if top == "mlx_aim" and name != "mlx_aim":
                module = name if name in module_files() else name.rpartition(".")[0]
                assert module in CLI_TOP_LEVEL_IMPORTS, f"{path.name} imports {name} at its top"


def test_no_installed_package_is_named_plain_cli():
    setuptools = _pyproject()["tool"]["setuptools"]
    packages = setuptools["packages"]
    assert "cli" not in packages and all(
        p.split(".")[0] in ("mlx_aim", "mlx_aim_cli") for p in packages
    )
    assert setuptools["package-dir"] == {"mlx_aim_cli": "cli"}
    assert all(
        target.startswith("mlx_aim_cli.") for target in _pyproject()["project"]["scripts"].values()
    )


def test_the_package_list_is_every_folder_with_an_init():
    folders = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for package in PACKAGES
        for init in (ROOT / package).rglob("__init__.py")
    }
    installed = {"mlx_aim_cli" if f == "cli" else f for f in folders}
    assert set(_pyproject()["tool"]["setuptools"]["packages"]) == installed


def test_the_repository_has_its_license_typing_marker_and_lint_in_ci():
    project = _pyproject()
    assert project["project"]["license"]["text"] == "MIT"
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert (ROOT / "mlx_aim" / "py.typed").is_file()
    assert "py.typed" in project["tool"]["setuptools"]["package-data"]["mlx_aim"]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert "ruff check ." in ci and "ruff format --check ." in ci
    hooks = (ROOT / ".pre-commit-config.yaml").read_text()
    assert "ruff check" in hooks and "ruff format" in hooks
