"""The one table writer: rows of cells as Markdown or LaTeX (stdlib only, usable from every layer)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

_TEX_SPECIALS = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
    "|": r"\textbar{}", "<": r"\textless{}", ">": r"\textgreater{}",  # the default font has no such glyphs
}
_TEX_RE = re.compile("|".join(re.escape(c) for c in _TEX_SPECIALS))


def tex_escape(text: str) -> str:
    """``text`` with every LaTeX special character escaped (safe in a table cell or caption)."""
    return _TEX_RE.sub(lambda m: _TEX_SPECIALS[m.group(0)], " ".join(str(text).splitlines()))


def md_escape(text: str) -> str:
    """``text`` safe in a Markdown table cell: pipes escaped, line breaks as spaces."""
    return " ".join(str(text).splitlines()).replace("|", "\\|")


def literal_text(text: str) -> str:
    """``text`` shown literally by matplotlib: a ``$`` never starts mathtext."""
    return str(text).replace("$", "\\$")


def number(value: float | None, digits: int = 4) -> str:
    """A fixed-point cell, or an en dash for a missing or NaN value."""
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def with_se(value: float | None, se: float | None, digits: int = 4, latex: bool = False) -> str:
    """``value ± se`` (the ``± se`` left out when the error is missing or NaN)."""
    if value is None:
        return "–"
    if se is None or math.isnan(se):
        return number(value, digits)
    pm = r" $\pm$ " if latex else " ± "
    return f"{value:.{digits}f}{pm}{se:.{digits}f}"


@dataclass
class Table:
    """A table: a header, rows of cell strings, and rows after which a rule is drawn.

    The columns in ``left`` (the first: labels) are left-aligned, the others right-aligned (numbers).
    """

    header: list[str]
    rows: list[list[str]] = field(default_factory=list)
    rules_after: set[int] = field(default_factory=set)
    left: tuple[int, ...] = (0,)

    def add(self, cells: list[str], rule_before: bool = False) -> None:
        if len(cells) != len(self.header):
            raise ValueError(f"a row of {len(cells)} cells in a table of {len(self.header)} columns")
        if rule_before and self.rows:
            self.rules_after.add(len(self.rows) - 1)
        self.rows.append([str(c) for c in cells])

    def to_markdown(self, title: str | None = None) -> str:
        """GitHub Markdown; ``title`` above in bold."""
        lines = [f"**{title}**", ""] if title else []
        lines.append("| " + " | ".join(md_escape(h) for h in self.header) + " |")
        lines.append("|" + "".join("---|" if i in self.left else "---:|" for i in range(len(self.header))))
        lines += ["| " + " | ".join(md_escape(c) for c in row) + " |" for row in self.rows]
        return "\n".join(lines) + "\n"

    def to_latex(self, caption: str | None = None, *, escape: bool = True) -> str:
        """A booktabs ``tabular`` (wrapped in a ``table`` with ``caption``); cells are escaped
        unless ``escape=False`` (cells that already hold LaTeX)."""
        esc = tex_escape if escape else str
        align = "".join("l" if i in self.left else "r" for i in range(len(self.header)))
        body = [r"\begin{tabular}{" + align + "}", r"\toprule",
                " & ".join(esc(h) for h in self.header) + r" \\", r"\midrule"]
        for i, row in enumerate(self.rows):
            body.append(" & ".join(esc(c) for c in row) + r" \\")
            if i in self.rules_after:
                body.append(r"\midrule")
        body += [r"\bottomrule", r"\end{tabular}"]
        if caption:
            body = [r"\begin{table}", r"\centering", *body, rf"\caption{{{tex_escape(caption)}}}", r"\end{table}"]
        return "\n".join(body) + "\n"
