"""make test's grouping of the tests that start a local Ray cluster (tests/conftest.py: RAY_TESTS): every entry names
a test that exists, and every test that starts a cluster itself (Ray Serve replicas, or `ray start`) is in the group,
so two clusters never run side by side on the two xdist workers."""
from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import RAY_TESTS

ROOT = Path(__file__).resolve().parents[1]
STARTS_RAY = ("ray_object_store_mb", "RAY_OBJECT_STORE_MB", '"start", "--head"')


def test_every_ray_group_entry_names_an_existing_test():
    for entry in RAY_TESTS:
        path, _, name = entry.partition("::")
        source = (ROOT / path).read_text()
        assert not name or f"def {name}(" in source, entry


def test_every_test_that_starts_a_ray_cluster_is_in_the_group():
    missing = []
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        module = path.relative_to(ROOT).as_posix()
        source = path.read_text()
        for node in ast.parse(source).body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                body = ast.get_source_segment(source, node) or ""
                if any(s in body for s in STARTS_RAY) and module not in RAY_TESTS \
                        and f"{module}::{node.name}" not in RAY_TESTS:
                    missing.append(f"{module}::{node.name}")
    assert not missing, f"start a Ray cluster but are not in tests/conftest.py's RAY_TESTS: {missing}"
