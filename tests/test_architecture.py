"""The package's structure, checked from its source with ``ast``: no import cycle between modules (imports
inside functions included, so a cycle cannot hide behind a late import) and no private name (``_x``)
taken from another module, by ``from m import _x`` or by ``m._x``."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "tvm_lowbit"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((ROOT / PACKAGE).rglob("*.py"))}


def resolve(node: ast.ImportFrom, here: str, is_package: bool) -> str:
    """The absolute module an ``ImportFrom`` names (relative imports resolved against ``here``)."""
    if not node.level:
        return node.module or ""
    base = here.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(path: Path, modules: dict[str, Path]) -> tuple[set[str], list[tuple[str, str]]]:
    """(package modules this file imports, [(module, private name)] it takes from other modules)."""
    here = module_name(path)
    tree = ast.parse(path.read_text(), filename=str(path))
    edges: set[str] = set()
    private: list[tuple[str, str]] = []
    aliases: dict[str, str] = {}  # local name -> package module it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in modules:
                    edges.add(a.name)
                    if a.asname:
                        aliases[a.asname] = a.name
        elif isinstance(node, ast.ImportFrom):
            src = resolve(node, here, path.name == "__init__.py")
            for a in node.names:
                sub = f"{src}.{a.name}"
                if sub in modules:  # ``from pkg import submodule``
                    edges.add(sub)
                    aliases[a.asname or a.name] = sub
                elif src in modules:
                    edges.add(src)
                    if a.name.startswith("_") and not a.name.startswith("__") and src != here:
                        private.append((src, a.name))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__") and aliases[node.value.id] != here):
            private.append((aliases[node.value.id], node.attr))
    edges.discard(here)
    return edges, private


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    color: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        color[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if color.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in color and (c := visit(m)) is not None:
                return c
        stack.pop()
        color[n] = 2
        return None

    for n in sorted(graph):
        if n not in color and (c := visit(n)) is not None:
            return c
    return None


def test_find_cycle_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_private_name_detector(tmp_path: Path) -> None:
    src = "from tvm_lowbit.qmath import _int_layout\nfrom tvm_lowbit import qmath\nqmath._x\n"
    p = ROOT / PACKAGE / "_probe_private.py"
    try:
        p.write_text(src)
        _, private = imports_of(p, package_modules())
    finally:
        p.unlink()
    assert ("tvm_lowbit.qmath", "_int_layout") in private and ("tvm_lowbit.qmath", "_x") in private


def test_no_import_cycles() -> None:
    modules = package_modules()
    graph = {name: imports_of(path, modules)[0] for name, path in modules.items()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_private_names_across_modules() -> None:
    modules = package_modules()
    found = []
    for path in [*modules.values(), *sorted((ROOT / "scripts").rglob("*.py"))]:
        for src, name in imports_of(path, modules)[1]:
            found.append(f"{path.relative_to(ROOT)} takes {src}.{name}")
    assert not found, "private names used across modules:\n" + "\n".join(found)
