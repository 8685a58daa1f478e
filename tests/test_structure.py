"""The house plan, checked: no import circle, files and functions that fit a sitting, and no private name of
another library (Optuna, timm, torch, ...) read anywhere in src/."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "pawpular"
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 60
# Underscore names of other libraries that their documentation makes public.
DOCUMENTED = {"_exit"}  # os._exit: "exit the process without cleanup", the documented call for a forked worker


def _modules() -> dict[str, Path]:
    found = {}
    for path in PKG.rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    return {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for n in ast.walk(node)
    }


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports, at the top or inside a function (``if TYPE_CHECKING`` aside)."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        skip = _type_checking_nodes(tree)
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(tree):
            if id(node) in skip or not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = (
                    ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
                    if node.level
                    else (node.module or "")
                )
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
                targets = subs or [base]
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                component.append(w)
            if component:
                found.append(sorted([v, *component]))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_circle():
    graph = import_graph()
    assert "pawpular.config_checks" in graph["pawpular.config"] and "pawpular.svr_study" in graph["pawpular.cli"]
    assert cycles(graph) == []
    assert "pawpular.config" not in graph["pawpular.config_checks"]  # the checks know the config's type only
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the check finds one


def test_no_module_over_400_lines_and_no_function_over_60():
    long_modules, long_functions = [], []
    for path in sorted(PKG.rglob("*.py")):
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            long_modules.append(f"{path.relative_to(SRC)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long_functions.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name}: {n} lines")
    assert long_modules == [] and long_functions == []


def _own_private_names() -> set[str]:
    """Every underscore name the project itself defines: functions, classes, attributes it assigns, fields,
    parameters, module-level names."""
    names = set()
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names.add(node.target.id)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def private_reads(root: Path = PKG) -> list[str]:
    """``x._name`` and ``getattr(x, "_name")`` where ``_name`` is not one of the project's own."""
    own = _own_private_names() | DOCUMENTED
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            name = None
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                name = node.attr
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "setattr", "hasattr", "delattr")
                and len(node.args) > 1
                and isinstance(node.args[1], ast.Constant)
                and str(node.args[1].value).startswith("_")
            ):
                name = str(node.args[1].value)
            if name and not name.startswith("__") and name not in own:
                found.append(f"{path.relative_to(root.parent)}:{node.lineno} {name}")
    return found


def test_no_private_attribute_of_another_library_is_read(tmp_path):
    assert private_reads() == []
    # the check sees what it must: a sampler's private RNG, a storage behind a study, torch's hook table
    probe = tmp_path / "pawpular"
    probe.mkdir()
    (probe / "probe.py").write_text(
        "def f(study, sampler, m):\n    sampler._rng.rng.seed(0)\n"
        "    return getattr(study, '_storage'), m._forward_hooks\n"
    )
    assert sorted(r.split()[-1] for r in private_reads(probe)) == ["_forward_hooks", "_rng", "_storage"]
