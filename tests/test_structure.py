"""The house plan, checked: subpackages in layers that import one way, no import circle, files and functions that
fit a sitting, and no private name of another library (Optuna, timm, torch, ...) read anywhere in src/."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "pawpular"
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 60
# The layers, bottom first: a module imports only from its own package and from packages of a lower layer. The
# pipeline (the runner, the recipe, the stages) is one layer; api.py sits under the command line.
LAYERS = [
    ["store"],
    ["config", "machine"],
    ["logs"],
    ["data"],
    ["scores"],
    ["model", "svr"],
    ["pipeline"],
    ["views", "ship"],
    ["api"],
    ["cli"],
    ["pawpular"],  # the package's __init__ (its lazy API) and __main__
]
PIPELINE = {"stages", "runner", "recipe"}
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
            # the root package (``from .. import __version__``) is no edge: Python runs it before any module of it
            graph[name] |= {t for t in targets if t in modules and t not in (name, "pawpular")}
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
    assert (
        "pawpular.config.checks" in graph["pawpular.config.schema"]
        and "pawpular.svr.study" in graph["pawpular.cli.main"]
    )
    assert cycles(graph) == []
    assert "pawpular.config.schema" not in graph["pawpular.config.checks"]  # the checks know the config's type only
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the check finds one


def package_of(module: str) -> str:
    """pawpular.svr.head -> svr; pawpular.stages.embed, pawpular.runner -> pipeline; pawpular, pawpular.__main__ ->
    pawpular."""
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 and parts[1] != "__main__" else "pawpular"
    return "pipeline" if top in PIPELINE else top


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Each import of a module from a package of the same or a higher layer (its own package aside)."""
    rank = {package: i for i, layer in enumerate(LAYERS) for package in layer}
    found = []
    for module, imported in sorted(graph.items()):
        mine = package_of(module)
        for target in sorted(imported):
            theirs = package_of(target)
            if theirs != mine and rank[theirs] >= rank[mine]:
                found.append(f"{module} ({mine}) imports {target} ({theirs})")
    return found


def test_packages_import_downward_only():
    graph = import_graph()
    packages = {package_of(m) for m in graph}
    assert packages == {p for layer in LAYERS for p in layer}, "every package has a layer, every layer a package"
    assert sum(1 for m in graph if package_of(m) == "pipeline") == 9  # runner, recipe, stages and its six stages
    assert upward_imports(graph) == []
    # the check sees what it must: an import from a higher layer, and one between two packages of a layer
    probe = {
        "pawpular.store.files": {"pawpular.config.schema"},
        "pawpular.model.models": {"pawpular.svr.head", "pawpular.store.files"},
        "pawpular.svr.head": {"pawpular.scores.metrics"},
    }
    assert upward_imports(probe) == [
        "pawpular.model.models (model) imports pawpular.svr.head (svr)",
        "pawpular.store.files (store) imports pawpular.config.schema (config)",
    ]


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
