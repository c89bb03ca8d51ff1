"""The house's layers point one way: `common/` (the runtime every process shares) imports nothing from
`services/`, and no module imports, however indirectly, one that imports it back. Read from the code's
own import statements (function-level ones too: a lazy import is still an arrow)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("common", "services")


def import_graph(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """module -> the project modules it imports (a package's `__init__` is the package's name)."""
    files = {}
    for package in packages:
        for path in (root / package).rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for module, path in files.items():
        named = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                named.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                named.add(node.module)
                named.update(f"{node.module}.{alias.name}" for alias in node.names)
        targets = set()
        for name in named:
            while name and name not in files:  # `from pkg.mod import func` -> pkg.mod
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
        graph[module] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import each other, directly or round a circle (Tarjan's SCCs)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in graph[module]:
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def upward(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((module, target) for module, targets in graph.items() if module.startswith("common")
                  for target in targets if target.startswith("services"))


def test_common_imports_nothing_from_services_and_no_modules_import_each_other_round_a_circle():
    graph = import_graph(REPO)
    assert len(graph) > 80  # it read the house, not an empty folder
    assert upward(graph) == []
    assert cycles(graph) == []


def test_the_check_finds_a_planted_cycle_and_a_planted_upward_import(tmp_path):
    for package in PACKAGES:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "services" / "first.py").write_text("from services.second import thing\n")
    (tmp_path / "services" / "second.py").write_text("def thing():\n    from services import third\n")
    (tmp_path / "services" / "third.py").write_text("import services.first\n")
    (tmp_path / "common" / "low.py").write_text("def late():\n    from services.first import nothing\n")
    graph = import_graph(tmp_path)
    assert cycles(graph) == [["services.first", "services.second", "services.third"]]
    assert upward(graph) == [("common.low", "services.first")]
