"""The formats and quantizers packages import no private name from another module, import nothing inside
a function, and hold no import cycle (checked on the source with ``ast``)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("tvm_lowbit/formats", "tvm_lowbit/quantizers")


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, ast.Module]:
    return {_module(p): ast.parse(p.read_text(), str(p)) for pkg in PACKAGES for p in sorted((ROOT / pkg).glob("*.py"))}


def _imports(tree: ast.Module) -> list[tuple[str, list[str]]]:
    """(module, imported names) of the top-level tvm_lowbit imports."""
    out = []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tvm_lowbit"):
            out.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.startswith("tvm_lowbit")]
    return out


def test_no_private_names_and_no_imports_inside_functions() -> None:
    bad = []
    for mod, tree in _sources().items():
        for m, names in _imports(tree):
            bad += [f"{mod}: {m}.{n}" for n in names if n.startswith("_") and n != "__version__"]
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                bad += [f"{mod}: import inside {node.name}()" for sub in ast.walk(node)
                        if isinstance(sub, (ast.Import, ast.ImportFrom))
                        and any(a.name.startswith("tvm_lowbit") for a in sub.names)
                        or isinstance(sub, ast.ImportFrom) and (sub.module or "").startswith("tvm_lowbit")]
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__") \
                    and isinstance(node.value, ast.Name) and node.value.id in ("calibrate", "qmath", "surgery"):
                bad.append(f"{mod}: {node.value.id}.{node.attr}")
    assert not bad, bad


def test_no_import_cycles() -> None:
    srcs = _sources()
    graph: dict[str, set[str]] = {}
    for mod, tree in srcs.items():
        deps = set()
        for m, names in _imports(tree):
            for n in names or [""]:  # ``from pkg import module`` depends on the module, else on ``m``
                target = f"{m}.{n}" if f"{m}.{n}" in srcs else m
                if target in srcs and target != mod:
                    deps.add(target)
        graph[mod] = deps
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            assert state.get(d) != 1, " -> ".join(path + [m, d])
            if d not in state:
                visit(d, path + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
