"""Honest packaging: what the code imports is what pyproject.toml declares, with floors the code
really needs, and the package's layers import only downwards (core never imports the demo, the
registry never imports a model library or Prefect, the registry's modules form no cycle).

Everything here reads source with `ast` (no import of the code under test) except the one check
that has to see what an import really loads, which runs in a fresh interpreter."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "loraflow"
SOURCE_ROOTS = (PACKAGE, ROOT / "flows", ROOT / "tasks")

# Modules only the optional feature uses, and the extra that feature needs.
EXTRA_OF_FOLDER = {PACKAGE / "serving": "serve", PACKAGE / "demo": "demo"}
# Core modules allowed to import an extra's packages, inside a function only, because that function
# is the extra's entry point; each names the extra to install in its error message.
LAZY_ENTRY_POINTS = {PACKAGE / "cli" / "serve.py": "serve", PACKAGE / "kubernetes_job.py": "kubernetes"}

# Floors found by reading the releases (see pyproject.toml): the oldest version with what the code
# calls. A lower floor would let pip install a version that fails at run time.
FLOORS = {
    "datasets": "4.0",  # datasets.List (data/packing.py) first appears in 4.0.0
    "trl": "1.0",  # pack_dataset(strategy="bfd_split") first appears in 1.0.0 (0.29: "bfd-requeue")
    "peft": "0.18",  # 0.17 fails to import under transformers 5 (HybridCache is gone)
    "botocore": "1.36",  # Config(request_checksum_calculation=...) first appears in 1.36.0
}

# Imports that may not appear anywhere in the registry (not even inside a function): it moves
# files, and a service that only pulls adapters must not pay for a model stack or Prefect.
REGISTRY_FORBIDDEN = ("torch", "transformers", "peft", "prefect", "loraflow.modeling", "loraflow.evaluation",
                      "loraflow.training", "loraflow.adapters", "loraflow.pipeline")


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503


def python_files() -> list[Path]:
    return sorted(p for root in SOURCE_ROOTS for p in root.rglob("*.py"))


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """(absolute module name, line, inside a function) for every import in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend((alias.name, child.lineno, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.append((child.module, child.lineno, in_function))
                # `from loraflow import demo` imports loraflow.demo
                found.extend((f"{child.module}.{alias.name}", child.lineno, in_function) for alias in child.names)
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return found


def third_party(path: Path) -> list[tuple[str, int, bool]]:
    out = []
    for module, line, lazy in imports(path):
        top = module.split(".")[0]
        if top not in sys.stdlib_module_names and top != "loraflow" and (top, line, lazy) not in out:
            out.append((top, line, lazy))
    return out


def declared() -> tuple[set[str], dict[str, set[str]], dict[str, Requirement]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = [Requirement(r) for r in project["dependencies"]]
    extras = {name: {normalise(Requirement(r).name) for r in reqs}
              for name, reqs in project.get("optional-dependencies", {}).items()}
    return {normalise(r.name) for r in core}, extras, {normalise(r.name): r for r in core}


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_every_third_party_import_is_declared():
    core, extras, _ = declared()
    distributions = importlib.metadata.packages_distributions()
    problems = []
    for path in python_files():
        folder_extra = next((extra for folder, extra in EXTRA_OF_FOLDER.items() if folder in path.parents), None)
        entry_extra = LAZY_ENTRY_POINTS.get(path)
        for top, line, lazy in third_party(path):
            dists = {normalise(d) for d in distributions.get(top, [])}
            if not dists:
                problems.append(f"{rel(path)}:{line}: {top} is not installed here, so its distribution is unknown")
                continue
            allowed = set(core)
            if folder_extra:
                allowed |= extras.get(folder_extra, set())
            if entry_extra and lazy:
                allowed |= extras.get(entry_extra, set())
            if not dists & allowed:
                where = f"the core dependencies or the {folder_extra!r} extra" if folder_extra else "the core dependencies"
                problems.append(f"{rel(path)}:{line}: imports {top} (distribution {'/'.join(sorted(dists))}), "
                                f"not declared in {where} of pyproject.toml")
    assert not problems, "\n".join(problems)


def test_lazy_entry_points_name_their_extra():
    core, extras, _ = declared()
    distributions = importlib.metadata.packages_distributions()
    for path, extra in LAZY_ENTRY_POINTS.items():
        assert extra in extras, f"pyproject.toml has no {extra!r} extra"
        optional = [(top, line) for top, line, lazy in third_party(path)
                    if not {normalise(d) for d in distributions.get(top, [])} & core]
        assert optional, f"{rel(path)} imports nothing from the {extra!r} extra: drop it from LAZY_ENTRY_POINTS"
        assert all(lazy for top, line, lazy in third_party(path)
                   if not {normalise(d) for d in distributions.get(top, [])} & core), \
            f"{rel(path)}: an import of the {extra!r} extra at module level breaks the core CLI without it"
        assert f"loraflow[{extra}]" in path.read_text(), \
            f"{rel(path)}: the error for a missing {extra!r} extra must say `pip install 'loraflow[{extra}]'`"


@pytest.mark.parametrize("name, floor", sorted(FLOORS.items()))
def test_version_floors_are_what_the_code_needs(name, floor):
    _, _, requirements = declared()
    assert name in requirements, f"{name} is not a core dependency"
    floors = [Version(spec.version) for spec in requirements[name].specifier if spec.operator in (">=", "==", "~=")]
    assert floors, f"{requirements[name]}: no floor"
    assert max(floors) >= Version(floor), f"{requirements[name]}: the code needs {name}>={floor}"


def test_extras_used_by_the_tests_and_benches_include_the_optional_features():
    _, extras, _ = declared()
    for extra in ("test", "bench"):
        assert {"loraflow"} <= extras[extra]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for extra in ("test", "bench"):
        self_extras = set()
        for req in map(Requirement, project["optional-dependencies"][extra]):
            if normalise(req.name) == "loraflow":
                self_extras |= req.extras
        assert {"demo", "serve"} <= self_extras, f"the {extra!r} extra must pull loraflow[demo,serve]"


def test_core_modules_do_not_import_the_demo():
    demo = PACKAGE / "demo"
    # `loraflow assets fetch|demo` builds the demo's assets: the one core entry point of the demo.
    demo_entry_points = {PACKAGE / "cli" / "assets.py"}
    offenders = []
    for path in python_files():
        if demo in path.parents or path in demo_entry_points:
            continue
        for module, line, _ in imports(path):
            if (module == "loraflow.demo" or module.startswith("loraflow.demo.")) and f"{rel(path)}:{line}:" not in \
                    "".join(offenders):
                offenders.append(f"{rel(path)}:{line}: imports {module}")
    assert not offenders, "\n".join(offenders)
    for path in demo_entry_points:
        assert all(lazy for module, _, lazy in imports(path) if module.startswith("loraflow.demo")), \
            f"{rel(path)}: imports loraflow.demo at module level"


def test_registry_source_never_imports_models_or_prefect():
    offenders = []
    for path in sorted((PACKAGE / "registry").glob("*.py")):
        for module, line, _ in imports(path):
            if any(module == bad or module.startswith(bad + ".") for bad in REGISTRY_FORBIDDEN) and \
                    f"{rel(path)}:{line}:" not in "".join(offenders):
                offenders.append(f"{rel(path)}:{line}: imports {module}")
    assert not offenders, "\n".join(offenders)


def test_importing_the_registry_loads_no_model_library_or_prefect():
    code = ("import sys, importlib, pkgutil, loraflow.registry as r\n"
            "for m in pkgutil.iter_modules(r.__path__): importlib.import_module('loraflow.registry.' + m.name)\n"
            "import loraflow; loraflow.pull_adapter\n"
            "print(' '.join(m for m in ('torch', 'transformers', 'peft', 'prefect') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"importing loraflow.registry loaded: {out.stdout.strip()}"


def registry_graph() -> dict[str, set[str]]:
    """Edges between the registry's modules, from imports anywhere in a file (a lazy import inside
    a function is still a dependency: it only hides the cycle from the import system)."""
    folder = PACKAGE / "registry"
    modules = {p.stem for p in folder.glob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for path in folder.glob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from . import x / from .x import y
                    base = "loraflow.registry" + (f".{node.module}" if node.module else "")
                else:
                    base = node.module or ""
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            for target in targets:
                if target == "loraflow.registry":
                    graph[path.stem].add("__init__")
                elif target.startswith("loraflow.registry."):
                    name = target.split(".")[2]
                    if name in modules:
                        graph[path.stem].add(name)
    for module in graph:
        graph[module].discard(module)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_registry_modules_form_no_import_cycle():
    graph = registry_graph()
    assert "aliases" in graph and "history" in graph
    cycle = find_cycle(graph)
    assert cycle is None, "registry import cycle: " + " -> ".join(cycle)


def test_serve_without_its_extra_fails_in_one_line_naming_it(monkeypatch):
    from loraflow.cli.serve import _serve
    from loraflow.errors import ConfigError

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # what `import uvicorn` sees when it is not installed
    with pytest.raises(ConfigError, match=r"uvicorn is missing.*pip install 'loraflow\[serve\]'"):
        _serve(object())
