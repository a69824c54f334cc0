"""The package import graph points one way, read from the source (no imports are run).

In the proxy, the HTTP layer imports the service, the service the pure modules and the Triton
client, and all of them `common`. `export` and `serving` import only `common`; `testkit`
(tests' and benchmarks' helpers) also `serving`; `benchmarks` anything but the tests; and
nothing imports the tests.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

from common.settings import PROJECT_ROOT

PACKAGES = ("common", "proxy", "export", "serving", "testkit", "benchmarks", "tests")
# What each package may import of the project (besides itself).
ALLOWED = {
    "common": set(),
    "proxy": {"common"},
    "export": {"common"},
    "serving": {"common"},
    "testkit": {"common", "serving"},
    "benchmarks": {"common", "serving", "testkit", "export", "proxy"},
    "tests": set(PACKAGES),
}
# Within the proxy: the HTTP layer, then the service, then everything else. A module of a
# lower layer never imports one of a higher layer.
PROXY_LAYERS = (
    {
        "proxy.__main__",
        "proxy.app",
        "proxy.routes",
        "proxy.middleware",
        "proxy.problems",
        "proxy.events",
        "proxy.page",
    },
    {"proxy.service"},
)


def module_name(path: Path) -> str:
    parts = path.relative_to(PROJECT_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def project_imports() -> dict[str, set[str]]:
    """Module -> the project modules it imports (at any depth of its code)."""
    graph: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in sorted((PROJECT_ROOT / package).rglob("*.py")):
            name = module_name(path)
            imported: set[str] = set()
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    imported |= {alias.name for alias in node.names}
                elif isinstance(node, ast.ImportFrom):
                    base = node.module or ""
                    if node.level:  # relative: resolve against this module's package
                        anchor = name.split(".")
                        if path.name != "__init__.py":
                            anchor = anchor[:-1]
                        anchor = anchor[: len(anchor) - node.level + 1]
                        base = ".".join([*anchor, base] if base else anchor)
                    imported.add(base)
                    imported |= {f"{base}.{alias.name}" for alias in node.names}
            ours = {module for module in imported if module.split(".")[0] in PACKAGES}
            graph[name] = ours - {name}
    known = set(graph)
    return {name: {m for m in deps if m in known} for name, deps in graph.items()}


@pytest.mark.parametrize("package", PACKAGES)
def test_packages_import_only_what_they_may(package: str) -> None:
    offending = {
        f"{module} imports {dependency}"
        for module, dependencies in project_imports().items()
        if module.split(".")[0] == package
        for dependency in dependencies
        if dependency.split(".")[0] not in {package} | ALLOWED[package]
    }
    assert not offending, sorted(offending)


def test_proxy_layers_point_down() -> None:
    def layer(module: str) -> int:
        for index, members in enumerate(PROXY_LAYERS):
            if module in members:
                return index
        return len(PROXY_LAYERS)

    offending = {
        f"{module} imports {dependency}"
        for module, dependencies in project_imports().items()
        if module.startswith("proxy")
        for dependency in dependencies
        if dependency.startswith("proxy") and layer(dependency) < layer(module)
    }
    assert not offending, sorted(offending)


def test_no_import_cycles() -> None:
    graph = project_imports()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dependency in sorted(graph[module]):
            if state.get(dependency) == 1:
                cycle = [*path[path.index(dependency) :], dependency]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dependency not in state:
                visit(dependency, [*path, dependency])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_the_graph_is_read() -> None:
    """The checks above have something to check: known edges are seen."""
    graph = project_imports()
    assert "common.settings" in graph["proxy.service"]
    assert "proxy.everything.pipeline" in graph["proxy.service"]
    assert "common.contract" in graph["export.onnx_export"]
