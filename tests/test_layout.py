"""The layout the README describes: one package per app, one black-box layer, no import circles."""

from __future__ import annotations

import ast
import importlib
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _relative_imports(package: Path) -> dict[str, set[str]]:
    """module -> sibling modules it imports (``from .x import``, anywhere in the file, lazy ones too)."""
    graph = {}
    for path in package.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                deps.add(node.module.split(".")[0])
        graph[path.stem] = deps - {path.stem}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in graph.get(node, ()):
            if state.get(dep) == 1:
                return [*path, node, dep]
            if dep not in state and (found := visit(dep, [*path, node])):
                return found
        state[node] = 2
        return None

    return next((c for n in graph if n not in state and (c := visit(n, []))), None)


@pytest.mark.parametrize("package", ["solvers", "deepzero_apps/blackbox", "deepzero_apps/trainer", "tasks/certify", "tasks/pde"])
def test_no_import_circle(package):
    assert _cycle(_relative_imports(ROOT / package)) is None


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"a"}}) is not None


@pytest.mark.parametrize("app", ["classify", "certify", "export", "pde", "serve"])
def test_each_app_is_a_package_with_its_app(app):
    module = importlib.import_module(f"deepzero_apps.tasks.{app}")
    assert module.APP.name == app and module.__path__


@pytest.mark.parametrize("old, new", [("remote", "http_client"), ("classifiers", "loaders"), ("blackbox_loss", "losses")])
def test_moved_black_box_modules_still_import_with_a_deprecation_warning(old, new):
    import sys

    sys.modules.pop(f"deepzero_apps.{old}", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(f"deepzero_apps.{old}")
    assert module is importlib.import_module(f"deepzero_apps.blackbox.{new}")
    assert any(issubclass(w.category, DeprecationWarning) and "deepzero_apps.blackbox" in str(w.message) for w in caught)
