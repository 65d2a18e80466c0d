"""The README's Python example runs and prints what the README says; every ``itd`` command of the
README and of ``docs/*.md`` parses (and, with ``-m slow``, the ones that run on digits run); links resolve."""

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]


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


def _commands(page: Path) -> list[str]:
    """Every complete ``itd ...`` command in a page's indented code blocks (continuations joined)."""
    text = page.read_text().replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        stripped = line.strip()
        if line.startswith("    ") and stripped.startswith("itd ") and "..." not in stripped:
            commands.append(" ".join(stripped.split()))
    return commands


def _readme_commands() -> list[str]:
    return _commands(README)


def test_readme_is_short():
    assert len(README.read_text().splitlines()) < 200


def test_readme_pipeline_commands_parse():
    from itdiffusion.cli import build_parser

    commands = _readme_commands()
    used = {c.split()[1] for c in commands}
    assert {"spectrum", "finetune", "eval"} <= used
    parser = build_parser()
    for command in commands:
        args = parser.parse_args(shlex.split(command)[1:])
        assert callable(args.func), command


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_command_of_every_page_parses(page):
    from itdiffusion.cli import build_parser

    parser = build_parser()
    for command in _commands(page):
        args = parser.parse_args(shlex.split(command)[1:])
        assert callable(args.func), f"{page.name}: {command}"


def test_the_pages_together_use_every_command():
    from itdiffusion.cli import SUBCOMMANDS

    used = {c.split()[1] for page in PAGES for c in _commands(page)}
    assert set(SUBCOMMANDS) <= used, set(SUBCOMMANDS) - used


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_and_scripts_of_every_page_exist(page):
    text = page.read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name}: link to missing {target}"
        if anchor and linked.suffix == ".md":
            slugs = {_slug(h) for h in re.findall(r"^#+ (.*)$", linked.read_text(), re.M)}
            assert anchor in slugs, f"{page.name}: no heading #{anchor} in {linked.name}"
    for script in re.findall(r"\b(benchmarks/[\w./-]+\.(?:py|sh))", text):
        assert (ROOT / script).exists(), f"{page.name}: {script} does not exist"


# Small budgets for the commands that run on the built-in digits, so that they finish in seconds: each replaces
# the page's own value of the option (a None value: a flag added).
_BUDGET = {
    "eval": {"--points": "8", "--limit": "6", "--no-tune": None, "--quiet": None, "--device": "cpu"},
    "finetune": {"--epochs": "1", "--limit": "64", "--quiet": None, "--device": "cpu"},
    "finetune --test-data": {"--test-examples": "8", "--test-points": "4"},
    "demo": {"--quick": None, "--quiet": None},
}


def _with_budget(argv: list[str]) -> list[str]:
    budget = dict(_BUDGET.get(argv[0], {}))
    if argv[0] == "finetune" and "--test-data" in argv:
        budget.update(_BUDGET["finetune --test-data"])
    kept, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg in budget:  # drop the page's value; the budget's is appended
            skip = i + 1 < len(argv) and not argv[i + 1].startswith("--")
        else:
            kept.append(arg)
    for option, value in budget.items():
        kept += [option] if value is None else [option, value]
    return kept


def _runs_on_digits(command: str) -> bool:
    """On the built-in digits (not a user's folder), or a report of such results."""
    words = command.split()
    return "my-ddpm" not in words and ("digits" in words or (words[1] == "report" and "digits" in command))


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if any(_runs_on_digits(c) for c in _commands(p))],
                         ids=lambda p: p.name)
def test_the_digits_commands_of_every_page_run_in_order(page, tmp_path, monkeypatch):
    """Each page's commands on the built-in digits, in the page's order, in one folder (a small budget added);
    the README's own-model commands on a diffusers folder are run by test_model_folders.py."""
    from itdiffusion.cli import main

    monkeypatch.chdir(tmp_path)
    commands = [c for c in _commands(page) if _runs_on_digits(c)]
    if not any("--out digits-spectrum.npz" in c for c in commands):  # the spectrum another page computes
        assert main(["spectrum", "--data", "digits", "--dequantize", "--out", "digits-spectrum.npz"]) == 0
    for command in commands:
        argv = _with_budget(shlex.split(command)[1:])
        assert main(argv) == 0, f"{page.name}: {' '.join(argv)}"
