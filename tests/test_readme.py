"""The README's Python example runs and prints what the README says."""

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_example_runs_and_matches_its_printed_output():
    text = README.read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    printed = re.search(r"prints\n\n((?:    .*\n)+)", text).group(1)
    expected = [line.strip() for line in printed.splitlines()]
    assert out.getvalue().strip().splitlines() == expected


def test_readme_has_the_two_quick_start_commands():
    text = README.read_text()
    assert "pip install -e . && itd demo" in text
    assert 'pip install -e ".[test]" && python -m pytest -q' in text


def _readme_commands() -> list[str]:
    """Every complete ``itd ...`` command in the README's indented code blocks (continuations joined)."""
    text = README.read_text().replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        stripped = line.strip()
        if line.startswith("    ") and stripped.startswith("itd ") and "..." not in stripped:
            commands.append(" ".join(stripped.split()))
    return commands


def test_readme_pipeline_commands_parse():
    import shlex

    from itdiffusion.cli import build_parser

    commands = _readme_commands()
    used = {c.split()[1] for c in commands}
    assert {"data", "spectrum", "finetune", "eval", "report"} <= used
    parser = build_parser()
    for command in commands:
        args = parser.parse_args(shlex.split(command)[1:])
        assert callable(args.func), command
