"""The code's structure shows the flow one way: models/data -> methods -> finetune -> evaluate -> export.

Every import inside prunekit (at module level or inside a function) goes to the same layer or one
below it, and no chain of imports leads back to where it started.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "prunekit"

# lowest first; a module may import from its own layer and the layers before it
LAYERS: list[tuple[str, ...]] = [
    ("prunekit", "errors", "utils", "record"),  # the root package names its API lazily, by strings
    ("adapters", "data"),
    ("masks", "calibration", "surgery", "structured_load", "compressed_load"),
    ("models", "onload"),
    ("methods", "pruning", "onload_structured"),
    ("finetune",),
    ("evaluate",),
    ("export",),
    ("jobs", "onload_job", "onload_eval"),
    ("study",),
    ("report",),
    ("cli",),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """prunekit module -> the prunekit modules it imports (anywhere in its code)."""
    modules = {module_name(path) for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "prunekit":
                # `from package import module` depends on that module, not on everything the package holds
                found.update(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                             for a in node.names)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.split(".")[0] == "prunekit")
        graph[module_name(path)] = found
    return graph


def component(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def layer(module: str) -> int:
    name = component(module)
    for index, names in enumerate(LAYERS):
        if name in names:
            return index
    raise AssertionError(f"{module} belongs to no layer: add '{name}' to LAYERS in {Path(__file__).name}")


def test_every_import_goes_down_the_flow() -> None:
    wrong = [f"{source} -> {target}" for source, targets in imports().items() for target in targets
             if component(target) != component(source) and layer(target) > layer(source)]
    assert not wrong, "imports against the flow: " + ", ".join(sorted(wrong))


def test_no_import_cycles() -> None:
    graph = imports()
    edges = {m: {t for t in targets if t in graph} for m, targets in graph.items()}
    state: dict[str, int] = {}
    cycles: list[str] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target):] + [target]) if target in path else target)
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles: " + "; ".join(cycles)
