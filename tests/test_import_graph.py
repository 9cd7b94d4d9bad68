"""The project's modules import each other without cycles, and none imports another module's
private (underscore) names; `gpu_runner` imports no other package of the project. Read with
`ast`, so nothing is imported to check it."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The product's rooms, and the benchmarks and tests that talk to them.
PRODUCT = [
    "workflows",
    "activities",
    "common",
    "worker",
    "relay",
    "client",
    "cli",
    "devstack",
    "gpu_runner",
]
PACKAGES = [*PRODUCT, "bench", "tests"]
# Who must not import private names: the product and the benchmarks. Tests may, where a unit
# test pins an internal (`activities.storage._safe_name`).
PUBLIC_ONLY = (*PRODUCT, "bench")
# Each room and the rooms it may import (besides itself): none reaches up for what it needs.
ALLOWED = {
    "gpu_runner": set(),
    "common": set(),
    # The workflows name their activities; the activities take the workflows' models.
    "workflows": {"gpu_runner", "activities"},
    "activities": {"gpu_runner", "workflows", "common"},
    "worker": {"gpu_runner", "workflows", "activities", "common"},
    "relay": {"gpu_runner", "workflows", "activities", "common"},
    "client": {"gpu_runner", "workflows", "activities", "common"},
    "devstack": {"gpu_runner", "workflows", "activities", "common"},
    "cli": {
        "gpu_runner",
        "workflows",
        "activities",
        "common",
        "worker",
        "relay",
        "client",
        "devstack",
    },
}


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name
    line: int
    module: str  # dotted module imported (or imported from)
    names: tuple[str, ...]  # names imported from it (empty for `import x`)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_files() -> Iterator[Path]:
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            # Third-party code some tests install beside themselves is not the project's.
            if not any(part.startswith(".") or part == "node_modules" for part in path.parts):
                yield path


def imports_of(path: Path) -> Iterator[Import]:
    """Every import in the file, at any depth (functions, TYPE_CHECKING blocks included),
    relative ones resolved to absolute names."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(name, node.lineno, alias.name, ())
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            yield Import(name, node.lineno, base, tuple(a.name for a in node.names))


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in project_files()}


def is_project(module: str) -> bool:
    return module.split(".")[0] in PACKAGES


def resolve(imported: Import, known: dict[str, Path]) -> list[str]:
    """The project modules an import loads: the module itself, or for `from package import x`
    the submodule x where there is one."""
    if not is_project(imported.module):
        return []
    targets = [imported.module] if imported.module in known else []
    targets += [
        f"{imported.module}.{n}" for n in imported.names if f"{imported.module}.{n}" in known
    ]
    return targets


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), and self-imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def import_graph() -> dict[str, set[str]]:
    known = modules()
    graph: dict[str, set[str]] = {name: set() for name in known}
    for name, path in known.items():
        for imported in imports_of(path):
            for target in resolve(imported, known):
                # A package's __init__ re-exporting its own modules is not a cycle of rooms;
                # importing a package's submodule runs the package first, which is.
                if target != name and not (
                    path.name == "__init__.py" and target.startswith(name + ".")
                ):
                    graph[name].add(target)
    return graph


def test_the_project_has_no_import_cycle() -> None:
    found = cycles(import_graph())
    assert found == [], "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_no_module_imports_another_modules_private_names() -> None:
    known = modules()
    offences = []
    for name, path in known.items():
        if name.split(".")[0] not in PUBLIC_ONLY:
            continue
        aliases: dict[str, str] = {}  # local name -> project module, for `module._name`
        for imported in imports_of(path):
            if not is_project(imported.module):
                continue
            for n in imported.names:
                if n.startswith("_") and not n.startswith("__"):
                    offences.append(
                        f"{path.relative_to(ROOT)}:{imported.line}: {n} from {imported.module}"
                    )
                elif f"{imported.module}.{n}" in known:
                    aliases[n] = f"{imported.module}.{n}"
            if not imported.names:
                aliases[imported.module.split(".")[0]] = imported.module.split(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                offences.append(
                    f"{path.relative_to(ROOT)}:{node.lineno}: {node.value.id}.{node.attr}"
                )
    assert offences == [], "private names imported from other modules:\n" + "\n".join(offences)


def test_each_room_imports_only_the_rooms_below_it() -> None:
    known = modules()
    offences = []
    for name, path in known.items():
        room = name.split(".")[0]
        if room not in ALLOWED:
            continue
        for imported in imports_of(path):
            other = imported.module.split(".")[0]
            if is_project(imported.module) and other != room and other not in ALLOWED[room]:
                offences.append(f"{path.relative_to(ROOT)}:{imported.line}: {imported.module}")
    assert offences == [], "imports that reach up or sideways:\n" + "\n".join(offences)


def test_the_checks_see_a_cycle_and_a_private_import() -> None:
    """The detector itself: a two-module cycle and a three-module one are found."""
    assert cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
