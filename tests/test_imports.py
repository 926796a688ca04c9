"""The import graph: every module imports on its own, dependencies point one way.

A cycle can hide behind an import written inside a function (it runs late, so the package
still imports): the static check below reads every import statement of the package, at any
depth, and fails on any cycle among the package's modules. ``reference/`` (the oracle the
kernels are tested against) must import nothing from the package.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "foca_kernels"


def modules(root: Path, package: str) -> dict:
    """Dotted name -> file of every module of ``package`` under ``root`` (a package by its __init__)."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        rel = path.relative_to(root).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, known: dict):
    """(imported module, line, inside a function?) for every import statement in ``path``, at
    any depth. ``from X import y`` imports the module X.y when there is one, else X (the
    parent packages a module is loaded through are not edges: Python loads them first)."""
    is_pkg = path.name == "__init__.py"
    tree = ast.parse(path.read_text("utf-8"), str(path))
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    found.append((alias.name, child.lineno, in_function))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[: len(base) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module
                for alias in child.names:  # a submodule, else a name the module defines
                    sub = f"{target}.{alias.name}"
                    found.append((sub if sub in known else target, child.lineno, in_function))
            visit(child, nested)

    visit(tree, False)
    return found


def graph(root: Path, package: str):
    """Edges between the package's modules: {module: {imported module: [(line, in function)]}}."""
    known = modules(root, package)
    edges = {m: {} for m in known}
    for name, path in known.items():
        for target, line, in_function in imports_of(name, path, known):
            if target in known and target != name:
                sites = edges[name].setdefault(target, [])
                if (line, in_function) not in sites:
                    sites.append((line, in_function))
    return edges


def cycles(edges: dict) -> list:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []

    def strong(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(edges) + 100))
    try:
        for v in sorted(edges):
            if v not in index:
                strong(v)
    finally:
        sys.setrecursionlimit(limit)
    return out


def describe(comp, edges) -> str:
    lines = []
    for a in comp:
        for b, sites in sorted(edges[a].items()):
            if b in comp:
                where = ", ".join(f"line {ln}{' (in a function)' if f else ''}" for ln, f in sites)
                lines.append(f"  {a} -> {b}: {where}")
    return "\n".join(lines)


def test_no_import_cycle_even_through_function_level_imports():
    edges = graph(ROOT, PACKAGE)
    assert len(edges) > 20, sorted(edges)  # the walk found the package
    found = cycles(edges)
    assert not found, "import cycles:\n" + "\n\n".join(describe(c, edges) for c in found)


def test_the_cycle_check_sees_function_level_imports(tmp_path):
    """The check itself: a loop closed only by an import inside a function is reported."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import g\n\ndef f():\n    return g()\n")
    (pkg / "b.py").write_text("def g():\n    from . import a\n    return a\n")
    (pkg / "c.py").write_text("from pkg import a\n")
    edges = graph(tmp_path, "pkg")
    assert cycles(edges) == [["pkg.a", "pkg.b"]]
    assert edges["pkg.b"]["pkg.a"] == [(2, True)] and "pkg.a" in edges["pkg.c"]
    (pkg / "b.py").write_text("def g():\n    return 1\n")
    assert cycles(graph(tmp_path, "pkg")) == []


def test_reference_imports_nothing_from_the_package():
    files = sorted((ROOT / "reference").rglob("*.py"))
    assert files
    bad = []
    for path in files:
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for target, line, _ in imports_of(name, path, {}):
            if target == PACKAGE or target.startswith(PACKAGE + "."):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not bad, "\n".join(bad)


def test_reference_is_not_installed_as_a_package():
    """reference/ stays in the checkout: the build installs foca_kernels only (no top-level
    package named ``reference`` in site-packages); pytest finds it through ``pythonpath``."""
    import fnmatch

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))
    include = cfg["tool"]["setuptools"]["packages"]["find"]["include"]
    assert any(fnmatch.fnmatch(PACKAGE, pattern) for pattern in include), include
    assert not any(fnmatch.fnmatch(name, pattern) for name in ("reference", "reference.rfc") for pattern in include)
    assert "." in cfg["tool"]["pytest"]["ini_options"]["pythonpath"]


# Each module imported first, in a process of its own: an import that works only after some
# other module was imported (a hidden order dependence or a cycle entered from the wrong end)
# fails here. One interpreter imports the third-party modules the package names (torch,
# triton, ...) once, then forks a child per module of the package, so that every child starts
# with none of the package loaded.
_ISOLATED = textwrap.dedent("""
    import os, sys, traceback
    split = sys.argv.index("--")
    third_party, names = sys.argv[1:split], sys.argv[split + 1:]
    for mod in third_party:  # shared by the children; a missing optional one is the child's to report
        try:
            __import__(mod)
        except Exception:
            pass
    failed = []
    for name in names:
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                __import__(name)
            except ModuleNotFoundError as e:
                if (e.name or "").split(".")[0] in ("foca_kernels", "reference"):
                    traceback.print_exc()
                    code = 1
                else:  # an optional dependency that is not installed
                    print(f"{name}: skipped, needs {e.name}")
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        if status != 0:
            failed.append(name)
    print("FAILED:", " ".join(failed))
    sys.exit(1 if failed else 0)
""")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks a child per module")
def test_every_module_imports_in_isolation():
    known = modules(ROOT, PACKAGE)
    third_party = sorted({
        target for name, path in known.items() for target, _, _ in imports_of(name, path, known)
        if target and target.split(".")[0] not in (PACKAGE, "reference", "__future__")
    })
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", _ISOLATED, *third_party, "--", *sorted(known)], capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-8000:]
    assert r.stdout.rstrip().endswith("FAILED:"), r.stdout[-4000:]
