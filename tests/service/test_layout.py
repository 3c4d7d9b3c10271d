"""service/ depends one way: grids and store stand alone, results reads the store, queue uses all.

Each sub-package is imported (every module of it) in a child interpreter whose
import system refuses the sub-packages it must not know; a static pass over
every import statement (function-level ones included) checks the same rule for
imports that only run later.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SUBPACKAGES = ("grids", "store", "queue", "results")
#: What each sub-package may import of the others (settings and exceptions are shared).
ALLOWED: dict[str, frozenset[str]] = {
    "grids": frozenset(),
    "store": frozenset(),
    "results": frozenset({"store"}),
    "queue": frozenset({"grids", "store"}),
}


def _imported_subpackages(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "service" and len(parts) > 1 and parts[1] in SUBPACKAGES:
                found.add(parts[1])
    return found


@pytest.mark.parametrize("package", SUBPACKAGES)
def test_every_import_statement_of_a_subpackage_respects_the_direction(package: str) -> None:
    files = sorted((ROOT / "service" / package).rglob("*.py"))
    assert files, f"service/{package} has no modules"
    wrong = {
        str(path.relative_to(ROOT)): sorted(others)
        for path in files
        if (others := _imported_subpackages(path) - ALLOWED[package] - {package})
    }
    assert not wrong, f"service/{package} imports what it must not know: {wrong}"


@pytest.mark.parametrize("package", SUBPACKAGES)
def test_a_subpackage_imports_whole_with_the_others_blocked(package: str) -> None:
    blocked = sorted(set(SUBPACKAGES) - ALLOWED[package] - {package})
    code = textwrap.dedent(
        f"""
        import importlib, pkgutil, sys
        BLOCKED = {tuple(f"service.{name}" for name in blocked)!r}

        class Block:
            def find_spec(self, name, path=None, target=None):
                if ".".join(name.split(".")[:2]) in BLOCKED:
                    raise ImportError(f"blocked: {{name}}")
                return None

        sys.meta_path.insert(0, Block())
        package = importlib.import_module("service.{package}")
        for info in pkgutil.walk_packages(package.__path__, "service.{package}."):
            importlib.import_module(info.name)
        for name in package.__all__:
            getattr(package, name)
        loaded = sorted(m for m in sys.modules if ".".join(m.split(".")[:2]) in BLOCKED)
        assert not loaded, loaded
        print("ok")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_the_blocking_finder_would_catch_a_forbidden_import() -> None:
    # The rule is not vacuous: the queue's submitting, with the store blocked, cannot import.
    code = textwrap.dedent(
        """
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[:2] == ["service", "store"]:
                    raise ImportError(f"blocked: {name}")
                return None
        sys.meta_path.insert(0, Block())
        import service.queue.enqueue
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0
    assert "blocked: service.store" in proc.stderr
