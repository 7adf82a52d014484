"""The shape of the package, checked: what may import what.

- A built-in method imports only public unipeft names: a third party could write it.
- The import graph of ``unipeft`` has no cycle (function-level imports included, imports
  under ``TYPE_CHECKING`` excluded).
- The core never imports the tools built on it (``training``, ``testing``, ``cli``,
  ``bench``, ``demo``).
- No module is longer than 600 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import unipeft

PACKAGE = Path(unipeft.__file__).parent
TOOLS = ("training", "testing", "cli", "bench", "demo", "clip")
CORE = (
    "contract", "runtime", "blocks", "features", "maps", "methods", "model", "_builtin",
    "distributed", "quantization",
)  # fmt: skip


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(module: str) -> list[tuple[str, list[str], int]]:
    """``(imported module, names imported from it, line)`` for every import of ``module``
    that runs (at module level or in a function), resolved to absolute names."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, list[str], int]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name, [], node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.append((target, [a.name for a in node.names], node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _resolve(target: str, names: list[str]) -> list[str]:
    """The unipeft modules an import loads: the module itself, or the submodules named."""
    out = []
    submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
    if submodules and len(submodules) == len(names):  # ``from pkg import mod1, mod2``
        out.extend(submodules)
    elif target in MODULES:
        out.append(target)
        out.extend(submodules)
    return out


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module in MODULES:
        for target, names, _ in _imports(module):
            for dep in _resolve(target, names):
                # a package's __init__ importing its own submodules is how packages are
                # made, and a submodule importing its parent package would be a cycle
                if dep != module:
                    graph[module].add(dep)
    return graph


def _private(target: str, names: list[str]) -> list[str]:
    bad = [part for part in target.split(".") if part.startswith("_")]
    bad += [n for n in names if n.startswith("_")]
    return bad


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("unipeft.methods")))
def test_built_in_methods_import_only_public_names(module: str) -> None:
    own = module.split(".")[:4]  # unipeft.methods.<family>.<method>: its own folder
    offenders = []
    for target, names, line in _imports(module):
        if not target.startswith("unipeft"):
            continue
        inside = target.split(".")[: len(own)] == own and len(own) == 4
        if inside:
            continue  # a method's folder may keep private helpers of its own
        bad = _private(target, names)
        if bad:
            offenders.append(f"line {line}: from {target} import {', '.join(names)}")
    assert not offenders, (
        f"{module} imports private unipeft code, which a plugin could not: {offenders}. "
        "Make what it needs public (unipeft.blocks, the contract) instead."
    )


def test_the_private_import_check_can_fail() -> None:
    assert _private("unipeft.runtime.ledger", ["views"]) == []
    assert _private("unipeft._hidden", ["x"]) == ["_hidden"]
    assert _private("unipeft.methods.additive.prompt_tuning", ["_build"]) == ["_build"]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (or a self-loop)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            strong(v)
    return found


def test_no_import_cycles() -> None:
    graph = _graph()
    # the top package re-exports the API; its submodules never import it back
    back = sorted(m for m, deps in graph.items() if "unipeft" in deps and m != "unipeft")
    graph = {m: deps - {"unipeft"} for m, deps in graph.items()}
    cycles = _cycles(graph)
    assert not cycles, f"import cycles: {cycles}"
    tools = {f"unipeft.{t}" for t in TOOLS}
    core_back = [m for m in back if not any(m == t or m.startswith(t + ".") for t in tools)]
    assert not core_back, f"core modules import the top package (a cycle): {core_back}"


def test_the_cycle_finder_finds_cycles() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_core_never_imports_the_tools() -> None:
    graph = _graph()
    core = [
        m
        for m in MODULES
        if any(m == f"unipeft.{c}" or m.startswith(f"unipeft.{c}.") for c in CORE)
    ]
    assert len(core) > 20
    offenders = {
        m: sorted(d for d in graph[m] if d.split(".")[1] in TOOLS)
        for m in core
        if any(d.split(".")[1] in TOOLS for d in graph[m] if d != "unipeft")
    }
    assert not offenders, f"core modules import training/testing/cli/bench/demo: {offenders}"


def test_no_module_is_over_600_lines() -> None:
    long = {
        m: n
        for m, p in MODULES.items()
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > 600
    }
    assert not long, f"modules over 600 lines (split each into modules of one idea): {long}"


def _private_members_of_delta_model() -> set[str]:
    tree = ast.parse((PACKAGE / "model.py").read_text(encoding="utf-8"))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "DeltaModel")
    names = {n.name for n in cls.body if isinstance(n, ast.FunctionDef)}
    for node in ast.walk(cls):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if node.value.id == "self":
                names.add(node.attr)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def test_only_model_py_touches_delta_models_private_members() -> None:
    private = _private_members_of_delta_model()
    assert {"_adapters", "_hosts", "_check_live"} <= private
    offenders = []
    for module, path in MODULES.items():
        if module == "unipeft.model":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr in private:
                owner = node.value
                if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                    continue  # a class of that module with a member of the same name
                offenders.append(f"{module}:{node.lineno}: .{node.attr}")
    assert not offenders, f"private members of DeltaModel used outside model.py: {offenders}"
