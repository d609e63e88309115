"""The layering rules of the package, checked on its source (no imports needed, so they hold on any machine).

- imports point one way: registry/ never imports torch or the runtime; runtime/ never imports the registry,
  the server, the CLI or train/; train/ imports the runtime and `adapter`, never the registry, the server or
  the CLI (the CLI pushes what it trains); and there is no import cycle among the package's modules;
- runtime/ imports the package's own modules at the top of a file only (no function-local imports);
- kernels/ keeps no module-level mutable state: no `global`, and no module-level container written from
  a function (caches live on the `Ops` objects; the only memo is `functools.cache` of the resolvers);
- no runtime file over 400 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "adapterhub"


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def _imports(path: Path, top_level_only: bool) -> list[tuple[str, int]]:
    """(imported module, line) for every import in the file; names imported from a package count as modules
    when they are modules (``from adapterhub.runtime import kernels``)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    out = []
    for node in nodes:
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, node.lineno))
            out += [(f"{node.module}.{a.name}", node.lineno) for a in node.names if f"{node.module}.{a.name}" in MODULES]
    return out


def _function_imports(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    return [(name, line) for name, line in _imports(path, top_level_only=False)
            if line not in {n.lineno for n in tree.body if id(n) in top and isinstance(n, (ast.Import, ast.ImportFrom))}]


def _in(package: str) -> dict[str, Path]:
    return {name: path for name, path in MODULES.items() if name == package or name.startswith(package + ".")}


def test_registry_imports_neither_torch_nor_the_runtime():
    for name, path in _in("adapterhub.registry").items():
        for imported, line in _imports(path, top_level_only=False):
            assert not imported.startswith(("torch", "adapterhub.runtime")), f"{path}:{line} imports {imported}"


def test_runtime_imports_neither_the_registry_nor_the_server_nor_the_cli():
    for name, path in _in("adapterhub.runtime").items():
        for imported, line in _imports(path, top_level_only=False):
            bad = ("adapterhub.registry", "adapterhub.serve", "adapterhub.cli", "adapterhub.train")
            assert not imported.startswith(bad), f"{path}:{line} imports {imported}"


def test_train_imports_neither_the_registry_nor_the_server_nor_the_cli():
    assert _in("adapterhub.train"), "adapterhub/train/ is missing"
    for name, path in _in("adapterhub.train").items():
        for imported, line in _imports(path, top_level_only=False):
            bad = ("adapterhub.registry", "adapterhub.serve", "adapterhub.cli")
            assert not imported.startswith(bad), f"{path}:{line} imports {imported}"


def test_runtime_imports_its_own_modules_at_the_top_only():
    for name, path in _in("adapterhub.runtime").items():
        local = [(m, line) for m, line in _function_imports(path) if m.startswith("adapterhub")]
        assert not local, f"{path}: function-local imports of the package: {local}"


def test_no_import_cycle():
    graph = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for imported, _ in _imports(path, top_level_only=True):
            target = imported
            while target and target not in MODULES:  # "from pkg.mod import Class" -> pkg.mod
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):  # a package's own __init__
                graph[name].add(target)
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_kernels_keep_no_module_level_mutable_state():
    for name, path in _in("adapterhub.runtime.kernels").items():
        tree = ast.parse(path.read_text())
        assert not any(isinstance(n, ast.Global) for n in ast.walk(tree)), f"{path} uses `global`"
        top_names = {t.id for n in tree.body if isinstance(n, (ast.Assign, ast.AnnAssign))
                     for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Name)}
        for fn in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for node in ast.walk(fn):
                written = None
                if isinstance(node, (ast.Assign, ast.AugAssign)):
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    written = next((t.value.id for t in targets if isinstance(t, ast.Subscript)
                                    and isinstance(t.value, ast.Name)), None)
                elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                    mutators = {"append", "update", "setdefault", "pop", "clear", "add", "extend", "popitem"}
                    if node.func.attr in mutators and isinstance(node.func.value, ast.Name):
                        written = node.func.value.id
                assert written not in top_names, f"{path}:{fn.name} writes module-level {written!r}"


def test_runtime_files_stay_small():
    for name, path in _in("adapterhub.runtime").items():
        lines = len(path.read_text().splitlines())
        assert lines <= 400, f"{path} has {lines} lines; split it by concern"
