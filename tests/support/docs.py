"""Run the code blocks of a docs page, so the page shows what the tests run. A block is
marked by the line `<!-- snippet: NAME -->` right above its ```python fence."""

from __future__ import annotations

import re
from pathlib import Path

DOCS = Path(__file__).resolve().parents[2] / "docs"
MARKED = re.compile(r"<!-- snippet: (\w+) -->\n```python\n(.*?)```", re.S)


def snippets(page: str) -> dict[str, str]:
    return dict(MARKED.findall((DOCS / page).read_text()))


def python_blocks(page: str) -> int:
    return (DOCS / page).read_text().count("```python")


def run_snippet(page: str, name: str, **names) -> dict:
    """Execute snippet `name` of docs/`page` with `names` defined; returns its namespace."""
    namespace = dict(names)
    exec(compile(snippets(page)[name], f"docs/{page}:{name}", "exec"), namespace)
    return namespace
