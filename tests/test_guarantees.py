"""docs/guarantees.md names, for every promise, the tests that prove it: each must exist."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "guarantees.md"
CITED = re.compile(r"`(tests/test_\w+\.py)(?:::(\w+))?`")


def _tests_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and node.name.startswith("test")}


def test_every_promise_names_tests_that_exist():
    rows = [line for line in PAGE.read_text().splitlines() if re.match(r"\| *\d+ *\|", line)]
    assert len(rows) >= 15, "the table of promises is missing"
    for row in rows:
        cited = CITED.findall(row)
        assert cited, f"a promise names no test: {row[:80]}"
        for file, name in cited:
            path = ROOT / file
            assert path.is_file(), f"{file} (cited in docs/guarantees.md) does not exist"
            if name:
                assert name in _tests_in(path), f"{file}::{name} (cited in docs/guarantees.md) does not exist"
