"""The shape of the house, checked from the source: layers that do not leak, no import circle,
short functions, no private accelerate API on the run path, and an architecture page that names
only modules that exist."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from finetune.api import PUBLIC_MODULES

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "finetune"
CORE = ["finetune.pipeline", "finetune.card", "finetune.rundir", "finetune.training", "finetune.export"]
MAX_FUNCTION_LINES = 60


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(path: Path) -> set[str]:
    """The finetune modules `path` imports, at the top or inside functions (a lazy import is still a dependency)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            # `from finetune import plugins` imports the module finetune.plugins; `from finetune.api import X` finetune.api.
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in MODULES else node.module
                     for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in MODULES and name != "finetune"}
    return found


GRAPH = {name: imports_of(path) for name, path in MODULES.items()}


def test_the_import_graph_has_no_circle():
    cycles, state = [], {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for dependency in sorted(GRAPH[name]):
            if state.get(dependency) == "open":
                cycles.append(path[path.index(dependency):] + [dependency] if dependency in path else [name, dependency])
            elif dependency not in state:
                visit(dependency, [*path, dependency])
        state[name] = "done"

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_the_circle_finder_sees_lazy_imports():
    # conformance used to import finetune.testing inside a function while testing imported conformance.
    assert "finetune.conformance" in GRAPH["finetune.testing"]
    assert "finetune.pipeline" in GRAPH["finetune.conformance"]  # imported inside run_recipe


def test_the_core_knows_no_task_and_no_method():
    for name, dependencies in GRAPH.items():
        if any(name == core or name.startswith(core + ".") for core in CORE):
            leaks = sorted(d for d in dependencies if d.startswith(("finetune.tasks", "finetune.methods")))
            assert leaks == [], f"{name} imports {leaks}"


def test_tasks_and_methods_use_only_the_public_modules():
    for name, dependencies in GRAPH.items():
        for home in ("finetune.tasks", "finetune.methods"):
            if name.startswith(home + "."):
                package = name.rsplit(".", 1)[0] if MODULES[name].name != "__init__.py" else name
                private = sorted(d for d in dependencies if d not in PUBLIC_MODULES and not d.startswith(package))
                assert private == [], f"{name} imports {private}, which are not in finetune.api.PUBLIC_MODULES"


def test_every_public_module_exists():
    assert set(PUBLIC_MODULES) <= set(MODULES)


def test_no_function_is_long():
    long = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert long == []


def test_no_private_accelerate_api_on_the_run_path():
    # Only the test-support reset (finetune.conformance.fresh_accelerate_state) may touch accelerate's internals.
    offenders = []
    for name, path in MODULES.items():
        if name == "finetune.conformance":
            continue
        text = path.read_text()
        if re.search(r"\b(AcceleratorState|PartialState|GradientState)\._\w+", text):
            offenders.append(name)
    assert offenders == []


def test_the_architecture_page_names_only_modules_that_exist():
    page = (REPO / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`((?:finetune|plugins|cards|tests|docs)/[\w./-]*)`", page))
    assert len(named) >= 20  # it does name the modules
    missing = sorted(p for p in named if not (REPO / p.rstrip("/")).exists())
    assert missing == []
    for module in ("finetune/api.py", "finetune/pipeline.py", "finetune/training/loop.py", "finetune/files.py"):
        assert f"`{module}`" in page
